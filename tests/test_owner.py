"""One writer per run, per prepared dataset and per output (alexnet/runtime/owner.py), and
temp files that only their dead writers' runs clean up (alexnet/runtime/fileio.py). The
other process is a real one: a child that holds the lock, or two commands started at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from trainkit import tiny_config, tiny_data

from alexnet import train as T
from alexnet.cli import main
from alexnet.runtime import fileio
from alexnet.runtime.errors import UserError
from alexnet.runtime.owner import owned
from alexnet.runtime.runlog import claim_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")

HOLD = """
import sys, time
from pathlib import Path
from alexnet.runtime.owner import owned
with owned(Path(sys.argv[1]), directory=sys.argv[2] == "1"):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def held_elsewhere(path: Path, directory: bool = True):
    """Another process owns ``path`` for the block; yields that process."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), "1" if directory else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith(f"alexnet {command}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "tiny")


def test_a_second_owner_is_refused_with_the_holder_named(tmp_path):
    with held_elsewhere(tmp_path / "d") as holder:
        with pytest.raises(UserError, match=rf"in use by process {holder.pid} on "):
            with owned(tmp_path / "d", what="thing"):
                pass


def test_a_waiting_owner_gets_it_when_the_holder_ends(tmp_path, capsys):
    with held_elsewhere(tmp_path / "d") as holder:
        threading.Timer(1.0, holder.kill).start()
        t0 = time.monotonic()
        with owned(tmp_path / "d", wait=True):
            assert time.monotonic() - t0 > 0.5
    assert "waiting for it" in capsys.readouterr().err


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    with held_elsewhere(tmp_path / "d") as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with owned(tmp_path / "d"):  # at once: the kernel dropped the lock with its holder
            pass


def test_ownership_nests_in_one_process_and_an_unused_directory_goes(tmp_path):
    with owned(tmp_path / "new"):
        with owned(tmp_path / "new"):  # a command calling a library writer of the same thing
            pass
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()  # made here, nothing written into it
    (tmp_path / "kept").mkdir()
    with owned(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir()


def test_training_a_run_another_process_owns_is_refused(data, tmp_path, capsys):
    run = tmp_path / "twin"
    argv = ["train", "--preset", "quick", "--data", str(data), "--out", str(tmp_path)]
    argv += ["--batch-size", "16"]
    with held_elsewhere(run) as holder:
        assert main([*argv, "--name", "twin"]) == 2
        line = _one_error_line(capsys.readouterr().err, "train")
        assert f"this run is in use by process {holder.pid}" in line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written


def test_resuming_a_run_another_process_owns_is_refused(data, tmp_path, capsys):
    T.train(tiny_config(data, tmp_path, **{"schedule.epochs": 1}))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with held_elsewhere(tmp_path / "run") as holder:
        assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 2
        assert f"in use by process {holder.pid}" in _one_error_line(
            capsys.readouterr().err, "train"
        )
    assert last.read_bytes() == before


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "alexnet",
        "train",
        "--preset",
        "quick",
        "--data",
        str(data),
        "--out",
        str(out),
        "--precision",
        "fp32",
        "--epochs",
        "2",
        "--set",
        "model.widths=8,16,16,16,16",
        "--set",
        "model.fc_width=32",
        "--batch-size",
        "16",
        *extra,
    ]


@pytest.mark.slow  # two processes that import torch and train: ~10 s on 2 cores
def test_two_trainings_of_one_named_run_started_together(data, tmp_path):
    """Both used to say "finished" while one run's checkpoints were silently lost. Now one
    trains, the other is refused in one line (in use, or: a run is already there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _train_cmd(data, tmp_path, "--name", "twin")
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    line = _one_error_line(err, "train")
    assert "is in use by process" in line or "a run is already there" in line, line
    from alexnet.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "twin" / "checkpoints" / "last.pt")
    assert ck["finished"] and ck["epoch"] == 2


def test_unnamed_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    paths = [claim_run_dir(tmp_path, "", "quick") for _ in range(3)]
    assert len(set(paths)) == 3 and all(p.is_dir() for p in paths)


def test_preparing_a_directory_another_process_owns_is_refused(tmp_path, capsys):
    from datagen import make_folder_tree

    make_folder_tree(tmp_path / "tree", ["a", "b"], per_class=2)
    out = tmp_path / "out"
    with held_elsewhere(out) as holder:
        argv = ["prepare", "folder", "--train", str(tmp_path / "tree"), str(out)]
        assert main([*argv, "--size", "16", "--workers", "1"]) == 2
        line = _one_error_line(capsys.readouterr().err, "prepare")
        assert f"this prepared dataset is in use by process {holder.pid}" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def _temp_of(target: Path, pid: int) -> Path:
    tmp = target.with_name(f".{target.name}.{fileio._host()}.{pid}-x1y2z3.tmp")
    tmp.write_bytes(b"half a file")
    return tmp


def test_only_a_dead_writers_temp_files_are_removed(data, tmp_path):
    """RunLog cleans the run directory when a run starts again; it used to delete every
    hidden temp file there, another live process's too."""
    T.train(tiny_config(data, tmp_path, **{"schedule.epochs": 1}))
    run = tmp_path / "run"
    with held_elsewhere(tmp_path / "other") as live:
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout.strip()
        kept = _temp_of(run / "results.json", live.pid)  # e.g. `evaluate --results` writing
        gone = _temp_of(run / "checkpoints" / "last.pt", int(dead))
        legacy = run / ".config.json.abcd1234.tmp"  # named before temps carried their writer
        legacy.write_bytes(b"x")
        T.train(tiny_config(data, tmp_path, **{"schedule.epochs": 2}), resume=run)
        assert kept.exists() and not gone.exists() and not legacy.exists()


def test_a_rewrite_removes_what_a_killed_writer_of_that_file_left(tmp_path):
    """`convert torchvision` killed mid-write left a hidden temp file as large as the
    checkpoint, which no rerun removed: every atomic write of a file now first removes the
    temp files its dead writers left (of that file only)."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    left = _temp_of(tmp_path / "owt.pt", int(dead))
    other = _temp_of(tmp_path / "another.pt", int(dead))
    fileio.atomic_write_bytes(tmp_path / "owt.pt", b"done")
    assert not left.exists() and other.exists()
    assert (tmp_path / "owt.pt").read_bytes() == b"done"


FORKS = """
import os, sys, time
from pathlib import Path
from alexnet.runtime.owner import owned
with owned(Path(sys.argv[1])):
    if os.fork() == 0:  # a child, as a data loader's worker is: lives on for a while
        time.sleep(30)
        os._exit(0)
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_killed_owners_forked_children_do_not_keep_it(tmp_path):
    """A training killed with SIGKILL left its data-loader workers alive for a moment; they
    shared its lock (flock), and the resume that followed was refused as 'in use'."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKS, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    with owned(tmp_path / "run"):  # at once, while the forked child still sleeps
        pass
