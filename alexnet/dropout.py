"""Dropout (PAPER C1) with a cheaper mask on the CPU.

``torch.nn.Dropout`` draws its mask with ``bernoulli_``, which on the CPU makes one draw of
the generator per unit through a slow per-element path: forward+backward of one fc6 output
of the paper's net (128 x 4096, bf16) took 6.7-7.7 ms with it, 0.36 ms with the mask built
from 64-bit draws (docs/RESULTS.md, "The training step's parts"). ``Dropout`` keeps
``nn.Dropout``'s interface and its function, inverted dropout (train: zero each unit with
probability p, scale the rest by 1/(1-p); eval: identity), and builds the mask
itself in training on the CPU:

- p = 0.5, the paper's value: each unit takes one bit of the generator's 64-bit draws.
- any other p: keep a unit where a uniform draw in [0, 1) is >= p (``torch.rand``: 2.5 ms
  at p = 0.3 in the same log entry).

Both draw from the CPU generator that ``torch.manual_seed`` seeds and checkpoints save, so
runs stay reproducible and resumable; the stream differs from ``bernoulli_``'s. On other
devices, under torch.compile and in eval mode it is ``nn.Dropout`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_BIT = torch.arange(8, dtype=torch.uint8)[:, None]  # bit positions within a byte


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """A CPU tensor of ``shape`` and ``dtype`` holding 1/(1-p) where a unit is kept and 0
    where it is dropped; each unit is dropped with probability ``p``, independently."""
    n = shape.numel()
    if p == 0.5:
        words = torch.empty((n + 63) // 64, dtype=torch.int64).random_(-(2**63), None)
        # (8, bytes): row i holds bit i of every byte (the long dimension innermost keeps
        # the shifts vectorised); 0 or 1 per unit, shifted once more to 0 or 2 = 1/(1-p)
        bits = words.view(torch.uint8)[None, :].bitwise_right_shift(_BIT).bitwise_and_(1)
        return bits.view(-1)[:n].bitwise_left_shift(1).to(dtype).view(shape)
    keep = torch.rand(shape).ge_(p)  # 1.0 or 0.0 (float32: exact for p in [0, 1))
    return keep.mul_(1.0 / (1.0 - p)).to(dtype)


class Dropout(nn.Dropout):
    """``torch.nn.Dropout(p)`` (PAPER C1: p = 0.5), with ``keep_mask`` in CPU training."""

    def forward(self, x: Tensor) -> Tensor:
        fast = self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu"
        if not fast or torch.compiler.is_compiling():
            return super().forward(x)
        mask = keep_mask(x.shape, self.p, x.dtype)
        return x.mul_(mask) if self.inplace else x * mask
