"""Atomic writes: a reader never sees a half-written file, and a crash or a full disk while
writing leaves the previous version intact (temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On any exception (including ``OSError: No space left on device``) the temporary file is
    removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_open`` (and ``link_or_copy``) leave behind when
    a process is killed mid-write: hidden ``.<name>.*.tmp`` files, each up to the size of the
    file it was to replace. Call it where a run or a preparation starts again. Returns them."""
    folder = Path(directory)
    found = sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []
    for tmp in found:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return found


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it for an instant)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 4 MiB pieces."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, create: bool = False) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on ``path``, so other processes entering the same
    block on the same path wait (the ranks of one torchrun, two commands started together).
    ``path`` may be the file or directory the work is about (no lock file is left), or with
    ``create`` a lock file made on first use. A path that cannot be opened is not locked
    (whatever reads it next reports the problem)."""
    if create:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o666)
    except OSError:
        if create:
            raise
        fd = None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
