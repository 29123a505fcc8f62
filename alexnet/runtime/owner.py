"""One writer at a time: a run directory, a prepared dataset, an output file has an owner.

``owned(path)`` holds an advisory lock on a lock file for as long as the block runs, and
writes into the lock file who holds it (process, host, start time, command), so a second
process that wants the same thing is told by whom it is held, in one line, or waits
(``wait=True``, for shared caches where the second process can use what the first makes).
The kernel drops the lock when its holder ends, however it ends (SIGKILL included): a lock
is never stale. It is a POSIX record lock (``lockf``), which belongs to the process and is
not inherited by the processes it forks: a killed training's data-loader workers, which can
outlive it for a moment, do not keep its run locked (``flock``'s lock, shared with forked
children, did). The holder must not open and close the lock file otherwise (that would
release a POSIX lock); only other processes read it. The lock file stays (hidden, a few
bytes): removing it while another process waits on it would let two processes believe they
own the same thing.

- a directory (a run, a prepared dataset, a cache entry): ``<dir>/.lock``;
- a file that a command writes in steps (``features extract --out x.npy``): ``.x.npy.lock``
  beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from alexnet.runtime.errors import UserError

LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # lock files this process holds, and how deeply (nested blocks)


def lock_path(path: Path, directory: bool) -> Path:
    return path / LOCK_NAME if directory else path.with_name(f".{path.name}.lock")


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(["alexnet" if i == 0 else a for i, a in enumerate(sys.argv)])[:300],
    }


def describe_holder(lock: Path) -> str:
    """Who holds ``lock``, as its holder wrote it: ``pid 12 on host, since ...: command``."""
    try:
        h = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h.get("pid"):
        return "another process"
    return f"process {h['pid']} on {h.get('host')} since {h.get('since')} ({h.get('command')})"


@contextlib.contextmanager
def owned(
    path: str | os.PathLike,
    *,
    what: str = "directory",
    directory: bool = True,
    wait: bool = False,
    hint: str = "wait for it to end",
) -> Iterator[Path]:
    """Own ``path`` for the block (creating the directory, or the file's folder). Held
    elsewhere: a ``UserError`` naming the holder (``what`` says what ``path`` is, ``hint``
    what to do), or with ``wait`` a line saying so and a wait for the holder to finish. A
    directory made here that holds nothing else when the block ends is removed again."""
    path = Path(path)
    created = directory and not path.exists()
    (path if directory else path.parent).mkdir(parents=True, exist_ok=True)
    lock = lock_path(path, directory).resolve()
    if lock in _HELD:  # this process owns it already (a command calling a library writer)
        _HELD[lock] += 1
        try:
            yield path
        finally:
            _HELD[lock] -= 1
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"{path}: cannot take ownership of the {what} ({e.strerror})") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # held elsewhere (EAGAIN or EACCES)
            holder = describe_holder(lock)
            if not wait:
                raise UserError(f"{path}: this {what} is in use by {holder}; {hint}") from None
            print(f"{path}: in use by {holder}: waiting for it", file=sys.stderr, flush=True)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        _HELD[lock] = 1
        yield path
    finally:
        if _HELD.pop(lock, None) is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                if created and [p.name for p in path.iterdir()] == [LOCK_NAME]:
                    lock.unlink()  # made here and nothing written: leave no trace
                    path.rmdir()
        os.close(fd)  # releases the lock
