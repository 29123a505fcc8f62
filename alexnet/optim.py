"""Section 5 of the paper: the D1 update and the learning-rate schedules (D4, H1).

The paper's update (PAPER D1) puts the learning rate inside the velocity:

    v <- m * v - wd * lr * w - lr * grad
    w <- w + v

``torch.optim.SGD`` keeps the rate outside (``b <- m * b + grad + wd * w; w <- w - lr * b``).
The two agree while the rate is constant and differ after it changes: SGD rescales the
whole accumulated velocity at once, the paper's form lets the old velocity decay at the old
rate. ``PaperSGD`` is the paper's form, with v starting at zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from alexnet.config import ScheduleConfig
from alexnet.model import layer_of


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum in the paper's form (PAPER D1). Per group: ``lr``, ``momentum``,
    ``weight_decay``; the velocity is ``state[p]["velocity"]``.

    ``fused`` (the default, with ``foreach``): float32 and half-precision parameters on CPU
    or CUDA take the update in one pass per tensor through torch's fused SGD kernel
    (``_fused_step``), about half the memory traffic of the four foreach passes (paper net,
    CPU: 55 -> 32 ms a step).
    Like AMP's in-place unscale, it leaves ``lr * grad`` in each ``.grad``. float64 and other
    devices take the foreach (or loop) form, exact to the last bit."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,  # PAPER D4
        momentum: float = 0.9,  # PAPER D1
        weight_decay: float = 0.0005,  # PAPER D1
        *,
        foreach: bool = True,
        fused: bool = True,
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"bad PaperSGD settings lr={lr} momentum={momentum} wd={weight_decay}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, fused=fused
        )
        super().__init__(params, defaults)
        self._scales: dict[torch.device, torch.Tensor] = {}  # the fused step's 1/lr per device

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, then each velocity in its parameter's layout: a run saved with
        channels_last weights may resume with NCHW ones (``run.channels_last`` may change),
        and the fused step needs the two alike (``_fused_ok``)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                v = self.state.get(p, {}).get("velocity")
                if v is not None and v.stride() != p.stride():
                    self.state[p]["velocity"] = torch.empty_like(p).copy_(v)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            vel = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                vel.append(state["velocity"])
            grads = [p.grad for p in params]
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            if group["foreach"]:
                # groups saved before ``fused`` existed resume as they ran: unfused
                scales = self._scales if group.get("fused", False) else None
                _step_foreach(params, grads, vel, lr, m, wd, scales)
            else:
                _step_loop(params, grads, vel, lr, m, wd)
        return loss


def _step_loop(params, grads, vel, lr: float, m: float, wd: float) -> None:
    for p, g, v in zip(params, grads, vel, strict=True):
        v.mul_(m)
        if wd:
            v.add_(p, alpha=-wd * lr)
        v.add_(g, alpha=-lr)
        p.add_(v)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused SGD kernel exists


def _fused_ok(ps, gs, vs, lr: float, m: float) -> bool:
    """Whether torch's fused kernel computes D1 exactly for these tensors: it walks each
    parameter, its gradient and its velocity as one flat array, so their layouts (strides)
    must agree (a velocity saved in channels_last and a parameter now NCHW would be mixed
    up element by element); and it keeps no buffer at momentum 0 (then the velocity is
    the plain foreach form's)."""
    device, dtype = ps[0].device, ps[0].dtype
    fusable = device.type in FUSED_DEVICES and dtype in _FUSED_DTYPES and m > 0
    if not (fusable and lr > 0 and hasattr(torch, "_fused_sgd_")):
        return False
    return all(g.stride() == p.stride() == v.stride() for p, g, v in zip(ps, gs, vs, strict=True))


def _grad_scale(scales: dict, device: torch.device, lr: float) -> torch.Tensor:
    """1/lr as a float32 tensor on ``device``, made once and refilled: ``fill_`` with a
    Python number is a kernel launch, where ``torch.tensor(1 / lr, device="cuda")`` would
    copy from the host and wait for the copy, every step."""
    scale = scales.get(device)
    if scale is None:
        scale = scales[device] = torch.empty((), dtype=torch.float32, device=device)
    return scale.fill_(1.0 / lr)


def _fused_step(ps, gs, vs, lr: float, m: float, wd: float, scale: torch.Tensor) -> None:
    """PAPER D1 through torch's fused SGD, which per element computes g <- -g / s (maximize,
    grad_scale s), g <- g + wd' * w, b <- m * b + g, w <- w - lr' * b. With b = v, s = 1/lr,
    wd' = -wd * lr and lr' = -1 that is v <- m*v - wd*lr*w - lr*grad, w <- w + v. s is a
    float32, so lr * grad carries one float32 rounding more (tests: within float32)."""
    torch._fused_sgd_(
        ps,
        gs,
        vs,
        weight_decay=-wd * lr,
        momentum=m,
        lr=-1.0,
        dampening=0.0,
        nesterov=False,
        maximize=True,
        is_first_step=False,
        grad_scale=scale,
    )


def _step_foreach(params, grads, vel, lr: float, m: float, wd: float, scales: dict | None):
    # One fused kernel per op per (device, dtype) bucket: the towers layout puts the
    # parameters on two devices.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    for (device, _), idx in buckets.items():
        ps, gs, vs = [params[i] for i in idx], [grads[i] for i in idx], [vel[i] for i in idx]
        if scales is not None and _fused_ok(ps, gs, vs, lr, m):
            _fused_step(ps, gs, vs, lr, m, wd, _grad_scale(scales, device, lr))
            continue
        torch._foreach_mul_(vs, m)
        if wd:
            torch._foreach_add_(vs, ps, alpha=-wd * lr)
        torch._foreach_add_(vs, gs, alpha=-lr)
        torch._foreach_add_(ps, vs)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    bias_decay: bool = True,
    bias_lr_mult: float = 1.0,
    pretrained: set[str] | frozenset[str] = frozenset(),
    pretrained_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """The trainable parameters as groups: weights and biases, and (fine-tuning) the layers
    named in ``pretrained`` apart. The text (PAPER D1, D4) decays every parameter at one
    rate (``bias_decay=True, bias_lr_mult=1``); the authors' code (PAPER H1) gives biases no
    decay and twice the rate (``bias_decay=False, bias_lr_mult=2``); ``pretrained_lr_mult``
    scales the pretrained layers' rate. ``lr_mult`` is read by ``set_lr``; empty groups are
    left out (a run from scratch has the two groups of earlier versions)."""
    found: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            old = layer_of(name) in pretrained
            found.setdefault((old, p.ndim <= 1), []).append(p)
    groups = []
    for old in (False, True):
        mult = pretrained_lr_mult if old else 1.0
        prefix = "pretrained " if old else ""
        for bias in (False, True):
            params = found.get((old, bias))
            if params:
                groups.append(
                    {
                        "params": params,
                        "weight_decay": weight_decay if (bias_decay or not bias) else 0.0,
                        "lr_mult": mult * (bias_lr_mult if bias else 1.0),
                        "name": prefix + ("biases" if bias else "weights"),
                    }
                )
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


class Schedule:
    """The base rate per epoch. ``lr`` is the current rate; ``epoch_end(val_error)`` is called
    after each epoch's validation and returns ``"keep"``, ``"cut"`` (the rate just dropped) or
    ``"stop"`` (the run is over); ``max_epochs`` ends every schedule."""

    def __init__(self, lr: float, max_epochs: int) -> None:
        self.base_lr, self.lr, self.max_epochs = lr, lr, max_epochs
        self.epochs_done = 0
        self.cuts = 0

    def _decide(self, val_error: float) -> str:
        return "keep"

    def epoch_end(self, val_error: float) -> str:
        self.epochs_done += 1
        action = self._decide(val_error)
        if action == "keep" and self.epochs_done >= self.max_epochs:
            action = "stop"
        return action

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k in ("max_epochs", "patience", "max_cuts"):
                continue  # these may be raised on resume (runs.RESUMABLE_CHANGES)
            setattr(self, k, tuple(v) if isinstance(v, list) else v)


class PlateauSchedule(Schedule):
    """PAPER D4: divide the rate by 10 whenever the validation error stops improving; after
    ``max_cuts`` cuts the next plateau ends the run. An epoch improves when its error is below
    the best so far by more than ``threshold``; ``patience`` epochs without one make a
    plateau. The best is kept across cuts: the error must improve on the best ever seen."""

    def __init__(
        self,
        lr: float,
        max_epochs: int,
        *,
        factor: float,
        patience: int,
        threshold: float,
        max_cuts: int,
    ) -> None:
        super().__init__(lr, max_epochs)
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.max_cuts = max_cuts
        self.best = float("inf")
        self.bad_epochs = 0

    def _decide(self, val_error: float) -> str:
        if val_error < self.best - self.threshold:
            self.best, self.bad_epochs = val_error, 0
            return "keep"
        self.best = min(self.best, val_error)
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            return "keep"
        self.bad_epochs = 0
        if self.cuts >= self.max_cuts:
            return "stop"
        self.cuts += 1
        self.lr *= self.factor
        return "cut"


class StepSchedule(Schedule):
    """The authors' log (PAPER H1): the rate is divided by 10 after each milestone epoch
    (25, 51, 79), and the run stops after ``max_epochs`` (91)."""

    def __init__(self, lr: float, max_epochs: int, *, factor: float, milestones) -> None:
        super().__init__(lr, max_epochs)
        self.factor, self.milestones = factor, tuple(milestones)

    def _decide(self, val_error: float) -> str:
        if self.epochs_done in self.milestones:
            self.cuts += 1
            self.lr = self.base_lr * self.factor**self.cuts
            return "cut"
        return "keep"


def make_schedule(cfg: ScheduleConfig, lr: float) -> Schedule:
    if cfg.kind == "plateau":
        return PlateauSchedule(
            lr,
            cfg.epochs,
            factor=cfg.factor,
            patience=cfg.patience,
            threshold=cfg.threshold,
            max_cuts=cfg.max_cuts,
        )
    if cfg.kind == "steps":
        return StepSchedule(lr, cfg.epochs, factor=cfg.factor, milestones=cfg.milestones)
    if cfg.kind == "constant":
        return Schedule(lr, cfg.epochs)
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps (an
    option, not in the paper)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
