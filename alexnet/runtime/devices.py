"""Where tensors live and in what precision: the one place that decides devices.

Every command asks ``pick_device`` for its device (a clear error where it is missing),
moves batches with ``to_device`` (asynchronous copies only from pinned memory to CUDA),
creates its accumulators with ``zeros`` on that device, and runs the model under
``autocast``. Nothing else in the package names ``cuda`` to decide anything, so a CPU test
that follows these helpers with fake CUDA tensors (tests/test_devices.py) covers the CUDA
path's device logic.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from alexnet.runtime.errors import UserError


def pick_device(requested: str, local_rank: int = 0, *, name: str = "--device") -> torch.device:
    """``auto``: CUDA if present, else CPU. ``cuda`` under torchrun takes GPU LOCAL_RANK.
    ``name``: the flag or setting the request came from, for the error message."""
    requested = str(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{name} {requested}: CUDA is not available on this machine")
        index = int(requested.split(":")[1]) if ":" in requested else local_rank
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UserError(f"{name} {requested}: only {count} CUDA devices here")
        return torch.device("cuda", index)
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"{name} {requested}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{name} {requested}: MPS is not available on this machine")
    return device


def pin_memory(device: torch.device) -> bool:
    """Pinned host memory pays only when batches are copied to a CUDA device."""
    return device.type == "cuda"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; asynchronous where the copy can overlap compute (pinned -> CUDA)."""
    return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())


def zeros(*shape: int, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An accumulator on ``device`` (sums over an epoch, counts), so that adding device
    tensors into it never crosses devices and all-reduce gets a tensor NCCL can take."""
    return torch.zeros(shape, dtype=dtype, device=device)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device``: the device-side augmentation draws its crops, flips
    and colour noise on the device of the images, and CUDA kernels take CUDA generators."""
    return torch.Generator(device=device).manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: without them oneDNN emulates bf16 and it is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``, ``fp32`` or ``bf16`` as what runs: ``"bf16"`` or ``"fp32"``. One meaning of
    ``auto`` for every command, training and inference alike: bf16 where the device computes
    it natively (CUDA devices that support it; CPUs with AMX or AVX512-BF16), fp32 elsewhere,
    where bf16 is emulated and slower than fp32 (docs/TRAINING.md). Inference under ``auto``
    also checks bf16's top-1 against fp32 on the first batch (``alexnet.interop.engines``).
    ``bf16`` asked for by name runs on any CPU and on bf16-capable GPUs."""
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if precision == "bf16":
            raise UserError(f"precision bf16: {torch.cuda.get_device_name(device)} lacks bf16")
        return "fp32"
    if device.type == "cpu":
        return "bf16" if precision == "bf16" or cpu_has_native_bf16() else "fp32"
    if precision == "bf16":
        raise UserError(f"precision bf16: not supported on {device}")
    return "fp32"


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``resolve_precision``, or None for fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on ``device`` in ``dtype``; None runs fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def determinism(deterministic: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels (bitwise-repeatable runs and resumes) or, on CUDA, cuDNN's
    autotuner (fixed input shapes: it picks the fastest kernels), for the block only: both
    settings are global, and a library must leave them as it found them."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
