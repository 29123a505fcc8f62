"""LRN (PAPER A8) against the float64 formula, torch's own layer, and itself in other layouts."""

from __future__ import annotations

import pytest
import torch

from alexnet.lrn import (
    LocalResponseNorm,
    local_response_norm,
    lrn_formula,
    reference_lrn,
    window_sum,
)

CONVENTIONS = ("code", "printed")


def activations(shape, seed=0, scale=30.0, dtype=torch.float32):
    """Post-ReLU maps large enough that the window sum really changes the output."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).relu() * scale).to(dtype)


def grads_of(fn, x, g):
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("size,groups", [(5, 1), (3, 1), (4, 1), (5, 2)])
@pytest.mark.parametrize("fn", [local_response_norm, lrn_formula])
@pytest.mark.parametrize("channels_last", [False, True])  # the window sum: matmul / 1x1 conv
def test_gradcheck_float64(convention, size, groups, fn, channels_last):
    # alpha 0.5 makes the normalisation strongly nonlinear on these small values.
    x = activations((2, 8, 3, 3), scale=2.0, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def f(t):
        return fn(t, size, 0.5, 0.75, 2.0, convention, groups)

    assert torch.autograd.gradcheck(f, (x,))
    torch.testing.assert_close(f(x), reference_lrn(x, size, 0.5, 0.75, 2.0, convention, groups))


def test_reference_is_the_printed_formula_by_hand():
    # Three channels, n=5: every window is clipped at 0 and at N-1 (PAPER A8).
    a = torch.tensor([3.0, 40.0, 7.0], dtype=torch.float64).view(1, 3, 1, 1)
    total = 9.0 + 1600.0 + 49.0
    for convention, c in (("code", 1e-4 / 5), ("printed", 1e-4)):
        want = a.flatten() / (2.0 + c * total) ** 0.75
        got = reference_lrn(a, convention=convention).flatten()
        torch.testing.assert_close(got, want)
        fast = local_response_norm(a, convention=convention).flatten()
        torch.testing.assert_close(fast, want)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_forward_and_backward_match_float64(convention, channels_last):
    x = activations((2, 96, 13, 13))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y, gx = grads_of(lambda t: local_response_norm(t, convention=convention), x, g)
    yr, gr = grads_of(lambda t: reference_lrn(t, convention=convention), x.double(), g.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-5, atol=1e-6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    # The normalisation matters on these inputs: the output is not the input rescaled.
    assert (y / x.clamp(min=1e-3))[x > 1].std() > 1e-3


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_bf16_forward_and_backward_match_float64(convention):
    x = activations((2, 48, 12, 12), dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y, gx = grads_of(lambda t: local_response_norm(t, convention=convention), x, g)
    assert y.dtype == gx.dtype == torch.bfloat16
    yr, gr = grads_of(lambda t: reference_lrn(t, convention=convention), x.double(), g.double())
    # One bf16 rounding of the result (8 bits): relative 2^-8, plus the fp32 accumulation.
    torch.testing.assert_close(y.double(), yr, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(gx.double(), gr, rtol=2**-7, atol=1e-3)


def test_equals_torch_local_response_norm():
    x = activations((3, 96, 13, 13))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ours = LocalResponseNorm(5, 1e-4, 0.75, 2.0, convention="code")
    y, gx = grads_of(ours, x, g)
    yt, gt = grads_of(torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0), x, g)
    torch.testing.assert_close(y, yt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gt, rtol=1e-5, atol=1e-6)


def test_printed_convention_is_stronger():
    x = activations((2, 16, 5, 5))
    code, printed = local_response_norm(x), local_response_norm(x, convention="printed")
    assert (printed <= code).all() and (printed < code).any()  # c = alpha > alpha / n


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_edge_channels(channels):
    x = activations((2, channels, 4, 4), dtype=torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    y, gx = grads_of(local_response_norm, x, g)
    yr, gr = grads_of(reference_lrn, x, g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(gx, gr)


def test_groups_normalise_each_block_alone():
    x = activations((2, 16, 6, 6))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    y, gx = grads_of(lambda t: local_response_norm(t, groups=2), x, g)
    chunks = [
        grads_of(local_response_norm, t.contiguous(), h.contiguous())
        for t, h in zip(x.chunk(2, 1), g.chunk(2, 1))
    ]
    torch.testing.assert_close(y, torch.cat([c[0] for c in chunks], 1))
    torch.testing.assert_close(gx, torch.cat([c[1] for c in chunks], 1))


def test_autocast_bf16_after_a_conv():
    conv = torch.nn.Conv2d(3, 32, 3, padding=1)
    lrn = LocalResponseNorm()
    x = torch.randn(2, 3, 12, 12) * 20
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = torch.relu(conv(x))
        y = lrn(a)
        y.float().sum().backward()
    assert a.dtype == y.dtype == torch.bfloat16
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    torch.testing.assert_close(y.double(), reference_lrn(a.detach()), rtol=2**-7, atol=1e-3)


def test_formula_equals_function_in_all_layouts():
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = activations((2, 24, 7, 7), dtype=dtype).contiguous(memory_format=fmt)
            torch.testing.assert_close(lrn_formula(x, groups=2), local_response_norm(x, groups=2))


@pytest.mark.slow  # one inductor compilation: seconds with a warm cache, a minute without
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    lrn = LocalResponseNorm(groups=2)
    x = activations((2, 16, 5, 5)).contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    y, gx = grads_of(torch.compile(lrn, fullgraph=True), x, g)  # fullgraph: no graph break
    yr, gr = grads_of(lambda t: reference_lrn(t, groups=2), x.double(), g.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gr, rtol=1e-5, atol=1e-6)


def test_module_repr_and_bad_arguments():
    text = repr(LocalResponseNorm(5, 1e-4, 0.75, 2.0, convention="printed"))
    assert "size=5" in text and "alpha=0.0001" in text and "beta=0.75" in text
    assert "k=2.0" in text and "convention='printed'" in text
    with pytest.raises(ValueError, match="convention"):
        LocalResponseNorm(convention="paper")
    with pytest.raises(ValueError, match="groups"):
        local_response_norm(torch.ones(1, 5, 2, 2), groups=2)
    with pytest.raises(ValueError, match="N, C, H, W"):
        local_response_norm(torch.ones(5, 2, 2))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups,before,after", [(1, 2, 2), (2, 2, 2), (1, 2, 1), (4, 1, 0)])
def test_window_sum_methods_agree(channels_last, groups, before, after):
    t = torch.rand(3, 16, 5, 4, dtype=torch.float64)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    want = torch.zeros_like(t)
    width = 16 // groups
    for i in range(16):
        lo = max((i // width) * width, i - before)
        hi = min((i // width + 1) * width - 1, i + after)
        want[:, i] = t[:, lo : hi + 1].sum(1)
    for method in ("matmul", "shift"):
        got = window_sum(t, before, after, groups, method=method, scale=0.5)
        torch.testing.assert_close(got, 0.5 * want)


def test_strided_input_takes_the_shift_path_and_is_exact():
    # A non-dense view is neither NCHW nor channels_last: the path CUDA uses on any layout.
    base = activations((2, 24, 10, 10), dtype=torch.float64)
    x = base[:, :, ::2, 1::3]
    g = torch.randn(x.shape, dtype=torch.float64)
    y, gx = grads_of(local_response_norm, x, g)
    yr, gr = grads_of(reference_lrn, x.contiguous(), g)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(gx, gr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_slices_cover_the_batch(monkeypatch, dtype, channels_last):
    # On CPU the Function walks the batch in slices; make them 2 images so that a batch of 5
    # takes three slices, the last one short, and check every image against the formula.
    import alexnet.lrn as lrn_module

    x = activations((5, 16, 6, 6), dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(lrn_module, "CPU_CHUNK_ELEMENTS", 2 * x[0].numel() + 1)
    assert [(s.start, s.stop) for s in lrn_module._batch_slices(x)] == [(0, 2), (2, 4), (4, 5)]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    y, gx = grads_of(lambda t: local_response_norm(t, groups=2), x, g)
    yr, gr = grads_of(lambda t: reference_lrn(t, groups=2), x.double(), g.double())
    tol = dict(rtol=2**-7, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), yr, **tol)
    torch.testing.assert_close(gx.double(), gr, **tol)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_other_beta_takes_pow_and_matches_the_formula(beta):
    # beta = 0.75 (PAPER A8) has its own rsqrt path; any other beta goes through pow.
    x = activations((3, 8, 4, 4), scale=2.0, dtype=torch.float64).requires_grad_()

    def f(t):
        return local_response_norm(t, 5, 0.5, beta, 2.0, "code", 2)

    assert torch.autograd.gradcheck(f, (x,))
    torch.testing.assert_close(f(x), reference_lrn(x, 5, 0.5, beta, 2.0, "code", 2))
