"""The C allocator's treatment of large tensors (glibc only).

By default glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB
on 64-bit) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each large
activation of a forward pass costs page faults that the kernel zero-fills again on every
call; freed heap above the trim threshold goes back to the kernel too. ``keep_freed_memory``
raises both thresholds with ``mallopt``, so freed tensors stay in the process and are reused,
as jemalloc and tcmalloc (which torch's CPU launcher preloads) do. The CLI calls it once at
start; ``ALEXNET_MALLOC=default`` (or the user's own ``GLIBC_TUNABLES`` malloc setting)
leaves glibc as it is. ``alexnet bench --allocator`` measures the effect side by side.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEPT = 1 << 30  # bytes; mallopt takes an int, and no tensor here comes near 1 GiB
# The values the default dynamic thresholds reach after the first large free (64-bit glibc).
DEFAULT_MMAP, DEFAULT_TRIM = 32 << 20, 64 << 20


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def user_chose() -> bool:
    """The user set the allocator up themselves (or asked for glibc's default)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return os.environ.get("ALEXNET_MALLOC") == "default" or "glibc.malloc." in tunables


def keep_freed_memory(keep: bool = True) -> bool:
    """Keep (``keep``) or return (glibc's default behaviour for large blocks) freed memory.
    Returns whether glibc accepted the setting; False off glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mmap, trim = (KEPT, 2 * KEPT - 1) if keep else (DEFAULT_MMAP, DEFAULT_TRIM)
    return bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def tune_at_start() -> str:
    """The CLI's setting, before torch allocates: a short description of what is in force."""
    if user_chose():
        return "as configured by the environment"
    if keep_freed_memory(True):
        return "glibc, freed memory kept (mallopt mmap/trim thresholds 1 GiB)"
    return "the platform's default"
