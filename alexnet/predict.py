"""``alexnet predict``: the five most probable classes of your images.

    alexnet predict cat.jpg dog.png scan.tif --weights IMAGENET1K_V1
    alexnet predict photos/ --checkpoint runs/x --views 10 --json
    alexnet predict @list.txt --checkpoint model.safetensors

Inputs: image files, folders (their images, searched below, sorted) and ``@FILE`` lists
(one path a line). Each file is read with PIL (JPEG, PNG, TIFF, WebP, BMP, GIF...; any size;
greyscale, CMYK, palette, 16-bit and alpha images become RGB, or greyscale for one-channel
networks; a phone photo is turned upright by its EXIF orientation) and prepared as the
training images were (PAPER B1: shorter side to the network's stored size, the central
square), then viewed as in evaluation: the centre crop, or the ten views of B5 with their
softmax averaged, minus the network's mean image (B2). A file that cannot be read is named
on stderr; the others are still classified, and the exit status is 2. Outputs that are not
finite (a diverged network) are refused in one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alexnet.inference import (
    add_model_arguments,
    add_views_argument,
    load_from_args,
    single_source,
)
from alexnet.runtime.args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        type=Path,
        nargs="+",
        metavar="IMAGE",
        help="image files, folders of images, or @FILE: a list of image paths, one a line",
    )
    add_model_arguments(parser)
    add_views_argument(parser)
    parser.add_argument("--top", type=positive_int, default=5, help="classes to show per image")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")


def run(args: argparse.Namespace) -> int:
    from alexnet.data.folders import image_files

    files = image_files(args.images)
    predictor = load_from_args(args, single_source(args), inputs=len(files))
    images, good, bad = predictor.read(files)
    results = predictor.predict(images, args.top)
    line = predictor.report()
    if line:
        print(f"alexnet predict: {line}", file=sys.stderr)
    for u in bad:
        print(f"alexnet predict: error: {u.item}: cannot read image ({u.reason})", file=sys.stderr)
    if args.json:
        rows = [{"file": str(f)} for f in files]
        for i, preds in zip(good, results, strict=True):
            rows[i]["predictions"] = preds
        for u in bad:
            rows[u.index]["error"] = u.reason
        print(json.dumps(rows, indent=1, allow_nan=False))
    else:
        for i, preds in zip(good, results, strict=True):
            print(files[i])
            for p in preds:
                same = p["class_id"] == p["name"]
                label = p["name"] if same else f"{p['class_id']}  {p['name']}"
                print(f"  {100 * p['probability']:6.2f}%  {label}")
    if not files:
        print("alexnet predict: error: no image files found in the inputs", file=sys.stderr)
    return 2 if bad or not files else 0
