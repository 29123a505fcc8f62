"""The training configuration: typed dataclasses, ``--set key=value`` overrides, validation.

Defaults are the paper's (section 5, PAPER D1-D5) and carry their units; the named presets
are in ``alexnet.recipes``. A config is
validated as a whole before any work starts; every problem is reported at once, as a
``UserError`` naming the setting. The resolved config is written into the run directory
(``config.json``) and into every checkpoint, and ``from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alexnet.recipes import PRESETS
from alexnet.runtime.errors import UserError

SCHEDULES = ("plateau", "steps", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class DataConfig:
    root: str = ""  # a directory written by `alexnet prepare` (meta.json, stats.npz, records)
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 224  # px, random crop of the stored 256x256 image (PAPER B3); 0 = stored size
    pad: int = 0  # px of zero padding before the random crop (small images only; not in the paper)
    flip: bool = True  # horizontal reflection with probability 1/2 (PAPER B3)
    pca_std: float = 0.1  # std of the PCA colour-noise coefficients (PAPER B4); 0 turns it off
    pca_scale: str = "unit"  # B4's eigenvalue units: "unit" (pixels in [0,1]) | "std"
    scale: float = 1.0  # multiplies the mean-subtracted 0-255 pixel values (PAPER B2: 1.0)
    # Deviation (an option, for the small recipes): also divide by the training pixels' std
    # (from the dataset's stats.npz), so inputs have about unit variance whatever the data.
    unit_variance: bool = False
    num_workers: int = 4  # loader worker processes per rank
    val_batch_size: int = 0  # images per rank per validation batch; 0 = the training batch
    # Where root is a folder of images rather than a prepared dataset (alexnet.data.folders):
    # the side its images are stored at (PAPER B1: 256), and the share of each class held out
    # as the validation split where it has no val/ folder (PAPER D4 steers by validation).
    image_size: int = 256
    holdout: float = 0.1


@dataclass
class ModelConfig:
    """``AlexNet``'s keyword arguments, less the three the data decides (classes, channels,
    crop size): ``AlexNet(num_classes, in_channels=..., image_size=..., **asdict(model))``.
    None takes the arch's own value (alexnet/model.py: ``ARCHS``)."""

    arch: str = "paper"  # paper (PAPER A1-A12) | owt (torchvision's variant, H2) | small
    widths: tuple[int, ...] | None = None  # conv1..conv5 kernel counts (paper: A3-A6)
    fc_width: int | None = None  # fc6/fc7 neurons (paper: 4096, A7)
    lrn: bool | None = None  # LRN after conv1, conv2 (paper: yes, A8; owt: no)
    lrn_convention: str = "code"  # "code": c = alpha/n (the authors' code) | "printed": c = alpha
    lrn_per_tower: bool = True  # normalise within each tower's maps, as layers-145.cfg (H1)
    pool_kernel: int = 3  # overlapping max pooling z=3, s=2 (PAPER A9); 2 = non-overlapping
    dropout: float = 0.5  # on fc6 and fc7 outputs (PAPER C1)
    activation: str = "relu"  # (PAPER A2); "tanh" for the comparison of PAPER E4
    towers: bool | None = None  # groups=2 in conv2, conv4, conv5 (paper: yes, A4, A6, A12)
    conv1_padding: int | None = None  # None: the arch's (paper: 2 on 224 px, see PAPER A3)
    # "paper": N(0, 0.01^2) weights, biases 0/1 (PAPER D2, D3) | "kaiming": He init, for the
    # small nets (see AlexNet.reset_parameters) | "none": torch's
    init: str = "paper"


@dataclass
class OptimConfig:
    batch_size: int = 128  # images per step over all processes (PAPER D1)
    lr: float = 0.01  # initial learning rate, the same for all layers (PAPER D4)
    momentum: float = 0.9  # (PAPER D1)
    weight_decay: float = 0.0005  # inside the velocity, times lr (PAPER D1)
    # The text applies the D1 formula to every parameter; the authors' code (PAPER H1) gives
    # biases no weight decay and twice the learning rate: bias_decay=false, bias_lr_mult=2.
    bias_decay: bool = True
    bias_lr_mult: float = 1.0
    label_smoothing: float = 0.0  # Deviation (option, off by default): not in the paper
    warmup_epochs: float = 0.0  # linear warm-up of the rate from 0; not in the paper (off)


@dataclass
class ScheduleConfig:
    kind: str = "plateau"  # plateau (PAPER D4) | steps (the authors' log, H1) | constant
    epochs: int = 90  # the most epochs a run trains (PAPER D5: "about 90 passes")
    factor: float = 0.1  # each cut multiplies the rate by this (PAPER D4: divided by 10)
    # The paper does not say how "stopped improving" was judged: an epoch improves when the
    # validation top-1 error falls below the best so far by more than `threshold` (a fraction,
    # 0.001 = 0.1 points); `patience` epochs without improvement cut the rate.
    patience: int = 4
    threshold: float = 0.001
    max_cuts: int = 3  # after this many cuts the next plateau ends the run (PAPER D4)
    milestones: tuple[int, ...] = (25, 51, 79)  # "steps": epochs after which the rate drops (H1)


@dataclass
class RunConfig:
    name: str = ""  # run directory name under out_dir; "" = <preset>-<date>-<time>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA and AMX/AVX512-BF16 CPUs, else fp32) | bf16 | fp32
    channels_last: bool = True  # NHWC activations: faster convolutions on CUDA and oneDNN
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms; resume is then bitwise
    tower_devices: str = ""  # "cuda:0,cuda:1": the model-parallel two-GPU layout (PAPER A12)
    log_every: int = 20  # steps between loss read-backs, NaN checks and TensorBoard points
    progress_interval_s: float = 30.0  # seconds between plain progress lines (no terminal)
    save_every_steps: int = 0  # extra mid-epoch checkpoints; 0 = at the end of each epoch only
    max_steps: int = 0  # stop (with a checkpoint) after this many steps in all; 0 = no limit
    export: bool = True  # write weights.safetensors (the best model) at the end
    # Under torchrun: seconds a collective waits for a frozen or lost rank before the run
    # fails with an error naming it (torch's default is 30 minutes).
    dist_timeout_s: float = 600.0


@dataclass
class FinetuneConfig:
    """Where training starts (alexnet/finetune.py). "" for source: from scratch (PAPER D2,
    D3); else a published weight set by name, a checkpoint, a run directory or a
    .safetensors export, whose layout and preprocessing the run then takes."""

    source: str = ""
    freeze_below: str = ""  # a layer name: the layers before it are not trained ("": none)
    pretrained_lr_mult: float = 1.0  # the pretrained layers' rate, as a multiple of optim.lr


@dataclass
class TrainConfig:
    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("data", "model", "optim", "schedule", "run", "finetune")


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The named preset, then ``overrides`` (``"optim.lr": 0.02`` or ``lr=0.02``), validated
    for types and names (not for files: ``validate`` does that)."""
    if name not in PRESETS:
        raise UserError(f"preset {name!r}: unknown; choose from {', '.join(PRESETS)}")
    cfg = TrainConfig(preset=name)
    apply_overrides(cfg, {**PRESETS[name], **overrides})
    return cfg


def from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """The inverse of ``to_dict``; unknown keys are errors."""
    cfg = TrainConfig(preset=str(d.get("preset", "paper")))
    flat = {}
    for key, value in d.items():
        if key == "preset":
            continue
        if key not in SECTIONS or not isinstance(value, dict):
            raise UserError(
                f"{source}: unknown section {key!r}; sections are {', '.join(SECTIONS)}"
            )
        flat.update({f"{key}.{k}": v for k, v in value.items()})
    flat = {RENAMED.get(k, k): v for k, v in flat.items()}
    apply_overrides(cfg, flat, source=source)
    return cfg


# Settings renamed since configs were first written: old run directories and checkpoints
# still read (``run.towers`` named devices while ``model.towers`` is the grouped layout).
RENAMED = {"run.towers": "run.tower_devices"}


def load_file(path: str | Path) -> TrainConfig:
    """A JSON config file (as written to ``config.json`` in every run directory)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object of config sections")
    return from_dict(d, source=str(path))


def _leaf_keys() -> dict[str, type]:
    out: dict[str, Any] = {}
    for section in SECTIONS:
        cls = typing.get_type_hints(TrainConfig)[section]
        for name, tp in typing.get_type_hints(cls).items():
            out[f"{section}.{name}"] = tp
    return out


def resolve_key(key: str, source: str = "--set") -> str:
    """``optim.lr`` stays; a bare leaf name (``lr``) is accepted when it is unambiguous."""
    keys = _leaf_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"{source}: {key!r} is ambiguous: {' or '.join(matches)}")
    close = difflib.get_close_matches(key, list(keys) + [k.split(".", 1)[1] for k in keys], n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"{source}: unknown setting {key!r}{hint} (`alexnet train --print-config`)")


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Convert a command-line string to the field's type (int, float, bool, str, tuples, None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return parse_value(text, args[0], key)
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        parts = [p for p in re.split(r"[,\s]+", text.strip("()[] ")) if p]
        return tuple(parse_value(p, item, key) for p in parts)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{key}={text}: expected true or false")
    try:
        return tp(text)
    except ValueError:
        raise UserError(f"{key}={text}: expected {tp.__name__}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a Python value given for a field, e.g. from JSON."""
    if isinstance(value, str) and tp is not str:
        return parse_value(value, tp, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list | tuple):
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, key) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        isinstance(tp, type)
        and isinstance(value, tp)
        and not (tp is int and isinstance(value, bool))
    ):
        return value
    raise UserError(f"{key}={value!r}: expected {getattr(tp, '__name__', tp)}")


def apply_overrides(
    cfg: TrainConfig, overrides: dict[str, Any] | list[str], source: str = "--set"
) -> TrainConfig:
    """Set fields from ``{"optim.lr": 0.02}`` or ``["optim.lr=0.02", "epochs=5"]`` in place."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise UserError(f"{source} {item!r}: expected KEY=VALUE, e.g. optim.lr=0.02")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    types_ = _leaf_keys()
    for key, value in overrides.items():
        full = resolve_key(key, source)
        section, name = full.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(value, types_[full], full))
    return cfg


def validate_settings(cfg: TrainConfig) -> None:
    """The checks that need neither the data nor a source (rates, counts, names): run before
    a folder is prepared or weights fetched, so a mistyped setting costs no minutes."""
    problems = _finite_problems(cfg) + _setting_problems(cfg)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def _finite_problems(cfg: TrainConfig) -> list[str]:
    return [
        f"{k}={v}: must be a finite number"
        for k, v in flatten(cfg.to_dict()).items()
        if isinstance(v, float) and not math.isfinite(v)
    ]


def validate(cfg: TrainConfig, *, check_files: bool = True) -> None:
    """Raise one ``UserError`` listing every problem, before any work starts. With
    ``check_files``, also the dataset: it must be prepared, and the crops and the model must
    fit its images."""
    problems = _finite_problems(cfg) + _setting_problems(cfg)
    if check_files:
        problems += _data_problems(cfg)
    else:
        problems += _model_problems(cfg, image_size=cfg.data.crop_size or None, channels=3)
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def _setting_problems(cfg: TrainConfig) -> list[str]:
    d, o, s, r = cfg.data, cfg.optim, cfg.schedule, cfg.run
    checks = [
        (d.crop_size >= 0 and d.pad >= 0, "data.crop_size and data.pad must be >= 0"),
        (d.pca_std >= 0, f"data.pca_std={d.pca_std}: must be >= 0"),
        (d.scale > 0, f"data.scale={d.scale}: must be > 0 (it multiplies the input pixels)"),
        (d.pca_scale in ("unit", "std"), f"data.pca_scale={d.pca_scale!r}: unit or std"),
        (d.num_workers >= 0 and d.val_batch_size >= 0, "data.num_workers/val_batch_size >= 0"),
        (o.batch_size > 0, f"optim.batch_size={o.batch_size}: must be > 0"),
        (o.lr > 0, f"optim.lr={o.lr}: must be > 0"),
        (0.0 <= o.momentum < 1.0, f"optim.momentum={o.momentum}: must be in [0, 1)"),
        (o.weight_decay >= 0 and o.bias_lr_mult > 0, "optim.weight_decay >= 0, bias_lr_mult > 0"),
        (0.0 <= o.label_smoothing < 1.0, "optim.label_smoothing: must be in [0, 1)"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs: must be >= 0"),
        (s.kind in SCHEDULES, f"schedule.kind={s.kind!r}: choose from {', '.join(SCHEDULES)}"),
        (s.epochs > 0, f"schedule.epochs={s.epochs}: must be > 0"),
        (0.0 < s.factor < 1.0, f"schedule.factor={s.factor}: must be in (0, 1)"),
        (s.patience >= 1 and s.max_cuts >= 0, "schedule.patience >= 1 and max_cuts >= 0"),
        (list(s.milestones) == sorted(set(s.milestones)), "schedule.milestones: must increase"),
        (r.precision in PRECISIONS, f"run.precision={r.precision!r}: {', '.join(PRECISIONS)}"),
        (
            re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", r.device) is not None,
            f"run.device={r.device!r}: use auto, cpu, cuda or cuda:N",
        ),
        (r.log_every > 0 and r.save_every_steps >= 0 and r.max_steps >= 0, "run.* counts >= 0"),
        (r.dist_timeout_s > 0, f"run.dist_timeout_s={r.dist_timeout_s}: must be > 0"),
        ("/" not in r.name, f"run.name={r.name!r}: a name, not a path (see run.out_dir)"),
    ]
    f = cfg.finetune
    layers = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    checks += [
        (d.image_size > 0, f"data.image_size={d.image_size}: must be > 0"),
        (0.0 <= d.holdout < 1.0, f"data.holdout={d.holdout}: must be in [0, 1)"),
        (
            f.freeze_below in ("", *layers),
            f"finetune.freeze_below={f.freeze_below!r}: a layer, one of {', '.join(layers)}",
        ),
        (f.pretrained_lr_mult > 0, f"finetune.pretrained_lr_mult={f.pretrained_lr_mult}: > 0"),
        (
            bool(f.source) or not f.freeze_below,
            "finetune.freeze_below needs finetune.source (--init): nothing is pretrained",
        ),
    ]
    if r.tower_devices:
        checks += [
            (
                len(r.tower_devices.split(",")) == 2,
                f"run.tower_devices={r.tower_devices!r}: two devices, e.g. cuda:0,cuda:1",
            ),
            (
                cfg.model.towers is not False,
                "run.tower_devices needs model.towers (the grouped layout it splits)",
            ),
        ]
    return [msg for ok, msg in checks if not ok]


def _model_problems(cfg: TrainConfig, *, image_size: int | None, channels: int) -> list[str]:
    """The model's own checks (``alexnet.model.resolve_options`` and the layer sizes), run
    by building it on the meta device: no memory, no time."""
    import torch

    from alexnet.model import AlexNet

    try:
        with torch.device("meta"):
            AlexNet(2, in_channels=channels, image_size=image_size, **dataclasses.asdict(cfg.model))
    except ValueError as e:
        return [f"model ({cfg.model.arch}): {e}"]
    return []


def _data_problems(cfg: TrainConfig) -> list[str]:
    d = cfg.data
    if not d.root:
        return ["data.root: no dataset given (--data DIR, made by `alexnet prepare`)"]
    meta_path = Path(d.root) / "meta.json"
    if not meta_path.is_file():
        return [
            f"{d.root}: neither a prepared dataset (no meta.json) nor a folder of images "
            "(one folder per class); `alexnet prepare` makes a dataset of other sources"
        ]
    try:
        meta = json.loads(meta_path.read_text())
        h, w = meta["image_size"]
        channels = int(meta.get("channels", 3))
        counts = {name: int(split["count"]) for name, split in meta["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{meta_path}: unreadable ({type(e).__name__}: {e}); prepare the data again"]
    missing = [s for s in (d.train_split, d.val_split) if s not in counts]
    if missing:
        hint = (
            "; prepare it with --val, or give the folder of images itself as --data (its "
            "data.holdout share is then held out for validation)"
            if d.val_split in missing
            else ""
        )
        return [
            f"{d.root}: no split {', '.join(map(repr, missing))} (has {', '.join(counts)}){hint}"
        ]
    if counts[d.train_split] < cfg.optim.batch_size:
        return [
            f"{d.root}: {counts[d.train_split]} training images, fewer than one batch of "
            f"{cfg.optim.batch_size} (optim.batch_size)"
        ]
    crop = d.crop_size or min(h, w)
    if crop > min(h, w):
        # Training crops may reach into the padding, but the validation and test views (the
        # centre and the ten of PAPER B5) are cut from the stored image itself.
        return [
            f"data.crop_size={crop}: larger than the {h}x{w} images of {d.root} (the test "
            f"views are cut from the stored image; use at most {min(h, w)})"
        ]
    return _model_problems(cfg, image_size=crop, channels=channels)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
