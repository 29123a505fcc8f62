"""``alexnet completion``: shell completion of commands, sub-commands, options and their
choices, written out from the commands' own argument parsers.

    eval "$(alexnet completion bash)"          # in ~/.bashrc
    autoload -U bashcompinit && bashcompinit   # zsh, then the same line in ~/.zshrc

The script is static (no Python runs while you type): print it again after an upgrade.
"""

from __future__ import annotations

import argparse
import importlib
import shlex


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]], dict]:
    """(option strings, {option: its choices}, {sub-command: its parser})."""
    options, choices, subs = [], {}, {}
    for action in parser._actions:  # argparse's own listing of what a parser takes
        if isinstance(action, argparse._SubParsersAction):
            subs.update(action.choices)
        for flag in action.option_strings:
            options.append(flag)
            if action.choices:
                choices[flag] = [str(c) for c in action.choices]
    return options, choices, subs


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from alexnet.cli import COMMANDS

    out = {}
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"alexnet {name}")
        importlib.import_module(module).add_arguments(parser)
        out[name] = parser
    return out


def bash_script() -> str:
    """The bash (and zsh, through bashcompinit) completion function for ``alexnet``."""
    words, values, nested = {}, {}, []
    for name, parser in _parsers().items():
        options, choices, subs = _options(parser)
        words[name] = list(subs) or options
        values.update({f"{name}|{flag}": c for flag, c in choices.items()})
        if subs:
            nested.append(name)
        for sub, sp in subs.items():
            sub_options, sub_choices, _ = _options(sp)
            words[f"{name} {sub}"] = sub_options
            values.update({f"{name} {sub}|{flag}": c for flag, c in sub_choices.items()})

    def case(key: str, reply: list[str]) -> str:
        return f"        {shlex.quote(key)}) words={shlex.quote(' '.join(reply))} ;;"

    commands = [k for k in words if " " not in k]
    return "\n".join(
        [
            "# alexnet: bash completion, written by `alexnet completion bash`",
            "_alexnet() {",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
            '    local cmd="${COMP_WORDS[1]}" at="${COMP_WORDS[1]}" words=""',
            '    if [ "$COMP_CWORD" -eq 1 ]; then',
            f'        COMPREPLY=($(compgen -W "{" ".join(commands)} --help --version" -- "$cur"))',
            "        return",
            "    fi",
            f'    case "$cmd" in {"|".join(nested)})',
            '        [ "$COMP_CWORD" -gt 2 ] && at="$cmd ${COMP_WORDS[2]}" ;;',
            "    esac",
            '    case "$at|$prev" in',
            *(case(k, v) for k, v in values.items()),
            "    esac",
            '    if [ -n "$words" ]; then',
            '        COMPREPLY=($(compgen -W "$words" -- "$cur")); return',
            "    fi",
            '    case "$at" in',
            *(case(k, v) for k, v in words.items()),
            "    esac",
            '    if [[ "$cur" == -* || "$at" == "$cmd" && " '
            + " ".join(nested)
            + ' " == *" $cmd "* ]]',
            "    then",
            '        COMPREPLY=($(compgen -W "$words --help" -- "$cur"))',
            "    else",
            '        COMPREPLY=($(compgen -f -- "$cur"))',
            "    fi",
            "}",
            "complete -o filenames -F _alexnet alexnet",
            "",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "shell",
        choices=("bash", "zsh"),
        help="bash; zsh reads the same script after `autoload -U bashcompinit && bashcompinit`",
    )


def run(args: argparse.Namespace) -> int:
    print(bash_script(), end="")
    return 0
