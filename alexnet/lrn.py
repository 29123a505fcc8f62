"""Local response normalisation (PAPER A8), exact and cheap.

    b_i = a_i / (k + c * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2) ** beta

over the channel dimension of an (N, C, H, W) activation. ``convention="code"`` uses
c = alpha / n, as the authors' released code, Caffe and ``torch.nn.LocalResponseNorm`` do
(this produced the paper's numbers, PAPER A8, H1); ``convention="printed"`` uses c = alpha as
printed in the paper.

Why a custom implementation: ``torch.nn.LocalResponseNorm`` pads, reshapes to 5-D and calls
``avg_pool3d``, and autograd then differentiates every one of those steps, so the window sum
is computed again for the backward pass and several full-size temporaries are kept. Here the
window sum S is computed once in the forward pass (on CPU a product with a banded 0/1
matrix, run as a 1x1 convolution for channels_last; a few shifted adds elsewhere), the
forward saves p = d^-beta and r = b/d with d = k + c*S, and the backward pass is

    dL/da_i = g_i * p_i - 2 * c * beta * a_i * sum_{j in window(i)} g_j * r_j

(for odd n the window is symmetric, so the same window sum serves both passes). On CPU both
passes walk the batch in cache-sized slices.
Reductions run in float32 for bfloat16/float16 inputs; the output has the input's dtype and
memory format.
See docs/SPEED.md for how it is made fast and docs/RESULTS.md for the alternatives measured.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONVENTIONS = ("code", "printed")


def _scale(size: int, alpha: float, convention: str) -> float:
    """The c multiplying the window sum (PAPER A8)."""
    if convention == "code":
        return alpha / size
    if convention == "printed":
        return alpha
    raise ValueError(f"LRN convention must be one of {CONVENTIONS}, got {convention!r}")


def _check(x: Tensor, size: int, groups: int = 1) -> None:
    if x.dim() != 4:
        raise ValueError(f"LRN expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"LRN size must be >= 1, got {size}")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"LRN groups={groups} does not divide the {x.shape[1]} channels")


def _window(size: int) -> tuple[int, int]:
    """Channels before and after i in the window. For odd n this is n/2 on each side
    (PAPER A8); for even n it matches torch.nn.LocalResponseNorm (one more before)."""
    return size // 2, (size - 1) // 2


def band_matrix(channels: int, before: int, after: int, groups: int = 1, **kw) -> Tensor:
    """(C, C) 0/1 matrix B with B[j, i] = 1 iff channel j is in the window of channel i."""
    i = torch.arange(channels, device=kw.get("device"))
    width = channels // groups
    offset = i[None, :] - i[:, None]  # i - j
    same_group = (i[:, None] // width) == (i[None, :] // width)
    return (same_group & (offset <= before) & (-offset <= after)).to(kw.get("dtype"))


def _matmul_ok(t: Tensor) -> bool:
    cl = t.is_contiguous(memory_format=torch.channels_last)
    return t.device.type == "cpu" and (t.is_contiguous() or cl)


def _scaled_band(channels: int, before: int, after: int, groups: int, scale: float, device, dtype):
    """``scale`` times ``band_matrix``."""
    band = band_matrix(channels, before, after, groups, device=device, dtype=dtype)
    return band * scale if scale != 1.0 else band


def _band_kernel(band: Tensor, groups: int = 1) -> Tensor:
    """``band`` as the weight of a 1x1 convolution in ``groups`` groups, (C, C/groups, 1, 1):
    out[:, i] = sum_j w[i, j] t[:, j] over the j of i's group. Grouped (the towers' LRN, PAPER
    A12), the zeros between groups are not multiplied."""
    channels = band.shape[0]
    width = channels // groups
    blocks = [
        band[g * width : (g + 1) * width, g * width : (g + 1) * width].T for g in range(groups)
    ]
    return torch.cat(blocks)[:, :, None, None]


def _band_sum(t: Tensor, band: Tensor, kernel: Tensor, bias: Tensor | None = None) -> Tensor:
    """t's channels times the (C, C) matrix ``band``: out[:, i] = sum_j t[:, j] * band[j, i]
    (+ bias[i]), for an NCHW or channels_last tensor; the result has t's layout. ``kernel``:
    ``_band_kernel(band, groups)``, made once by the caller for many calls. The bias rides in
    the convolution (one pass over the result fewer than adding it afterwards).

    channels_last: a 1x1 convolution, which torch hands to oneDNN; as a matrix product the
    same sum goes to torch's BLAS, which on some CPUs runs far below their vector width (an
    AMD CPU with AVX-512, under MKL: 190 against 350-390 GFLOP/s, docs/RESULTS.md). NCHW: a
    batched matrix product (oneDNN reorders to channels-last and back: 1.7x and 3.7x slower
    at the sizes of the paper's two LRN layers)."""
    n, channels, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return F.conv2d(t, kernel, bias, groups=channels // kernel.shape[1])
    out = (band.T @ t.reshape(n, channels, h * w)).view(n, channels, h, w)
    return out if bias is None else out.add_(bias[:, None, None])


def window_sum(
    t: Tensor, before: int, after: int, groups: int = 1, method: str = "auto", scale: float = 1.0
) -> Tensor:
    """scale * sum_{j=max(lo,i-before)}^{min(hi,i+after)} t_j along dim 1, where [lo, hi] is
    the block of C/groups channels holding i (the whole of dim 1 if groups=1).

    ``"matmul"``: one GEMM with the banded matrix (C*2C flops per element but one pass; the
    fastest on CPU, see docs/SPEED.md). ``"shift"``: before+after shifted in-place adds
    (exact, any layout; used on GPU, where memory bandwidth is plentiful and TF32 could round
    a matmul). ``"auto"``: matmul on CPU for NCHW or channels_last tensors, shift otherwise."""
    channels = t.shape[1]
    if method == "auto":
        method = "matmul" if _matmul_ok(t) else "shift"
    if method == "matmul":
        band = _scaled_band(channels, before, after, groups, scale, t.device, t.dtype)
        return _band_sum(t, band, _band_kernel(band, groups))
    out = t.clone(memory_format=torch.preserve_format)
    width = channels // groups
    for g in range(groups):
        src, dst = t[:, g * width : (g + 1) * width], out[:, g * width : (g + 1) * width]
        for s in range(1, min(before, width - 1) + 1):
            dst[:, s:] += src[:, :-s]
        for s in range(1, min(after, width - 1) + 1):
            dst[:, :-s] += src[:, s:]
    return out.mul_(scale) if scale != 1.0 else out


def _acc_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs accumulate the window sum and the power in float32.
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


def _neg_pow(d: Tensor, beta: float, out: Tensor | None = None) -> Tensor:
    """d ** -beta; beta = 0.75 (the paper's value) as d^-1/2 / d^-1/4 = rsqrt(d) / rsqrt(rsqrt(d)):
    on CPU 94 us for 245,760 floats against 119 for rsqrt(d * sqrt(d)) (torch's sqrt costs
    two rsqrts; docs/RESULTS.md, 2026-12-02), and pow measured 9x slower than rsqrt
    (2026-12-01); within 3e-7 of the float64 power."""
    if beta == 0.75:
        t = torch.rsqrt(d)
        return torch.div(t, torch.rsqrt(t), out=out)
    return torch.pow(d, -beta, out=out)


# On CPU the batch is normalised a slice at a time, each slice about this many elements, so
# that the half-dozen temporaries of one slice stay in the core's caches instead of making
# full passes over memory (docs/RESULTS.md, 2026-12-01: 2.3x and 2.1x on the demo's and the
# paper's first LRN layer, with the r-form backward).
CPU_CHUNK_ELEMENTS = 1 << 18


def _batch_slices(x: Tensor) -> list[slice]:
    n = x.shape[0]
    if x.device.type != "cpu" or n == 0:
        return [slice(0, n)]
    step = max(1, CPU_CHUNK_ELEMENTS // max(1, x[0].numel()))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _window_summer(
    x: Tensor, before: int, after: int, groups: int, scale: float, dtype, k: float = 0.0
):
    """k + scale * the window sum (``window_sum``) for slices of ``x``, chosen and set up once
    per pass: the banded GEMM (its matrix built here) on CPU for NCHW or channels_last tensors,
    shifted adds otherwise."""
    if _matmul_ok(x):
        band = _scaled_band(x.shape[1], before, after, groups, scale, x.device, dtype)
        kernel = _band_kernel(band, groups)
        bias = torch.full((x.shape[1],), k, device=x.device, dtype=dtype) if k else None
        return lambda t: _band_sum(t, band, kernel, bias)

    def summed(t: Tensor) -> Tensor:
        s = window_sum(t, before, after, groups, "shift", scale)
        return s.add_(k) if k else s

    return summed


def _no_autocast(device: torch.device):
    """Autocast off for the block, on devices that have it (the meta device, which shape
    inference and the device tests use, has none)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _LRNFunction(torch.autograd.Function):
    """Forward computes the window sum once and saves p = d^-beta and r = b / d (d = k + c*S,
    b the output), so that the backward pass is three element-wise steps and one window sum:

        dL/da = g * p - 2*c*beta * a * W(g * r),   W = the mirrored window sum

    (for odd n the window is symmetric, so W is the forward's window)."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, c: float, beta: float, k: float, groups: int):
        acc_dtype = _acc_dtype(x)
        denominator = _window_summer(x, *_window(size), groups, c, acc_dtype, k)  # k + c*S
        y = torch.empty_like(x)
        p = torch.empty_like(x, dtype=acc_dtype)
        r = torch.empty_like(x, dtype=acc_dtype)
        # Autocast would run the window-sum GEMM in bf16; the sums stay in float32.
        with _no_autocast(x.device):
            for sl in _batch_slices(x):
                a = x[sl].to(acc_dtype)
                sq = a * a
                d = denominator(sq)  # k + c*S > 0
                pp = _neg_pow(d, beta, out=p[sl])
                b = torch.mul(a, pp, out=sq)
                torch.div(b, d, out=r[sl])
                y[sl] = b
        ctx.save_for_backward(x, p, r)
        ctx.size, ctx.c, ctx.beta, ctx.groups = size, c, beta, groups
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, p, r = ctx.saved_tensors
        # sum over the j whose window holds i: the mirrored window (the same for odd n)
        after, before = _window(ctx.size)
        summed = _window_summer(x, before, after, ctx.groups, 2 * ctx.c * ctx.beta, p.dtype)
        if _matmul_ok(x):  # the GEMM needs g * r in x's layout
            fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
            g = g.contiguous(memory_format=fmt)
        grad = torch.empty_like(x)
        with _no_autocast(x.device):
            for sl in _batch_slices(x):
                gf = g[sl].to(p.dtype)
                u = gf * r[sl]
                t = summed(u)
                gp = torch.mul(gf, p[sl], out=u)  # g * d^-beta
                grad[sl] = gp.addcmul_(x[sl], t, value=-1)
        return grad, None, None, None, None, None


def lrn_formula(
    x: Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    convention: str = "code",
    groups: int = 1,
) -> Tensor:
    """The same function as plain differentiable torch ops (autograd derives the backward).

    Pure and functional, so torch.compile can fuse it into one kernel per pass; also the
    path for double backward."""
    _check(x, size, groups)
    c = _scale(size, alpha, convention)
    before, after = _window(size)
    acc = x.to(_acc_dtype(x))
    width = x.shape[1] // groups
    sq = (acc * acc).unflatten(1, (groups, width))  # N, G, C/G, H, W
    sq = torch.nn.functional.pad(sq, (0, 0, 0, 0, before, after))  # zeros outside each group
    s = sq[:, :, 0:width]
    for i in range(1, size):
        s = s + sq[:, :, i : i + width]
    return (acc * _neg_pow(k + c * s.flatten(1, 2), beta)).to(x.dtype)


def local_response_norm(
    x: Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    convention: str = "code",
    groups: int = 1,
) -> Tensor:
    """LRN over channels of an (N, C, H, W) tensor (PAPER A8); see the module docstring.

    ``groups`` > 1 normalises each block of C/groups channels on its own (the two towers of
    PAPER A12 each normalise their own maps, as the authors' two-GPU net did)."""
    _check(x, size, groups)
    c = _scale(size, alpha, convention)
    if torch.compiler.is_compiling():
        # Under torch.compile the plain formula lets inductor fuse LRN with the ReLU before it
        # and derive a fused backward; the custom Function would be an opaque island.
        return lrn_formula(x, size, alpha, beta, k, convention, groups)
    return _LRNFunction.apply(x, size, c, beta, k, groups)


def reference_lrn(
    x: Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    convention: str = "code",
    groups: int = 1,
) -> Tensor:
    """The formula of PAPER A8 written out, in float64 with an explicit channel loop.

    Slow; for tests only. Differentiable, so it is also the reference for gradients."""
    _check(x, size, groups)
    c = _scale(size, alpha, convention)
    before, after = _window(size)
    a = x.to(torch.float64)
    channels = a.shape[1]
    width = channels // groups
    out = []
    for i in range(channels):
        first, last = (i // width) * width, (i // width + 1) * width - 1  # i's group
        lo, hi = max(first, i - before), min(last, i + after)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        out.append(a[:, i] / (k + c * s) ** beta)
    return torch.stack(out, dim=1)


class LocalResponseNorm(nn.Module):
    """``LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0, convention="code")``.

    With the defaults this equals ``torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)`` (PAPER A8)
    within float rounding, in less time and memory. No parameters."""

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 2.0,
        convention: str = "code",
        groups: int = 1,
    ) -> None:
        super().__init__()
        _scale(size, alpha, convention)  # validates the convention now, not at first call
        if size < 1 or groups < 1:
            raise ValueError(f"LRN size and groups must be >= 1, got {size}, {groups}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.convention, self.groups = convention, groups

    def forward(self, x: Tensor) -> Tensor:
        return local_response_norm(
            x, self.size, self.alpha, self.beta, self.k, self.convention, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
            f"convention={self.convention!r}"
            + (f", groups={self.groups}" if self.groups > 1 else "")
        )
