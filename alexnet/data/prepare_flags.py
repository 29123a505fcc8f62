"""``alexnet prepare``'s sub-commands and their options, one function per source
(alexnet/data/prepare.py runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alexnet.data import pipeline, small


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="SOURCE", required=True)
    _imagenet(sub)
    _folder(sub)
    _fashion_mnist(sub)
    _cifar10(sub)
    _verify(sub)


def _imagenet(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "imagenet",
        help="ILSVRC-2012 tars or folders + devkit (PAPER G1)",
        description="ILSVRC-2012 as users have it (the official tars, a folder of the per-class "
        "tars, or <wnid>/ folders; the flat validation set labelled through the devkit) into a "
        "prepared dataset: shorter side to 256, central square (B1), JPEG records, mean image "
        "(B2) and RGB PCA (B4) of the training split. Resumable; on all cores.",
    )
    p.add_argument(
        "--train",
        type=Path,
        required=True,
        help="ILSVRC2012_img_train.tar, a folder of its <wnid>.tar, or <wnid>/ folders",
    )
    p.add_argument(
        "--val", type=Path, help="ILSVRC2012_img_val.tar, its flat folder, or <wnid>/ folders"
    )
    p.add_argument(
        "--devkit",
        type=Path,
        help="ILSVRC2012_devkit_t12.tar.gz or its folder (val labels, class names)",
    )
    _image_options(p)


def _folder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "folder",
        help="any folder-per-class image tree (<class>/<images>)",
        description="A folder of class folders (sorted names are the classes, as ImageFolder) "
        "into a prepared dataset, as ImageNet's (B1, B2, B4), images turned upright by their "
        "EXIF orientation. Resumable; on all cores.",
    )
    p.add_argument("--train", type=Path, required=True, help="training tree")
    p.add_argument("--val", type=Path, help="validation tree, same class folders")
    _image_options(p)


def _fashion_mnist(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fashion-mnist",
        help="Fashion-MNIST IDX files, native 28x28x1",
        description="Fashion-MNIST's four IDX files into a prepared dataset at their own "
        "28x28x1 (raw pixels), a stratified validation split held out of the training images "
        "and the official test set as its own split.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="the prepared dataset directory")
    p.add_argument(
        "--source",
        type=Path,
        help=f"folder with the four IDX .gz files (default {small.FASHION_MNIST_DIR}, "
        "Debian package dataset-fashion-mnist; with --download: OUT/source)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the files from the canonical address into --source, MD5-checked",
    )
    _validation_options(p)


def _cifar10(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cifar10",
        help="CIFAR-10 python batches, native 32x32x3",
        description="CIFAR-10's python batches into a prepared dataset at 32x32x3 (raw pixels), "
        "a validation split held out and the official test set as its own split.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="the prepared dataset directory")
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        help="cifar-10-batches-py folder or cifar-10-python.tar.gz",
    )
    _validation_options(p)


def _verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a prepared directory against its index",
        description="Every record's CRC-32 and decoding, the counts, the layout of the record "
        "files and the leftovers of an interrupted prepare, in a prepared directory.",
    )
    p.add_argument("out", type=Path, metavar="DIR", help="the prepared dataset directory")
    p.add_argument("--quick", action="store_true", help="decode a sample, not every record")


def _image_options(p: argparse.ArgumentParser) -> None:
    """How images are stored (``prepare.Options``): imagenet and folder."""
    p.add_argument("out", type=Path, help="the prepared dataset directory to write")
    p.add_argument(
        "--size",
        type=int,
        default=256,
        help="stored side: shorter side resized to it, central square kept "
        "(PAPER B1; default 256); 0 keeps the native size (all images equal)",
    )
    p.add_argument(
        "--storage",
        choices=["jpeg", "raw"],
        default="jpeg",
        help="records as JPEG bytes (default) or raw uint8 pixels",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument(
        "--workers",
        type=int,
        default=pipeline.default_workers(),
        help="processes (default: all cores)",
    )
    p.add_argument(
        "--chunk", type=int, default=1000, help="images per resumable chunk (default 1000)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable files out (they are listed, counted and recorded) "
        "instead of failing",
    )


def _validation_options(p: argparse.ArgumentParser) -> None:
    """The held-out validation split of the small datasets: fashion-mnist and cifar10."""
    p.add_argument(
        "--val-size",
        type=int,
        default=small.VAL_SIZE,
        help="training images held out as the validation split, stratified by class "
        f"(default {small.VAL_SIZE}); the official test set is its own split",
    )
    p.add_argument("--val-seed", type=int, default=0, help="seed of the held-out draw")
