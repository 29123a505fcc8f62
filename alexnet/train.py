"""``alexnet train``: the paper's recipe (section 5, PAPER D1-D5) on one CPU, one GPU, or many
processes under ``torchrun`` (DDP).

``train(config) -> dict`` is the same run from Python. The parts, as in torchvision's
reference scripts: ``build`` (data, model, optimizer, schedule), ``train_one_epoch``,
``evaluate`` (validation top-1/top-5 error), ``save`` (complete checkpoints) and ``train``
(the epoch loop, resume, the end conditions). See docs/TRAINING.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet import checkpoint as ckpt_io
from alexnet import config as C
from alexnet.evaluate import Counts
from alexnet.optim import set_lr, warmup_factor
from alexnet.runtime import distributed as D
from alexnet.runtime.errors import UserError
from alexnet.runtime.progress import Progress
from alexnet.runtime.runlog import RunLog, environment, epoch_line, new_run_dir
from alexnet.session import Session, build


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def _autocast(s: Session):
    if s.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=s.amp_dtype)


def _input_device(s: Session) -> torch.device:
    towers = s.cfg.run.tower_devices
    return torch.device(towers.split(",")[0]) if towers else s.device


def train_step(s: Session, images: torch.Tensor, labels: torch.Tensor, lr: float):
    """One D1 step on one batch; returns (loss, wrong) as device tensors (no sync)."""
    dev = _input_device(s)
    images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
    x = s.aug_train(images, s.generator)  # PAPER B2-B4 on the device
    set_lr(s.optimizer, lr)
    with _autocast(s):
        logits = s.net(x)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=s.cfg.optim.label_smoothing)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    wrong = (logits.detach().argmax(1) != labels).sum()
    return loss.detach(), wrong


def _check_finite(s: Session, first_bad: torch.Tensor) -> None:
    """Stop every rank if any rank saw a non-finite loss, naming the first such step."""
    bad = int(D.all_reduce_min(first_bad.clone()).item())
    if bad < 2**62:
        where = (
            f"{s.last_good} (step {ckpt_io.checkpoint_step(s.last_good)})"
            if s.last_good
            else "none yet"
        )
        raise TrainingDiverged(
            f"training diverged: the loss was not finite at step {bad + 1} (epoch "
            f"{s.epoch + 1}); stopped without saving. Last good checkpoint: {where}. Try a "
            f"lower optim.lr (now {s.cfg.optim.lr}) or run.precision=fp32."
        )


def train_one_epoch(s: Session) -> tuple[dict[str, float], str]:
    """Train from ``s.batch_in_epoch`` to the end of epoch ``s.epoch`` (or an early stop).
    Returns the epoch's train metrics (all ranks) and ``"done"``, ``"max_steps"`` or
    ``"interrupted"``."""
    cfg, loader = s.cfg, s.train_loader
    s.net.train()
    s.start_epoch()
    first_bad = torch.full((), 2**62, dtype=torch.int64, device=s.device)
    warmup = round(cfg.optim.warmup_epochs * len(loader))
    status, t0, seconds0 = "done", time.perf_counter(), float(s.epoch_sums[3])
    progress = Progress(
        len(loader) * s.global_batch, f"epoch {s.epoch + 1}/{cfg.schedule.epochs}",
        enabled=s.env.is_main, interval=cfg.run.progress_interval_s,
        initial=s.batch_in_epoch * s.global_batch,
    )  # fmt: skip
    with progress:
        for images, labels in loader:
            lr = s.schedule.lr * warmup_factor(s.step, warmup)
            loss, wrong = train_step(s, images, labels, lr)
            n = loss.new_tensor(labels.shape[0]).double()
            s.epoch_sums[:3] += torch.stack([loss.double() * n, wrong.double(), n])
            first_bad = torch.where(~torch.isfinite(loss) & (first_bad > s.step), s.step, first_bad)
            s.step += 1
            progress.update(s.global_batch)
            sync = s.step % cfg.run.log_every == 0
            if sync:
                _check_finite(s, first_bad)
                progress.update(0, loss=float(loss), lr=lr)
                s.log.scalars({"train/loss": float(loss), "train/lr": lr,
                               "train/images_per_sec": progress.rate}, s.step)  # fmt: skip
            if s.env.distributed:
                stop = sync and D.any_rank(s.stop.requested, s.device)
            else:
                stop = s.stop.requested
            if stop:
                status = "interrupted"
            if cfg.run.max_steps and s.step >= cfg.run.max_steps:
                status = "max_steps"
            s.epoch_sums[3] = seconds0 + time.perf_counter() - t0
            if status != "done":
                break
            if cfg.run.save_every_steps and s.step % cfg.run.save_every_steps == 0:
                _check_finite(s, first_bad)
                s.save()
    _check_finite(s, first_bad)
    loss_sum, wrong, images, _ = D.all_reduce_sum(s.epoch_sums[:3].clone()).tolist() + [0]
    seconds = float(s.epoch_sums[3])
    images = max(images, 1.0)
    return {
        "train_loss": loss_sum / images,
        "train_error": wrong / images,
        "images_per_sec": images / max(seconds, 1e-9),
        "seconds": seconds,
    }, status


@torch.no_grad()
def validate(s: Session) -> dict[str, float]:
    """Validation loss, top-1 and top-5 error (centre crop), summed over all ranks; counted
    as ``alexnet evaluate`` counts (``Counts``)."""
    s.net.eval()
    counts = Counts.zeros(len(s.meta["classes"]), s.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
    dev = _input_device(s)
    s.val_loader.set_epoch(0)
    for images, labels in s.val_loader:
        images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        with _autocast(s):
            logits = s.net(s.aug_val(images)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        counts.add(logits, labels)
    n, top1, top5 = (int(D.all_reduce_sum(t).sum()) for t in counts.tensors())
    loss = float(D.all_reduce_sum(loss_sum))
    n = max(n, 1)
    return {
        "val_loss": loss / n,
        "val_top1_error": (n - top1) / n,
        "val_top5_error": (n - top5) / n,
    }


def run_epochs(s: Session) -> str:
    """The epoch loop: train, validate, let the schedule decide, log, save. Returns
    ``"finished"``, ``"stopped"`` (run.max_steps) or ``"interrupted"``."""
    cfg = s.cfg
    with s.stop.watch():
        while s.epoch < cfg.schedule.epochs:
            lr = s.schedule.lr
            train_metrics, status = train_one_epoch(s)
            if status != "done":
                s.save()
                return "stopped" if status == "max_steps" else "interrupted"
            val = validate(s)
            action = s.schedule.epoch_end(val["val_top1_error"])  # PAPER D4
            record = {"epoch": s.epoch + 1, "step": s.step, **train_metrics, **val, "lr": lr,
                      "event": action}  # fmt: skip
            improved = val["val_top1_error"] < s.best
            s.best = min(s.best, val["val_top1_error"])
            s.log.log_epoch(record)
            s.epoch += 1
            s.start_epoch()
            done = action == "stop" or s.epoch >= cfg.schedule.epochs
            s.save(best=improved, finished="schedule" if done else None)
            if s.env.is_main:
                print(epoch_line(record, cfg.schedule.epochs), flush=True)
            if done:
                break
    return "finished"


def _resume_checkpoint(resume: str | Path, cfg: C.TrainConfig) -> tuple[Path, dict[str, Any]]:
    path = ckpt_io.resolve(resume)
    ck = ckpt_io.load_checkpoint(path)
    diffs = C.differences(ck["config"], cfg.to_dict())
    if diffs:
        raise UserError(
            f"{path}: cannot resume with a different config ({'; '.join(diffs)}); drop the "
            "changed settings, or start a new run"
        )
    return path, ck


def _check_setup(cfg: C.TrainConfig, env: D.DistEnv) -> torch.device:
    """The checks that need the machine (devices, world size), before any work."""
    if cfg.optim.batch_size % env.world_size:
        raise UserError(
            f"optim.batch_size={cfg.optim.batch_size}: not divisible by the "
            f"{env.world_size} processes (the global batch is split evenly)"
        )
    if cfg.run.tower_devices:
        if env.distributed:
            raise UserError(
                "run.tower_devices: the two-tower layout runs in one process (no torchrun)"
            )
        devices = [D.pick_device(d, env) for d in cfg.run.tower_devices.split(",")]
        return devices[0]
    return D.pick_device(cfg.run.device, env)


def train(
    config: C.TrainConfig, *, resume: str | Path | None = None, argv: list[str] | None = None
) -> dict[str, Any]:
    """Run training; returns the final metrics and where everything was written.

    ``resume``: a run directory or checkpoint to continue (its config must match, apart
    from ``config.RESUMABLE_CHANGES``). Under torchrun every process calls this."""
    cfg = copy.deepcopy(config)
    C.validate(cfg)
    env = D.DistEnv.from_environ()
    device = _check_setup(cfg, env)
    ck_path, ck = _resume_checkpoint(resume, cfg) if resume else (None, None)
    previous = D.set_determinism(cfg.run.deterministic, device)
    D.setup(env, device)
    log = s = None
    try:
        if ck_path is not None:
            run_dir = ck_path.parent.parent
        else:
            run_dir = (
                new_run_dir(cfg.run.out_dir, cfg.run.name, cfg.preset) if env.is_main else None
            )
            run_dir = D.broadcast_object(run_dir)
        s = build(cfg, env, device)
        s.stop = D.StopRequest(announce=env.is_main)
        log = s.log = RunLog(run_dir, enabled=env.is_main, resume_epoch=ck["epoch"] if ck else None)
        if ck is not None:
            s.load_state_dict(ck, ck_path)
        log.write_config(cfg.to_dict())
        log.write_env(environment(device, env.world_size, argv))
        log.open_tensorboard(s.step)
        _banner(s)
        if ck is not None and ck.get("finished") and s.epoch >= cfg.schedule.epochs:
            status = "finished"
        elif (
            ck is not None
            and ck.get("finished") == "schedule"
            and cfg.schedule.epochs == ck["config"]["schedule"]["epochs"]
        ):
            status = "finished"
        else:
            status = run_epochs(s)
        return _result(s, status)
    finally:
        if log is not None:
            log.close()
        torch.use_deterministic_algorithms(previous)
        s = None  # noqa: F841 -- the session's DDP wrapper holds the process group: let go of it
        D.teardown()


def _banner(s: Session) -> None:
    if not s.env.is_main:
        return
    params = sum(p.numel() for p in s.model.parameters())
    where = f"resuming at epoch {s.epoch + 1}, step {s.step}" if s.step else "starting"
    amp = "bf16 autocast" if s.amp_dtype is not None else "fp32"
    print(
        f"train: {s.log.path} | {where} | {s.cfg.model.arch} model, {params:,} parameters | "
        f"{s.device} x{s.env.world_size}, {amp} | batch {s.global_batch} "
        f"({len(s.train_loader)} steps/epoch) | lr {s.schedule.lr:g} {s.cfg.schedule.kind}",
        flush=True,
    )


def _result(s: Session, status: str) -> dict[str, Any]:
    last = s.log.records[-1] if s.log.records else {}
    weights = None
    ckdir = s.log.checkpoints
    if status == "finished" and s.cfg.run.export and s.env.is_main:
        source = ckdir / "best.pt" if (ckdir / "best.pt").exists() else ckdir / "last.pt"
        weights = str(ckpt_io.export_safetensors(source, s.log.path / "weights.safetensors"))
    return {
        "status": status,
        "run_dir": str(s.log.path),
        "epoch": s.epoch,
        "step": s.step,
        "best_val_top1_error": s.best,
        "precision": "bf16" if s.amp_dtype is not None else "fp32",
        **{k: v for k, v in last.items() if k not in ("epoch", "step")},
        "checkpoint": str(ckdir / "last.pt"),
        "best_checkpoint": str(ckdir / "best.pt") if (ckdir / "best.pt").exists() else None,
        "weights": weights,
    }


def add_arguments(parser) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    C.add_arguments(parser)


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    import sys

    base = None
    if args.resume and not (args.preset or args.config):
        base = C.from_dict(ckpt_io.load_checkpoint(args.resume)["config"])
    cfg = C.from_args(args, base)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = train(cfg, resume=args.resume, argv=["alexnet", *sys.argv[1:]])
    if D.DistEnv.from_environ().is_main:
        summary = {k: result[k] for k in ("status", "run_dir", "epoch", "step")}
        print("train: " + json.dumps(summary))
    return {"finished": 0, "stopped": 0, "interrupted": 130}[result["status"]]
