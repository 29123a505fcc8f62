"""The command line as a newcomer reads it: every command and sub-command says what it does,
every option says what it is, and the shell completes commands, options and choices."""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess

import pytest

from alexnet.cli import COMMANDS, main
from alexnet.completion import bash_script


def _parsers():
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"alexnet {name}")
        importlib.import_module(module).add_arguments(parser)
        yield name, parser


def _walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", None, sub
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action, None


def test_every_option_and_sub_command_says_what_it_is():
    missing = []
    for name, parser in _parsers():
        for path, action, sub in _walk(parser, f"alexnet {name}"):
            if sub is not None and not sub.description:
                missing.append(f"{path}: no description")
            if action is not None and not action.help:
                missing.append(f"{path} {action.option_strings or action.dest}: no help")
    assert missing == []


def test_every_help_prints_and_exits_zero(capsys):
    for name, parser in _parsers():
        assert main([name, "--help"]) == 0
        for path, _, sub in _walk(parser, name):
            if sub is not None:
                assert main([*path.split(), "--help"]) == 0
    assert "usage: alexnet" in capsys.readouterr().out


def test_predict_shows_a_class_once_where_its_id_is_its_name(tmp_path, capsys):
    """Fashion-MNIST's class ids are its names: `Shirt  Shirt` was printed."""
    import evalkit
    from PIL import Image

    ckpt = evalkit.known_checkpoint(tmp_path / "k.pt", [0.0, 3.0])
    from alexnet.checkpoint import load_checkpoint
    from alexnet.runtime.fileio import atomic_torch_save

    ck = load_checkpoint(ckpt)
    ck["classes"] = ck["class_names"] = ["T-shirt/top", "Shirt"]
    atomic_torch_save(ckpt, ck)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "%  Shirt\n" in out and "Shirt  Shirt" not in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash to complete in")
def test_the_shell_completes_commands_options_and_choices(tmp_path):
    script = tmp_path / "alexnet.bash"
    script.write_text(bash_script())
    probe = (
        f"source {script}\n"
        't() { COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); '
        '_alexnet; echo "${COMPREPLY[*]}"; }\n'
        "t alexnet tr\n"
        "t alexnet train --pres\n"
        "t alexnet train --preset ''\n"
        "t alexnet prepare ''\n"
        "t alexnet prepare folder --stor\n"
        "t alexnet prepare folder --storage ''\n"
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "train"
    assert lines[1] == "--preset"
    assert lines[2].split() == [
        "paper",
        "paper-steps",
        "small",
        "quick",
        "demo",
        "ablations",
        "finetune",
    ]
    assert lines[3].split()[:5] == ["imagenet", "folder", "fashion-mnist", "cifar10", "verify"]
    assert lines[4] == "--storage" and lines[5].split() == ["jpeg", "raw"]
