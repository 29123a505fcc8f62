"""Memory a benchmark step uses: the peak resident (CPU) or allocated (CUDA) memory while it
runs, and the bytes autograd saves for the backward pass."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch


class PeakMemory:
    """Peak memory while a block runs. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
    process's resident set size sampled every millisecond from /proc/self/statm (getrusage's
    maxrss is a lifetime maximum and cannot separate two networks in one process)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource  # no /proc (macOS): the lifetime maximum is all there is

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.rss())


def saved_activation_bytes(step_forward: Callable[[], torch.Tensor], params) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass, parameters
    excluded: the activation memory of training, exact and independent of the allocator."""
    skip = {p.data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_forward()
    return sum(seen.values())
