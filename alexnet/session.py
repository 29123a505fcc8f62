"""The training session: what one training process holds (data, model, optimizer, schedule,
random states, position), built once by ``build``, and its ``state_dict`` /
``load_state_dict``, which make a checkpoint complete: resuming from one gives the same run
as not stopping (STYLE 8). ``alexnet.checkpoint`` does the file I/O."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alexnet import checkpoint as ckpt_io
from alexnet import config as C
from alexnet.card import ModelCard
from alexnet.optim import PaperSGD, make_schedule, param_groups
from alexnet.runtime import devices
from alexnet.runtime import distributed as D
from alexnet.runtime.errors import UserError
from alexnet.runtime.runlog import RunLog

if TYPE_CHECKING:
    from alexnet.finetune import Start


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Session:
    """Everything one training process holds; built once by ``build``."""

    cfg: C.TrainConfig
    env: D.DistEnv
    device: torch.device
    amp_dtype: torch.dtype | None
    model: torch.nn.Module  # the plain module (what checkpoints hold)
    net: torch.nn.Module  # what runs: DDP and/or torch.compile around ``model``
    optimizer: PaperSGD
    schedule: Any
    train_loader: Any  # its state_dict is the position in the epoch
    val_loader: Any
    aug_train: Any
    aug_val: Any
    generator: torch.Generator  # every augmentation draw (crop, flip, colour noise)
    log: RunLog
    card: ModelCard  # what inference needs (alexnet/card.py): saved into every checkpoint
    epoch: int = 0
    step: int = 0
    best: float = math.inf
    last_good: Path | None = None
    stop: D.StopRequest = field(default_factory=D.StopRequest)
    # This rank's sums over the epoch so far, on the session's device (the training step adds
    # device tensors into them without a sync): loss * images, wrong, images. And the seconds
    # trained, on the host (a value written from the host each step would be a copy).
    epoch_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    epoch_seconds: float = 0.0

    @property
    def global_batch(self) -> int:
        return self.cfg.optim.batch_size

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already trained on (this rank's loader position)."""
        return self.train_loader.position

    def start_epoch(self) -> None:
        """Point the loader at epoch ``self.epoch``: a new epoch starts at its first batch;
        the epoch a checkpoint stopped in continues at the batch after the last one saved."""
        self.train_loader.set_epoch(self.epoch)
        if self.batch_in_epoch == 0:
            self.epoch_sums.zero_()
            self.epoch_seconds = 0.0

    # -- checkpoints -------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: gathered from every rank into the checkpoint."""
        sums = [*self.epoch_sums.tolist(), self.epoch_seconds]  # loss, wrong, images, seconds
        return {"rng": ckpt_io.rng_state(self.generator), "epoch_sums": sums}

    def state_dict(self, ranks: list[dict[str, Any]], finished: str | None = None) -> dict:
        """The checkpoint: the model (unwrapped and, for two towers, as the grouped network,
        so ``load_model`` reads every checkpoint the same way), what inference needs
        (``meta``), and all resuming needs. ``ranks``: every rank's ``rank_state()``."""
        grouped = getattr(self.model, "grouped_state_dict", None)
        return {
            "model": grouped() if grouped is not None else self.model.state_dict(),
            **self.card.to_dict(),
            "config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": {"ranks": [r["rng"] for r in ranks]},
            "sampler": {
                **self.train_loader.state_dict(),
                "world_size": self.env.world_size,
                "epoch_sums": [r["epoch_sums"] for r in ranks],
            },
            "metrics": {
                "best_val_top1_error": self.best,
                "last": self.log.records[-1] if self.log.records else None,
            },
            "finished": finished,
        }

    def load_state_dict(self, ck: dict[str, Any], path: Path) -> None:
        """Continue exactly where ``ck`` stopped: weights, velocity, schedule, position in
        the epoch, partial epoch sums and every random state (when the world size is the
        same; with another, the data order is kept and the random draws restart)."""
        if hasattr(self.model, "grouped_state_dict"):
            from alexnet.towers import grouped_to_towers

            self.model.load_state_dict(grouped_to_towers(ck["model"]))
        else:
            self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.schedule.load_state_dict(ck["schedule"])
        self.epoch, self.step = ck["epoch"], ck["step"]
        self.train_loader.load_state_dict(ck["sampler"])
        self.best = ck["metrics"]["best_val_top1_error"]
        self.last_good = path
        ranks, sums = ck["rng"]["ranks"], ck["sampler"]["epoch_sums"]
        if len(ranks) != self.env.world_size:
            if self.env.is_main:
                print(
                    f"resume: saved with {len(ranks)} processes, now {self.env.world_size}: the "
                    "data order is kept, random draws restart (not bitwise equal to an unbroken "
                    "run)"
                )
            return
        mine = sums[self.env.rank]
        self.epoch_sums = torch.tensor(mine[:3], dtype=torch.float64, device=self.device)
        self.epoch_seconds = float(mine[3])
        try:
            ckpt_io.set_rng_state(ranks[self.env.rank], self.generator)
        except (RuntimeError, ValueError) as e:  # e.g. a CPU generator state on a CUDA device
            if self.env.is_main:
                print(f"resume: random states not restored ({e}); continuing with fresh ones")

    def save(self, *, best: bool = False, finished: str | None = None) -> None:
        """Write ``last.pt`` (and ``best.pt``) on rank 0; every rank must call it (the
        per-rank random states are gathered, and no rank runs ahead of the save). Weights
        that are not finite are never saved: such a checkpoint would become the last good."""
        bad = [n for n, p in self.model.named_parameters() if not bool(p.isfinite().all())]
        if bad:
            kept = f"{self.last_good}" if self.last_good else "none yet"
            raise TrainingDiverged(
                f"training diverged: non-finite weights in {', '.join(bad[:3])} at step "
                f"{self.step}; not saved. Last good checkpoint: {kept}. Try a lower optim.lr "
                f"(now {self.cfg.optim.lr}) or run.precision=fp32."
            )
        ranks = D.gather_objects(self.rank_state())
        path, error, failure = self.log.checkpoints / "last.pt", "", None
        if self.env.is_main:
            try:
                ckpt_io.save_checkpoint(path, self.state_dict(ranks, finished))
                if best:
                    ckpt_io.link_or_copy(path, self.log.checkpoints / "best.pt")
            except Exception as e:  # noqa: BLE001 - every rank must hear of any failure
                failure = e
                kept = f"{path} (step {ckpt_io.checkpoint_step(path)})" if path.exists() else "none"
                error = (
                    f"{path}: could not save the checkpoint at step {self.step} ({e}); the last "
                    f"good checkpoint is intact: {kept}. Free space and resume with --resume "
                    f"{self.log.path}"
                )
        # Every rank waits here for rank 0's save: a failure must reach them all, or they
        # would wait in their next collective until run.dist_timeout_s.
        if D.any_rank(bool(error), self.device):
            if failure is not None and not isinstance(failure, OSError):
                raise failure  # not the disk: a bug, with its traceback (the others stop)
            raise UserError(error or "rank 0 could not save the checkpoint: the run stops")
        self.last_good = path


# -- building ------------------------------------------------------------------------------
def _loaders(cfg: C.TrainConfig, env: D.DistEnv, device: torch.device):
    from alexnet.data import PreparedDataset, make_loader
    from alexnet.data.store import is_official_test

    train_ds = PreparedDataset(cfg.data.root, cfg.data.train_split)
    val_ds = PreparedDataset(cfg.data.root, cfg.data.val_split)
    if env.is_main and is_official_test(train_ds.meta, cfg.data.val_split):
        print(
            f"train: warning: {cfg.data.root}: the validation split {cfg.data.val_split!r} is "
            "the official test set, so the rate cuts and best.pt are chosen on it (prepare "
            "the data again for a held-out validation split)",
            flush=True,
        )
    per_rank = cfg.optim.batch_size // env.world_size
    if len(train_ds) < cfg.optim.batch_size:
        raise UserError(
            f"{cfg.data.root}: {len(train_ds)} training images, fewer than one batch of "
            f"{cfg.optim.batch_size} (optim.batch_size)"
        )
    common = dict(
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        rank=env.rank,
        world_size=env.world_size,
        pin_memory=devices.pin_memory(device),
    )
    train = make_loader(train_ds, per_rank, shuffle=True, drop_last=True, **common)
    # pad=False: every validation image counted exactly once over all ranks.
    val = make_loader(
        val_ds,
        cfg.data.val_batch_size or per_rank,
        shuffle=False,
        drop_last=False,
        pad=False,
        **common,
    )
    return train_ds, train, val


def _place(model: torch.nn.Module, cfg: C.TrainConfig, device: torch.device) -> torch.nn.Module:
    """On ``device``, or as two towers on the devices of ``run.tower_devices`` (PAPER A12)."""
    fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    if cfg.run.tower_devices:
        from alexnet.towers import TwoTowerAlexNet

        towers = TwoTowerAlexNet.from_grouped(model, tuple(cfg.run.tower_devices.split(",")))
        return towers.to(memory_format=fmt)
    return model.to(device, memory_format=fmt)  # one conversion: no second copy of the weights


def _model(cfg: C.TrainConfig, ds, crop: int):
    from alexnet.model import AlexNet

    try:
        return AlexNet(
            len(ds.classes), in_channels=ds.channels, image_size=crop, **asdict(cfg.model)
        )
    except ValueError as e:  # e.g. crops too small for the arch: a config error
        raise UserError(f"model ({cfg.model.arch}, {crop} px crops): {e}") from None


def _preprocessing(cfg: C.TrainConfig, train_ds, start: Start | None):
    """The mean image and statistics, crop and input scale: the source's for a fine-tuning
    run, else the training split's."""
    from alexnet.data.store import pixel_std

    d = cfg.data
    stats = {k: v.clone() for k, v in train_ds.stats.items()}
    if start is not None:  # the source's contract: its mean image, crop and scale
        stats["mean"] = start.card.data_stats["mean"].clone()
        crop, scale = start.card.crop_size, start.card.scale
    else:
        crop = d.crop_size or train_ds.image_size[0]
        scale = d.scale / pixel_std(stats) if d.unit_variance else d.scale
    return stats, crop, scale


def _optimizer(model: torch.nn.Module, cfg: C.TrainConfig, init) -> PaperSGD:
    from alexnet import finetune

    o = cfg.optim
    groups = param_groups(
        model,
        weight_decay=o.weight_decay,
        bias_decay=o.bias_decay,
        bias_lr_mult=o.bias_lr_mult,
        pretrained=finetune.pretrained_layers(init),
        pretrained_lr_mult=cfg.finetune.pretrained_lr_mult,
    )
    return PaperSGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _runnable(model: torch.nn.Module, cfg: C.TrainConfig, env: D.DistEnv, device: torch.device):
    """What runs: ``model`` in DDP across the processes and/or compiled."""
    net = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.run.compile:
        net = torch.compile(net)
    return net


def _card(cfg: C.TrainConfig, train_ds, model_config: dict, stats, crop: int, scale, init):
    from alexnet.data.store import identity

    d = cfg.data
    return ModelCard(
        model_config=model_config,
        classes=tuple(train_ds.classes),
        class_names=tuple(train_ds.class_names),
        data_stats=stats,
        crop_size=crop,
        scale=scale,
        train_augment={
            "pad": d.pad,
            "flip": d.flip,
            "pca_std": d.pca_std,
            "pca_scale": d.pca_scale,
        },
        init=init,
        data=identity(train_ds.meta, cfg.data.train_split),
    )


def build(
    cfg: C.TrainConfig, env: D.DistEnv, device: torch.device, start: Start | None = None
) -> Session:
    """Data, model, optimizer and schedule, seeded so every rank builds the same network.
    ``start``: the weights and preprocessing a fine-tuning run starts from (alexnet/finetune.py;
    on resume, the run's own card, without weights)."""
    from alexnet import finetune
    from alexnet.data import DeviceAugment

    train_ds, train_loader, val_loader = _loaders(cfg, env, device)
    d, o = cfg.data, cfg.optim
    stats, crop, scale = _preprocessing(cfg, train_ds, start)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (PAPER D2, D3)
    model = _model(cfg, train_ds, crop)
    init = start.init if start is not None else None
    if start is not None and start.weights is not None:
        init = finetune.apply(model, start, train_ds.classes)
    model_config = dict(model.config)
    model = _place(model, cfg, device)
    finetune.freeze(model, cfg.finetune.freeze_below)
    torch.manual_seed(cfg.run.seed + 1 + env.rank)  # dropout differs between ranks
    generator = devices.generator(device, cfg.run.seed * 1000 + 17 + env.rank)
    aug = dict(scale=scale, pad=d.pad, pca_scale=d.pca_scale, channels_last=cfg.run.channels_last)
    aug_train = DeviceAugment(stats, crop, train=True, flip=d.flip, pca_std=d.pca_std, **aug)
    aug_val = DeviceAugment(stats, crop, train=False, **aug)
    optimizer = _optimizer(model, cfg, init)
    net = _runnable(model, cfg, env, device)
    card = _card(cfg, train_ds, model_config, stats, crop, scale, init)
    return Session(
        cfg,
        env,
        device,
        devices.precision_dtype(cfg.run.precision, device),
        model,
        net,
        optimizer,
        make_schedule(cfg.schedule, o.lr),
        train_loader,
        val_loader,
        aug_train,
        aug_val,
        generator,
        RunLog(Path(), enabled=False),
        card,
        epoch_sums=devices.zeros(3, device=device),
    )
