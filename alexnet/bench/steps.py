"""How a network runs in the benches (``alexnet bench``, the end-to-end timing, the peers):
its settings (precision, memory format, torch.compile, optimizer), its training step and
inference on a fixed batch, and the side-by-side timing of several such steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.bench.memory import PeakMemory
from alexnet.optim import PaperSGD
from alexnet.runtime import devices
from alexnet.runtime.timing import alternating


@dataclass(frozen=True)
class RunSettings:
    """How one network runs: precision (autocast dtype), memory format, torch.compile, and
    its optimizer: ``"sgd"`` torch.optim.SGD as constructed by default (foreach),
    ``"sgd_fused"`` the same with ``fused=True``, ``"paper"`` our PaperSGD (PAPER D1, what
    ``alexnet train`` runs)."""

    precision: str  # "fp32" or "bf16" (autocast)
    channels_last: bool
    compile: bool
    optimizer: str = "sgd"


REFERENCE = RunSettings(precision="fp32", channels_last=False, compile=False)


def _autocast(device: torch.device, precision: str):
    """A contender's precision setting as the one autocast the package uses."""
    return devices.autocast(device, torch.bfloat16 if precision == "bf16" else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(net: nn.Module, s: RunSettings, device, batch: int, size: int, classes: int):
    """Closures for one network and its settings: train step and inference on a fixed batch,
    a train step on a given batch, and the eager training forward (for ``saved_bytes``)."""
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    fwd = torch.compile(net) if s.compile else net
    # SGD with momentum and weight decay (PAPER D1: 0.9, 5e-4), at one constant rate, where
    # torch's form and the paper's agree (alexnet.optim).
    opt = _optimizer(s.optimizer, net.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, net_in_channels(net), size, size, generator=gen).to(device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)

    def train_batch(xb: torch.Tensor, yb: torch.Tensor) -> None:
        net.train()
        with _autocast(device, s.precision):
            loss = F.cross_entropy(fwd(xb.contiguous(memory_format=fmt)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        net.eval()
        with torch.inference_mode(), _autocast(device, s.precision):
            fwd(x)

    def forward_eager() -> torch.Tensor:
        net.train()
        with _autocast(device, s.precision):
            return net(x)

    return (lambda: train_batch(x, y)), infer, train_batch, forward_eager


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    kw = dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)
    if kind == "paper":
        return PaperSGD(params, **kw)
    if kind not in ("sgd", "sgd_fused"):
        raise ValueError(f"unknown optimizer {kind!r}: paper, sgd or sgd_fused")
    return torch.optim.SGD(params, **kw, fused=True if kind == "sgd_fused" else None)


def net_in_channels(net: nn.Module) -> int:
    return next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels


def alternate(
    fns: dict[str, Callable[[], None]],
    rounds: int,
    steps: int,
    batch: int,
    device,
) -> dict[str, float]:
    """Images/s of each fn, timed side by side (``alexnet.runtime.timing``)."""
    seconds = alternating(fns, rounds, steps, sync=lambda: _sync(device))
    return {k: batch / s for k, s in seconds.items()}


def peak_memory(fns: dict[str, Callable[[], None]], device) -> dict[str, float]:
    """MiB at the peak of one untimed call of each fn (``PeakMemory``), after the timing."""
    peaks = {}
    for name, fn in fns.items():
        with PeakMemory(device) as probe:
            fn()
            _sync(device)
        peaks[name] = probe.peak_bytes / 2**20
    return peaks
