"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _alexnet_home(tmp_path, monkeypatch):
    """Each test has a cache home of its own ($ALEXNET_HOME: weights, dataset caches, the
    engines' per-machine timings): nothing is read from or written to the user's."""
    monkeypatch.setenv("ALEXNET_HOME", str(tmp_path / "alexnet-home"))


@pytest.fixture
def one_thread():
    """Tiny convolutions are fastest (and least disturbed by a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kib)``: a real filesystem of that size (a tmpfs, which needs root to
    mount: skipped where mounting is not allowed); ``small_disk.resize(path, kib)`` grows it,
    as a user freeing space would. Unmounted at the end."""
    import subprocess

    mounts = []

    def make(kib: int):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
        mounts.append(path)
        return path

    def resize(path, kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(path)], check=True)

    make.resize = resize
    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# the loopback weight server and test weight sets (tests/weightkit.py), for every test module
from weightkit import registered, server  # noqa: E402, F401
