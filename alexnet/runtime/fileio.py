"""Atomic writes: a reader never sees a half-written file, and a crash or a full disk while
writing leaves the previous version intact (temp file in the same directory + ``os.replace``).

A temp file is named after its target, its host and its process
(``.<name>.<host>.<pid>-<random>.tmp``), so the temp files a killed writer left can be told
from those of a live one: ``remove_stale_temps`` removes only the former, and every atomic
write removes what a dead writer of the same file left before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


@functools.cache
def _host() -> str:
    """This machine, as 8 hex digits (a host name may hold dots and be long)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def temp_prefix(path: Path) -> str:
    """The start of the name of every temp file this process writes for ``path``."""
    return f".{path.name}.{_host()}.{os.getpid()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _stale(tmp: Path) -> bool:
    """A temp file whose writer is gone: one of this host whose process has ended, or one
    named before temp files carried their writer. One of another host is left alone (its
    writer may be alive there)."""
    m = _TEMP.match(tmp.name)
    if m is None:
        return True
    return m["host"] == _host() and not process_alive(int(m["pid"]))


@functools.cache
def _cleaned(directory: Path, name: str) -> bool:
    """Remove the temp files dead writers left for ``directory/name``, once per process."""
    with contextlib.suppress(OSError):
        for tmp in directory.glob(f".{glob_escape(name)}.*.tmp"):
            if _stale(tmp):
                tmp.unlink(missing_ok=True)
    return True


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On any exception (including ``OSError: No space left on device``) the temporary file is
    removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _cleaned(path.parent.resolve(), path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            # a failed write() names no file: say which one could not be written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_open`` (and ``link_or_copy``) leave behind when
    a process is killed mid-write: hidden ``.<name>.*.tmp`` files, each up to the size of the
    file it was to replace, whose writer is no longer running (a live writer's are kept).
    Call it where a run or a preparation starts again. Returns the files removed."""
    folder = Path(directory)
    found = sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []
    removed = []
    for tmp in found:
        if _stale(tmp):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


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


class _Writes:
    """A file object's ``write`` that remembers the ``OSError`` it raised: ``torch.save``
    reports a failed write (a full disk) as a ``RuntimeError`` of its own, which loses the
    errno that tells a full disk from a bug."""

    def __init__(self, f: IO) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically; a write that fails is an ``OSError`` (with its
    errno, e.g. ENOSPC), whatever torch made of it."""
    import torch

    with atomic_open(path, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(obj, writes)
        except RuntimeError as e:
            if writes.error is not None:
                raise writes.error from e
            raise


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
