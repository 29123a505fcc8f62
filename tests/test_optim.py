"""The D1 update against a hand-written formula, and the schedules (PAPER D1, D4, H1)."""

from __future__ import annotations

import pytest
import torch

from alexnet.config import ScheduleConfig
from alexnet.optim import (
    PaperSGD,
    PlateauSchedule,
    StepSchedule,
    make_schedule,
    param_groups,
    set_lr,
    warmup_factor,
)

LRS = [0.01] * 4 + [0.001] * 4  # a cut after four steps, as the plateau schedule makes


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    b0 = torch.randn(5, generator=g, dtype=torch.float64)
    grads = [
        (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g).double())
        for _ in LRS
    ]
    return w0, b0, grads


def _reference(w0, grads, lrs, m=0.9, wd=0.0005):
    """PAPER D1 written out in plain float64 arithmetic, element by element."""
    w = w0.clone().tolist()
    v = [[0.0] * len(row) for row in w]
    for (g, _), lr in zip(grads, lrs, strict=True):
        g = g.tolist()
        for i in range(len(w)):
            for j in range(len(w[i])):
                v[i][j] = m * v[i][j] - wd * lr * w[i][j] - lr * g[i][j]
                w[i][j] = w[i][j] + v[i][j]
    return torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize("foreach", [True, False])
def test_paper_sgd_matches_d1_across_a_rate_change(foreach):
    w0, b0, grads = _problem()
    w = torch.nn.Parameter(w0.clone())
    opt = PaperSGD([w], lr=LRS[0], momentum=0.9, weight_decay=0.0005, foreach=foreach)
    for (g, _), lr in zip(grads, LRS, strict=True):
        set_lr(opt, lr)
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), _reference(w0, grads, LRS), rtol=0, atol=1e-15)


def test_fused_step_is_d1_within_float32_and_leaves_lr_times_grad():
    """float32 takes torch's fused kernel with the D1 mapping (optim._fused_step)."""
    w0, _, grads = _problem(2)
    wd = 0.05  # large, so a wrong sign or scale of the decay shows above float32 rounding
    w = torch.nn.Parameter(w0.float())
    opt = PaperSGD([w], lr=LRS[0], momentum=0.9, weight_decay=wd)
    for (g, _), lr in zip(grads, LRS, strict=True):
        set_lr(opt, lr)
        w.grad = g.float()
        opt.step()
        torch.testing.assert_close(w.grad, lr * g.float())  # the fused path ran
    ref = _reference(w0, grads, LRS, wd=wd)
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-6, atol=1e-6)
    assert (ref - _reference(w0, grads, LRS, wd=-wd)).abs().max() > 1e-3  # the check can fail


def test_momentum_zero_is_d1():
    """m = 0 is a valid D1 setting (plain SGD with decay): the fused kernel keeps no buffer
    then, so the step must not hand it one (it raised inside torch at the first step)."""
    w0, _, grads = _problem(3)
    w = torch.nn.Parameter(w0.float())
    opt = PaperSGD([w], lr=LRS[0], momentum=0.0, weight_decay=0.0005)
    for (g, _), lr in zip(grads, LRS, strict=True):
        set_lr(opt, lr)
        w.grad = g.float()
        opt.step()
    ref = _reference(w0, grads, LRS, m=0.0)
    torch.testing.assert_close(w.detach().double(), ref, rtol=1e-6, atol=1e-6)


def _d1_by_hand(w, v, g, lr, m=0.9, wd=0.0005):
    """One D1 step in float64 tensor arithmetic (no optimizer code)."""
    v = m * v - wd * lr * w - lr * g
    return w + v, v


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_a_velocity_saved_in_another_layout_resumes_exactly(saved_channels_last):
    """A run may resume with run.channels_last switched: the velocity comes back in the
    layout it was saved in while the weights take the new one. The fused kernel walks both
    as flat arrays: unless the optimizer re-lays the velocity out, elements of different
    weights are mixed (max |w - exact| was 4.4 after one step)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    grads = [torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    before = torch.channels_last if saved_channels_last else torch.contiguous_format
    after = torch.contiguous_format if saved_channels_last else torch.channels_last
    w = torch.nn.Parameter(w0.float().contiguous(memory_format=before))
    opt = PaperSGD([w], lr=0.01)
    for grad in grads[:2]:
        w.grad = grad.float().contiguous(memory_format=before)
        opt.step()
    state = opt.state_dict()
    w2 = torch.nn.Parameter(w.detach().clone().contiguous(memory_format=after))
    opt2 = PaperSGD([w2], lr=0.01)
    opt2.load_state_dict(state)
    for grad in grads[2:]:
        w2.grad = grad.float().contiguous(memory_format=after)
        opt2.step()
    ref, v = w0, torch.zeros_like(w0)
    for grad in grads:
        ref, v = _d1_by_hand(ref, v, grad, 0.01)
    torch.testing.assert_close(w2.detach().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2.grad, 0.01 * grads[3].float())  # the fused path ran


def test_unfused_step_leaves_the_gradient_alone():
    w = torch.nn.Parameter(torch.ones(4))
    opt = PaperSGD([w], lr=0.01, fused=False)
    w.grad = torch.full((4,), 3.0)
    opt.step()
    assert torch.equal(w.grad, torch.full((4,), 3.0))


def test_torch_sgd_agrees_at_constant_rate_and_differs_after_a_change():
    w0, _, grads = _problem(1)

    def run(opt_cls, lrs, **kw):
        w = torch.nn.Parameter(w0.clone())
        opt = opt_cls([w], lr=lrs[0], momentum=0.9, weight_decay=0.0005, **kw)
        for (g, _), lr in zip(grads, lrs, strict=True):
            for group in opt.param_groups:
                group["lr"] = lr
            w.grad = g.clone()
            opt.step()
        return w.detach()

    const = [0.01] * len(LRS)
    # Constant rate: the two forms are the same up to torch's first step (velocity = grad,
    # not lr * grad) which, at a constant rate, is also what D1 gives from v = 0.
    torch.testing.assert_close(run(PaperSGD, const), run(torch.optim.SGD, const))
    paper, torch_sgd = run(PaperSGD, LRS), run(torch.optim.SGD, LRS)
    torch.testing.assert_close(paper, _reference(w0, grads, LRS), rtol=0, atol=1e-15)
    # After the cut SGD scales the whole momentum buffer by the new rate at once.
    assert (paper - torch_sgd).abs().max() > 1e-4


def test_bias_options_follow_the_authors_code():
    model = torch.nn.Linear(3, 2).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    groups = param_groups(model, weight_decay=0.0005, bias_decay=False, bias_lr_mult=2.0)
    opt = PaperSGD(groups, lr=0.01)
    set_lr(opt, 0.01)
    gw, gb = torch.ones_like(w0), torch.ones_like(b0)
    model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
    opt.step()
    # one step from v = 0: w - wd*lr*w - lr*g; biases: 2x rate, no decay (PAPER H1)
    torch.testing.assert_close(model.weight.detach(), w0 - 0.0005 * 0.01 * w0 - 0.01 * gw)
    torch.testing.assert_close(model.bias.detach(), b0 - 0.02 * gb)


def test_plateau_cuts_after_patience_and_stops_after_three_cuts():
    s = PlateauSchedule(0.01, 90, factor=0.1, patience=2, threshold=0.001, max_cuts=3)
    errors = [0.9, 0.8, 0.7999, 0.85]  # 0.7999 is within the threshold: no improvement
    assert [s.epoch_end(e) for e in errors] == ["keep", "keep", "keep", "cut"]
    assert s.lr == pytest.approx(0.001)
    assert s.best == pytest.approx(0.7999)  # the best seen is kept across the cut
    assert [s.epoch_end(e) for e in (0.6, 0.6, 0.6)] == ["keep", "keep", "cut"]
    assert [s.epoch_end(e) for e in (0.5, 0.5, 0.5)] == ["keep", "keep", "cut"]
    assert s.cuts == 3 and s.lr == pytest.approx(1e-5)
    assert [s.epoch_end(e) for e in (0.4, 0.45, 0.45)] == ["keep", "keep", "stop"]


def test_plateau_state_round_trips():
    a = PlateauSchedule(0.01, 90, factor=0.1, patience=3, threshold=0.0, max_cuts=3)
    for e in (0.5, 0.6, 0.6):
        a.epoch_end(e)
    b = PlateauSchedule(0.01, 90, factor=0.1, patience=3, threshold=0.0, max_cuts=3)
    b.load_state_dict(a.state_dict())
    assert b.epoch_end(0.6) == a.epoch_end(0.6) == "cut"
    assert a.state_dict() == b.state_dict()


def test_max_epochs_ends_every_schedule():
    s = PlateauSchedule(0.01, 3, factor=0.1, patience=5, threshold=0.0, max_cuts=3)
    assert [s.epoch_end(1.0 - i / 10) for i in range(3)] == ["keep", "keep", "stop"]


def test_steps_follow_the_authors_log():
    s = make_schedule(ScheduleConfig(kind="steps", epochs=91), 0.01)
    assert isinstance(s, StepSchedule)
    rates, actions = [], []
    for _ in range(91):
        rates.append(s.lr)  # the rate used during this epoch
        actions.append(s.epoch_end(0.5))
    assert rates[0] == rates[24] == 0.01 and rates[25] == pytest.approx(0.001)
    assert rates[51] == pytest.approx(1e-4) and rates[79] == pytest.approx(1e-5)
    assert [i + 1 for i, a in enumerate(actions) if a == "cut"] == [25, 51, 79]
    assert actions[-1] == "stop" and actions.count("stop") == 1


def test_warmup_is_linear():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
