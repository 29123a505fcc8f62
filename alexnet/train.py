"""``alexnet train``: the paper's recipe (section 5, PAPER D1-D5) on one CPU, one GPU, or many
processes under ``torchrun`` (DDP).

``train(config) -> dict`` is the same run from Python. The parts, as in torchvision's
reference scripts: ``build`` (data, model, optimizer, schedule), ``train_one_epoch``,
``evaluate`` (validation top-1/top-5 error), ``save`` (complete checkpoints) and ``train``
(the epoch loop, resume, the end conditions). See docs/TRAINING.md.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet import checkpoint as ckpt_io
from alexnet import config as C
from alexnet import finetune, runs
from alexnet.data.store import read_meta
from alexnet.evaluate import Counts
from alexnet.optim import set_lr, warmup_factor
from alexnet.runtime import devices
from alexnet.runtime import distributed as D
from alexnet.runtime.errors import UserError
from alexnet.runtime.progress import Progress
from alexnet.runtime.runlog import RunLog, environment, epoch_line
from alexnet.session import Session, TrainingDiverged, build
from alexnet.train_flags import add_arguments, from_args  # noqa: F401 - the command's


def _input_device(s: Session) -> torch.device:
    towers = s.cfg.run.tower_devices
    return torch.device(towers.split(",")[0]) if towers else s.device


def train_step(s: Session, images: torch.Tensor, labels: torch.Tensor, lr: float):
    """One D1 step on one batch; returns (loss, wrong) as device tensors (no sync)."""
    dev = _input_device(s)
    images, labels = devices.to_device(images, dev), devices.to_device(labels, dev)
    x = s.aug_train(images, s.generator)  # PAPER B2-B4 on the device
    set_lr(s.optimizer, lr)
    with devices.autocast(dev, s.amp_dtype):
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
    if bad < NO_BAD_STEP:
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


NO_BAD_STEP = 2**62  # ``first_bad`` before any non-finite loss


def account(
    s: Session, loss: torch.Tensor, wrong: torch.Tensor, images: int, first_bad: torch.Tensor
) -> torch.Tensor:
    """Add one step's loss and errors into the epoch's sums, on the device and without a
    sync; returns ``first_bad``, the first step whose loss was not finite (or NO_BAD_STEP)."""
    n = torch.full_like(loss, images, dtype=torch.float64)  # filled on the device: no copy
    s.epoch_sums.add_(torch.stack([loss.double() * images, wrong.double(), n]))
    keep = torch.isfinite(loss) | (first_bad <= s.step)  # finite, or an earlier bad step
    return torch.where(keep, first_bad, s.step)


def epoch_metrics(s: Session) -> dict[str, float]:
    """The epoch's train metrics over all ranks (the all-reduce payload lives on the device)."""
    loss_sum, wrong, images = D.all_reduce_sum(s.epoch_sums.clone()).tolist()
    seconds = s.epoch_seconds
    images = max(images, 1.0)
    return {
        "train_loss": loss_sum / images,
        "train_error": wrong / images,
        "images_per_sec": images / max(seconds, 1e-9),
        "seconds": seconds,
    }


def train_one_epoch(s: Session) -> tuple[dict[str, float], str]:
    """Train from ``s.batch_in_epoch`` to the end of epoch ``s.epoch`` (or an early stop).
    Returns the epoch's train metrics (all ranks) and ``"done"``, ``"max_steps"`` or
    ``"interrupted"``."""
    cfg, loader = s.cfg, s.train_loader
    s.net.train()
    s.start_epoch()
    first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=s.device)
    warmup = round(cfg.optim.warmup_epochs * len(loader))
    status, t0, seconds0 = "done", time.perf_counter(), s.epoch_seconds
    progress = Progress(
        len(loader) * s.global_batch,
        f"epoch {s.epoch + 1}/{cfg.schedule.epochs}",
        enabled=s.env.is_main,
        interval=cfg.run.progress_interval_s,
        initial=s.batch_in_epoch * s.global_batch,
    )
    with progress:
        for images, labels in loader:
            lr = s.schedule.lr * warmup_factor(s.step, warmup)
            loss, wrong = train_step(s, images, labels, lr)
            first_bad = account(s, loss, wrong, labels.shape[0], first_bad)
            s.step += 1
            progress.update(s.global_batch)
            sync = s.step % cfg.run.log_every == 0
            if sync:
                _check_finite(s, first_bad)
                progress.update(0, loss=float(loss), lr=lr)
                s.log.scalars(
                    {
                        "train/loss": float(loss),
                        "train/lr": lr,
                        "train/images_per_sec": progress.rate,
                    },
                    s.step,
                )
            if s.env.distributed:
                stop = sync and D.any_rank(s.stop.requested, s.device)
            else:
                stop = s.stop.requested
            if stop:
                status = "interrupted"
            if cfg.run.max_steps and s.step >= cfg.run.max_steps:
                status = "max_steps"
            s.epoch_seconds = seconds0 + time.perf_counter() - t0
            if status != "done":
                break
            if cfg.run.save_every_steps and s.step % cfg.run.save_every_steps == 0:
                _check_finite(s, first_bad)
                s.save()
    _check_finite(s, first_bad)
    return epoch_metrics(s), status


@torch.no_grad()
def validate(s: Session) -> dict[str, float]:
    """Validation loss, top-1 and top-5 error (centre crop), summed over all ranks; counted
    as ``alexnet evaluate`` counts (``Counts``)."""
    s.net.eval()
    counts = Counts.zeros(len(s.card.classes), s.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
    dev = _input_device(s)
    s.val_loader.set_epoch(0)
    for images, labels in s.val_loader:
        images, labels = devices.to_device(images, dev), devices.to_device(labels, dev)
        with devices.autocast(dev, s.amp_dtype):
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
            record = {
                "epoch": s.epoch + 1,
                "step": s.step,
                **train_metrics,
                **val,
                "lr": lr,
                "event": action,
            }
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
        towers = [
            devices.pick_device(d, env.local_rank, name="run.tower_devices")
            for d in cfg.run.tower_devices.split(",")
        ]
        return towers[0]
    return devices.pick_device(cfg.run.device, env.local_rank, name="run.device")


def train(
    config: C.TrainConfig, *, resume: str | Path | None = None, argv: list[str] | None = None
) -> dict[str, Any]:
    """Run training; returns the final metrics and where everything was written.

    ``resume``: a run directory (or one of its checkpoints, ``ckpt_io.resume_target``) to
    continue; its config must match, apart from ``runs.RESUMABLE_CHANGES``, and its data
    must be the data it was trained on. Under torchrun every process calls this."""
    from alexnet.runtime.memory import tune_at_start

    tune_at_start()  # as the CLI does: freed tensors are reused, not given back to the system
    cfg = copy.deepcopy(config)
    C.validate_settings(cfg)  # before a folder is prepared or weights fetched
    target = ckpt_io.resume_target(resume) if resume else None
    channels = 3  # of a folder's images: RGB, or a fine-tuning source's
    if cfg.finetune.source and target is None:
        cfg, channels = finetune.adopt(cfg)  # the source's layout and preprocessing
    elif cfg.finetune.source:  # as adopted when the run began (the source may be gone)
        saved = ckpt_io.load_checkpoint(target[1], mmap=True)["config"]
        cfg = finetune.adopted_before(cfg, saved)
    cfg = runs.prepared_data(cfg, channels)
    C.validate(cfg)
    env = D.DistEnv.from_environ()
    device = _check_setup(cfg, env)
    with devices.determinism(cfg.run.deterministic, device):
        return _train(cfg, env, device, target, argv)


def _train(
    cfg: C.TrainConfig,
    env: D.DistEnv,
    device: torch.device,
    target: tuple[Path, Path] | None,
    argv: list[str] | None,
) -> dict[str, Any]:
    D.setup(env, device, timeout_s=cfg.run.dist_timeout_s)
    log = s = None
    try:
        with runs.owned_run(cfg, env, target and target[0]) as run_dir:
            # read under ownership: a run that another process finished meanwhile is read
            # as it now is, never an older state of it
            ck_path, ck = runs.resume_checkpoint(target[1], cfg) if target else (None, None)
            if ck is not None:
                start = finetune.Start.of_checkpoint(ck)
            else:
                start = finetune.load(cfg) if cfg.finetune.source else None
            if start is not None:
                finetune.check_data(cfg, start.card, read_meta(cfg.data.root))
            s = build(cfg, env, device, start)
            s.stop = D.StopRequest(announce=env.is_main)
            resume_epoch = ck["epoch"] if ck else None
            log = s.log = RunLog(run_dir, enabled=env.is_main, resume_epoch=resume_epoch)
            if ck is not None:
                s.load_state_dict(ck, ck_path)
            log.write_config(cfg.to_dict())
            log.write_env(environment(device, env.world_size, argv))
            log.open_tensorboard(s.step)
            _banner(s)
            status = "finished" if runs.already_finished(cfg, ck, s.epoch) else run_epochs(s)
            return _result(s, status)
    finally:
        if log is not None:
            log.close()
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


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    import sys

    base = None
    if args.resume and not (args.preset or args.config):
        _, ck = ckpt_io.load_training_checkpoint(args.resume, mmap=True)  # for its config
        base = C.from_dict(ck["config"], source=f"{args.resume} (its config)")
    cfg = from_args(args, base)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = train(cfg, resume=args.resume, argv=["alexnet", *sys.argv[1:]])
    if D.DistEnv.from_environ().is_main:
        summary = {k: result[k] for k in ("status", "run_dir", "epoch", "step")}
        print("train: " + json.dumps(summary))
    return {"finished": 0, "stopped": 0, "interrupted": 130}[result["status"]]
