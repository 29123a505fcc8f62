"""torch.distributed for training: one process is the world-size-1 case of the same code.

``DistEnv.from_environ()`` reads the variables ``torchrun`` sets (RANK, WORLD_SIZE,
LOCAL_RANK) once; ``setup`` picks the device and opens the process group (NCCL on CUDA,
gloo on CPU); the helpers below are no-ops in a single process, so the training loop has
no ``if distributed`` branches. The device-level settings every process makes the same way
(autocast dtype, determinism, stop signals) live here too.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from alexnet.runtime.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        try:
            rank = int(env.get("RANK", "0"))
            world = int(env.get("WORLD_SIZE", "1"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError as e:
            raise UserError(f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK ({e})") from None
        if not 0 <= rank < world:
            raise UserError(f"torchrun environment: RANK={rank} outside WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(env: DistEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Open the process group (once); NCCL for CUDA, gloo for CPU. Rendezvous comes from
    MASTER_ADDR / MASTER_PORT, as torchrun sets them. A collective that waits longer than
    ``timeout_s`` for a frozen rank fails (torch's default would wait 30 minutes)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )


def teardown() -> None:
    """Close the process group, and free it now. DDP's wrapper sits in reference cycles and
    holds the group: left to the interpreter's exit, gloo's threads can be destroyed while
    still joinable, and the process aborts ("terminate called without an active exception")
    after a finished run. The caller drops its own references first."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (e.g. loss sums and correct counts)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (stop requests, for one)."""
    t = torch.full((1,), int(flag), device=device)  # filled there: no copy from the host
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the run directory name, for one)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (per-rank RNG states)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StopRequest:
    """A request to stop: Ctrl-C, SIGTERM (a scheduler preempting or cancelling the job) or
    SIGUSR1 (a scheduler's warning before the time limit, ``sbatch --signal=USR1@300``) sets
    ``requested``; the training loop then finishes its step, saves a checkpoint and ends
    (``alexnet train`` exits with 130, which recipes/paper-slurm.sbatch takes as "requeue").
    A second Ctrl-C raises KeyboardInterrupt at once (the last checkpoint is whole: writes
    are atomic); a second SIGTERM or SIGUSR1 changes nothing (the save is under way).
    Outside the main thread (where signals cannot be caught) ``watch`` does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, announce: bool = True) -> None:
        self.requested, self.announce = False, announce

    def _handler(self, signum, frame) -> None:  # noqa: ANN001 - signal's signature
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        if self.announce:
            name = signal.Signals(signum).name
            print(
                f"\nstopping ({name}): saving a checkpoint after this step (Ctrl-C again to "
                "quit now)",
                flush=True,
            )

    @contextlib.contextmanager
    def watch(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
