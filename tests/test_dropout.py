"""Dropout (PAPER C1): the CPU mask is Bernoulli, unbiased bit by bit, and nn.Dropout's function."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alexnet.dropout import Dropout, keep_mask
from alexnet.model import AlexNet


def _within(fraction: float, expected: float, n: int, sigmas: float = 6.0) -> bool:
    return abs(fraction - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
def test_the_mask_drops_each_unit_with_probability_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    shape = torch.Size((513, 1001))  # not a multiple of 64: the last word is cut
    mask = keep_mask(shape, p, torch.float32)
    assert mask.shape == shape and mask.dtype == torch.float32
    assert bool(((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - p)))).all())
    kept = (mask > 0).double()
    assert _within(kept.mean().item(), 1 - p, shape.numel())
    # neighbours are independent: P(both kept) = (1-p)^2
    both = (kept.view(-1)[1:] * kept.view(-1)[:-1]).mean().item()
    assert _within(both, (1 - p) ** 2, shape.numel() - 1)


def test_every_bit_of_the_generators_words_is_used_unbiased():
    """p = 0.5 takes one bit per unit from 64-bit draws: a bit position that is stuck (an
    integer draw that never sets the sign bit, a byte read twice) shows as a biased column."""
    torch.manual_seed(1)
    n_words = 4096
    mask = keep_mask(torch.Size((n_words * 64,)), 0.5, torch.float32)
    per_position = (mask > 0).double().view(8, n_words, 8).mean(dim=1)  # bit x byte
    for fraction in per_position.view(-1).tolist():
        assert _within(fraction, 0.5, n_words)


def test_reproducible_from_the_seed_and_different_for_another():
    shape = torch.Size((64, 4096))
    torch.manual_seed(3)
    a = keep_mask(shape, 0.5, torch.bfloat16)
    torch.manual_seed(3)
    b = keep_mask(shape, 0.5, torch.bfloat16)
    torch.manual_seed(4)
    c = keep_mask(shape, 0.5, torch.bfloat16)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradient_are_inverted_dropout(dtype):
    torch.manual_seed(0)
    x = (torch.rand(128, 1024) + 0.5).to(dtype).requires_grad_()  # no zeros of its own
    y = Dropout(0.5).train()(x)
    assert y.dtype == dtype
    kept = y != 0
    assert _within(kept.double().mean().item(), 0.5, y.numel())
    assert torch.equal(y[kept], x.detach()[kept] * 2)
    g = torch.randn(128, 1024).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * 2, torch.zeros_like(g)))


def test_eval_mode_and_p_zero_are_the_identity_and_inplace_is_honoured():
    x = torch.randn(32, 64)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    y = x.clone()
    out = Dropout(0.5, inplace=True).train()(y)
    assert out.data_ptr() == y.data_ptr() and bool((y == 0).any())


def test_other_devices_use_torchs_dropout(monkeypatch):
    called = []
    monkeypatch.setattr("alexnet.dropout.keep_mask", lambda *a: called.append(a))
    y = Dropout(0.5).train()(torch.ones(8, 16, device="meta"))
    assert y.shape == (8, 16) and y.device.type == "meta" and not called


def test_the_model_uses_it_and_it_is_an_nn_dropout():
    model = AlexNet(10, arch="small")
    assert isinstance(model.drop, Dropout) and isinstance(model.drop, nn.Dropout)
    assert model.drop.p == 0.5  # PAPER C1
