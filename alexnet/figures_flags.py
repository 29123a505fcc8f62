"""``alexnet figures``' sub-commands and their options (the figures: ``alexnet.figures``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alexnet.data.folders import add_data_argument
from alexnet.inference import add_model_arguments
from alexnet.runtime.args import output_file, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_filters(sub)
    _add_predictions(sub)
    _add_neighbours(sub)
    _add_curves(sub)


def _add_filters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "filters",
        help="conv1's kernels, each tower in its own rows (PAPER F1)",
        description="The 96 (or any number of) conv1 kernels of a network as an image grid, "
        "each kernel stretched to the full range, the kernels of each tower in their own rows "
        "(the paper's Figure 3).",
    )
    add_model_arguments(p, running=False)
    p.add_argument("--out", type=output_file, required=True, help="the PNG to write")


def _add_drawn(sub: argparse._SubParsersAction, name: str, help_text: str, what: str):
    """A figure of images of a dataset, drawn at random or chosen: predictions, neighbours."""
    p = sub.add_parser(
        name, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}: {what}."
    )
    add_model_arguments(p)
    add_data_argument(p)
    p.add_argument(
        "--split",
        help="where the shown / query images come from (default: the split results are "
        "reported on: test, else val, else the folder's images)",
    )
    p.add_argument(
        "--n",
        type=positive_int,
        default=8 if name == "predictions" else 5,
        help="images drawn at random with --seed (one or more of each class first)",
    )
    p.add_argument(
        "--indices",
        type=int,
        nargs="+",
        help="these images of --split (default: --n drawn at random with --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    p.add_argument(
        "--views",
        type=int,
        choices=(1, 10),
        default=10 if name == "predictions" else 1,
        help="test views (PAPER B5)",
    )
    p.add_argument("--out", type=output_file, required=True, help="the PNG to write")
    return p


def _add_predictions(sub: argparse._SubParsersAction) -> None:
    help_text = "images with their top-5 bars (PAPER F2)"
    _add_drawn(sub, "predictions", help_text, "the paper's Figure 4, left")


def _add_neighbours(sub: argparse._SubParsersAction) -> None:
    help_text = "queries and their nearest images in fc7 (F3)"
    p = _add_drawn(sub, "neighbours", help_text, "Figure 4, right")
    p.add_argument(
        "--index-split",
        help="the images searched (default: train, as in PAPER F3, where there is one; else the "
        "folder's images, each query left out of its own neighbours)",
    )
    p.add_argument(
        "--index-features",
        type=Path,
        help="the index split's features from `alexnet features extract`",
    )
    p.add_argument("--layer", default="fc7", help="the layer whose activations are compared")
    p.add_argument("-k", type=positive_int, default=6, help="neighbours per query (F3 shows six)")


def _add_curves(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curves",
        help="loss, error and learning rate from metrics.jsonl",
        description="A run's training curves: loss, top-1/top-5 error and the learning rate "
        "per epoch, rate cuts marked.",
    )
    p.add_argument("--run", type=Path, required=True, help="a run directory or metrics.jsonl")
    p.add_argument("--out", type=output_file, required=True, help="the PNG to write")
