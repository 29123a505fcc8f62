"""``alexnet prepare`` killed with SIGKILL (no clean-up code runs) at the moments that leave
the most behind, and at random moments: every rerun resumes or finishes, leaves no temp files
or ``.parts`` behind, and ``verify`` agrees with what is on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datagen import make_folder_tree

from alexnet.data.store import read_stats

ROOT = Path(__file__).resolve().parents[1]

# Runs `alexnet prepare ARGS` in this process with one function replaced by one that
# SIGKILLs the process on its CALL-th call: a real kill at an exactly chosen moment.
KILL_AT = """
import os, signal, sys
from alexnet.cli import main
from alexnet.data import pipeline, prepare
target, attr, call = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = {"pipeline": pipeline, "prepare.shutil": prepare.shutil}[target]
real, calls = getattr(module, attr), []
def killing(*a, **k):
    calls.append(1)
    if len(calls) == call:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(module, attr, killing)
sys.exit(main(["prepare", *sys.argv[4:]]))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _prepare(*args) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "alexnet", "prepare", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())


def _killed_at(target: str, attr: str, call: int, *args) -> None:
    argv = [sys.executable, "-c", KILL_AT, target, attr, str(call), *map(str, args)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == -signal.SIGKILL, run.stderr


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*.tmp")]


def _same(a: Path, b: Path) -> None:
    for name in ("train.bin", "train.index.npy", "train.files.txt", "val.bin", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = read_stats(a), read_stats(b)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    make_folder_tree(tmp / "train", 3, per_class=8)
    make_folder_tree(tmp / "val", 3, per_class=2, seed=1)
    args = ["folder", "--train", tmp / "train", "--val", tmp / "val"]
    opts = ["--size", "32", "--chunk", "4", "--workers", "2"]
    unbroken = tmp / "unbroken"
    start = time.perf_counter()
    assert _prepare(*args, unbroken, *opts).returncode == 0
    return args, opts, unbroken, time.perf_counter() - start


def test_killed_while_concatenating_leaves_no_temp_file_after_the_rerun(tree, tmp_path):
    args, opts, unbroken, _ = tree
    out = tmp_path / "out"
    # The second chunk read of the final concatenation: train.bin's temp file is half written.
    _killed_at("pipeline", "_read_chunk", 2, *args, out, *opts)
    assert [p.name.startswith(".train.bin.") for p in _temp_files(out)] == [True]
    run = _prepare(*args, out, *opts)
    assert run.returncode == 0, run.stderr
    assert "removed 1 temp file(s)" in run.stdout
    assert _temp_files(out) == [] and not (out / ".parts").exists()
    _same(out, unbroken)
    assert _prepare("verify", out).returncode == 0


def test_killed_between_meta_and_removing_the_chunks(tree, tmp_path):
    args, opts, unbroken, _ = tree
    out = tmp_path / "out"
    _killed_at("prepare.shutil", "rmtree", 1, *args, out, *opts)
    assert (out / "meta.json").is_file() and (out / ".parts").is_dir()  # two copies on disk
    run = _prepare("verify", out)
    assert run.returncode == 2 and ".parts" in run.stderr and "run the same prepare" in run.stderr
    run = _prepare(*args, out, *opts)
    assert run.returncode == 0 and "already prepared" in run.stdout
    assert "removed the finished chunks" in run.stdout and not (out / ".parts").exists()
    assert _prepare("verify", out).returncode == 0
    _same(out, unbroken)


@pytest.mark.slow  # four subprocesses at least: ~30 s on a busy 2-core CPU
def test_killed_at_random_moments_always_resumes(tree, tmp_path):
    args, opts, unbroken, took = tree
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    argv = [sys.executable, "-m", "alexnet", "prepare", *map(str, [*args, out, *opts])]
    for _ in range(3):
        proc = subprocess.Popen(
            argv,
            start_new_session=True,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, took))
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its pool workers
        proc.wait()
        if (out / "meta.json").is_file():
            break
    run = _prepare(*args, out, *opts)
    assert run.returncode == 0, run.stderr
    assert _temp_files(out) == [] and not (out / ".parts").exists()
    assert _prepare("verify", out).returncode == 0
    _same(out, unbroken)


def test_a_killed_worker_is_one_error_not_a_hang_and_the_rerun_resumes(tree, tmp_path):
    args, opts, unbroken, _ = tree
    out = tmp_path / "out"
    # Each forked worker kills itself on its second chunk, as the OOM killer would.
    argv = [sys.executable, "-c", KILL_AT, "pipeline", "_process_chunk", "2", *map(str, args)]
    run = subprocess.run(
        [*argv, str(out), *opts], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "a worker process died" in run.stderr.splitlines()[-1]
    run = _prepare(*args, out, *opts)
    assert run.returncode == 0 and "resuming" in run.stdout, run.stderr
    assert _temp_files(out) == [] and not (out / ".parts").exists()
    _same(out, unbroken)
