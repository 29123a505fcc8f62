"""``alexnet experiment``: the paper's claims, reproduced at small scale, each as one command
that writes a table (Markdown and JSON) and a figure, with mean and standard deviation over
seeds.

    alexnet experiment fig1 [--data DIR] [--seeds 3] [--threshold T]    # PAPER E4, Figure 1
    alexnet experiment ablations [--data DIR] [--seeds 3] [--epochs N]  # E3, B4, B5, C1, A12

``--data`` is a prepared dataset (default: Fashion-MNIST in data/fashion-mnist, fetched and
prepared as ``alexnet demo`` does); a prepared CIFAR-10 (``alexnet prepare cifar10``) works
too, with the paper's 25% threshold for Figure 1. Finished runs are kept under ``--out`` and
reused, so an interrupted experiment continues where it stopped. See docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alexnet.lab.ablations import run_ablations, variants
from alexnet.lab.fashion import DEFAULT_DATA
from alexnet.lab.fig1 import FMNIST_THRESHOLD, run_fig1
from alexnet.model import ARCHS
from alexnet.runtime.errors import UserError


# ------------------------------------------------------------------------------ command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="which", required=True, metavar="EXPERIMENT")
    _add_fig1(sub)
    _add_ablations(sub)


def _add_fig1(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fig1",
        help="ReLU against tanh: epochs to a training error (PAPER E4)",
        description="The paper's Figure 1 at small scale: the same four-layer network with "
        "ReLU and with tanh units, each at its best rate, epochs to reach a training error.",
    )
    p.add_argument("--data", type=Path, help=f"prepared dataset (default {DEFAULT_DATA})")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/experiments/fig1"),
        help="where the runs, the table, the JSON and the figure go",
    )
    p.add_argument("--seeds", type=int, default=3, help="runs of each activation (default 3)")
    p.add_argument(
        "--threshold",
        type=float,
        help=f"training error to reach (default: 0.25 on CIFAR-10, as the paper; "
        f"{FMNIST_THRESHOLD} otherwise)",
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1],
        help="learning rates tried for each activation (seed 0)",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=20000,
        help="random training subset (0: all); the time budget default",
    )


def _add_ablations(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablations",
        help="LRN, pooling, dropout, colour noise, views, towers",
        description="The paper's ablations at small scale (PAPER E3, B4, B5, C1, A12): the "
        "baseline and one change at a time, each over --seeds runs.",
    )
    p.add_argument("--data", type=Path, help=f"prepared dataset (default {DEFAULT_DATA})")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/experiments/ablations"),
        help="where the runs, the table, the JSON and the chart go",
    )
    p.add_argument("--seeds", type=int, default=3, help="runs of each variant (default 3)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8)")
    p.add_argument(
        "--train-images",
        type=int,
        default=10000,
        help="random training subset (0: all); the time budget default",
    )
    names = [v.name for v in variants(ARCHS["small"].widths) if v.name != "baseline"]
    p.add_argument(
        "--only",
        nargs="+",
        choices=names,
        metavar="VARIANT",
        help=f"run these variants (and the baseline) only: {', '.join(names)}",
    )


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1 or args.epochs < 1:
        raise UserError(f"--seeds {args.seeds} and --epochs {args.epochs}: both must be >= 1")
    if args.train_images is not None and args.train_images < 0:
        raise UserError(f"--train-images {args.train_images}: must be >= 0 (0: all)")
    if args.which == "fig1":
        return run_fig1(args)
    return run_ablations(args)
