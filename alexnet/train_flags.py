"""``alexnet train``'s flags, and how they become a ``TrainConfig``: a preset (or a
``--config`` file, or the config of the run being resumed), then the flags given, then
``--set KEY=VALUE`` for any other setting (alexnet/config.py)."""

from __future__ import annotations

from typing import Any

from alexnet import config as C

# Command-line flags for the most used settings: (flag, key, type, help).
FLAGS: tuple[tuple[str, str, type, str], ...] = (
    (
        "--data",
        "data.root",
        str,
        "a prepared dataset, or a folder of images (one folder per class, or train/ and val/ "
        "folders of such), prepared once into $ALEXNET_HOME/datasets",
    ),
    (
        "--init",
        "finetune.source",
        str,
        "fine-tune: start from these weights (IMAGENET1K_V1, bvlc_alexnet, a checkpoint, a "
        "run directory or a .safetensors), keeping their layout and preprocessing",
    ),
    (
        "--freeze-below",
        "finetune.freeze_below",
        str,
        "with --init: do not train the layers before this one (e.g. fc6)",
    ),
    (
        "--pretrained-lr-mult",
        "finetune.pretrained_lr_mult",
        float,
        "with --init: the pretrained layers' rate as a multiple of --lr",
    ),
    ("--epochs", "schedule.epochs", int, "most epochs to train (paper: 90)"),
    ("--batch-size", "optim.batch_size", int, "global batch over all processes (paper: 128)"),
    ("--lr", "optim.lr", float, "initial learning rate (paper: 0.01)"),
    ("--schedule", "schedule.kind", str, "plateau (paper) | steps (authors' log) | constant"),
    ("--patience", "schedule.patience", int, "epochs without improvement before a rate cut"),
    ("--workers", "data.num_workers", int, "data loader processes per rank"),
    ("--device", "run.device", str, "auto | cpu | cuda | cuda:N"),
    ("--precision", "run.precision", str, "auto (bf16 where native, else fp32) | bf16 | fp32"),
    (
        "--towers",
        "run.tower_devices",
        str,
        "two devices for the two-GPU layout, e.g. cuda:0,cuda:1",
    ),
    ("--seed", "run.seed", int, "random seed"),
    ("--name", "run.name", str, "run directory name (default: <preset>-<date>-<time>)"),
    ("--out", "run.out_dir", str, "parent directory of run directories (default: runs)"),
    ("--max-steps", "run.max_steps", int, "stop with a checkpoint after this many steps"),
    ("--save-every", "run.save_every_steps", int, "also checkpoint every N steps"),
)


def add_arguments(parser: Any) -> None:  # an argparse.ArgumentParser
    """The ``alexnet train`` flags; everything else is reachable with ``--set KEY=VALUE``."""
    parser.add_argument(
        "--preset",
        choices=list(C.PRESETS),
        help="starting point (default: paper; with --init, finetune); alexnet/recipes.py says "
        "why each value",
    )
    parser.add_argument("--config", metavar="FILE", help="a JSON config (e.g. a run's config.json)")
    for flag, key, tp, help_text in FLAGS:
        parser.add_argument(
            flag,
            dest=key.replace(".", "__"),
            type=tp,
            metavar=tp.__name__.upper(),
            help=f"{help_text} [{key}]",
        )
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic algorithms (bitwise resume on CPU)",
    )
    parser.add_argument("--no-channels-last", action="store_true", help="NCHW activations")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting, e.g. --set optim.bias_lr_mult=2",
    )
    parser.add_argument("--resume", metavar="PATH", help="continue a run (directory or .pt)")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")


def from_args(args: Any, base: C.TrainConfig | None = None) -> C.TrainConfig:
    """Preset (or ``--config`` file, or ``base``), then explicit flags, then ``--set``."""
    if args.config:
        cfg = C.load_file(args.config)
    elif base is not None and not args.preset:
        cfg = base
    else:
        default = "finetune" if getattr(args, "finetune__source", None) else "paper"
        cfg = C.preset(args.preset or default)
    flags = {key: getattr(args, key.replace(".", "__")) for _, key, _, _ in FLAGS}
    C.apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None}, source="flag")
    if args.compile:
        cfg.run.compile = True
    if args.deterministic:
        cfg.run.deterministic = True
    if args.no_channels_last:
        cfg.run.channels_last = False
    return C.apply_overrides(cfg, args.overrides)
