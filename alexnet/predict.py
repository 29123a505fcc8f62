"""``alexnet predict IMAGE... --checkpoint C``: the five most probable classes of image files.

    alexnet predict cat.jpg dog.png scan.tif --checkpoint runs/x [--views 10] [--json]
    alexnet predict cat.jpg --weights IMAGENET1K_V1      # published weights, by name

Each file is read with PIL (JPEG, PNG, TIFF, WebP, BMP, GIF...; any size; greyscale, CMYK,
palette and alpha images become RGB, or greyscale for one-channel models) and prepared as the
training images were (PAPER B1: shorter side to the checkpoint's stored size, the central
square), then viewed as in evaluation: the centre crop, or the ten views of B5 with their
softmax averaged, minus the checkpoint's mean image (B2). A file that cannot be read is
reported on stderr by name; the others are still classified, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from alexnet.runtime.args import positive_int
from alexnet.runtime.devices import pick_device


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """(C, size, size) uint8, exactly as ``alexnet prepare`` stores an image (B1, G2)."""
    from PIL import Image

    from alexnet.data.pipeline import RecordFormat, load_rgb

    rgb, _ = load_rgb(Path(path).read_bytes(), RecordFormat(size=size))
    if channels == 1:
        return np.asarray(Image.fromarray(rgb).convert("L"))[None]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _describe(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def read_images(paths: list[Path], size: int, channels: int):
    """``(images uint8 (N, C, size, size), readable paths, [(path, reason), ...])``."""
    images, good, bad = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, size, channels))
            good.append(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
            bad.append((path, _describe(e)))
    stacked = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
    return torch.from_numpy(stacked), good, bad


@torch.no_grad()
def predict(model, aug, images: torch.Tensor, views: int, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (N, K), softmax averaged over the views (PAPER B5)."""
    from alexnet.evaluate import view_probs

    device = next(model.parameters()).device
    out = [
        view_probs(model, aug, images[i : i + batch_size].to(device), views).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.fc8.out_features)


def top_k(probs: torch.Tensor, ckpt: dict, k: int) -> list[list[dict]]:
    classes = list(ckpt.get("classes") or range(probs.shape[1]))
    names = list(ckpt.get("class_names") or classes)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [
            {
                "class_index": int(i),
                "class_id": str(classes[i]),
                "name": str(names[i]),
                "probability": float(p),
            }
            for p, i in zip(vs.tolist(), ix.tolist(), strict=True)
        ]
        for vs, ix in zip(values, indices, strict=True)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from alexnet.evaluate import add_views_argument

    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    from alexnet.interop.weights import add_weights_argument

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", type=Path, help="a checkpoint, run directory or .safetensors"
    )
    add_weights_argument(source)
    add_views_argument(parser)
    parser.add_argument("--top", type=positive_int, default=5, help="classes to show per image")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    from alexnet.interop.engines import add_backend_argument

    add_backend_argument(parser)


def run(args: argparse.Namespace) -> int:
    from alexnet.checkpoint import load_model, view_augment
    from alexnet.interop import engines
    from alexnet.interop.weights import resolve

    (path,) = resolve(args.checkpoint and [args.checkpoint], args.weights)
    model, ckpt = load_model(path, map_location=pick_device(args.device))
    model = engines.for_inference(
        model,
        ckpt,
        path,
        args.backend,
        precision=args.precision,
        batch_size=args.batch_size * args.views,
    )
    aug = view_augment(ckpt)
    size = int(aug.mean.shape[-1])  # the stored image size the mean image was computed at
    images, good, bad = read_images(args.images, size, model.conv1.in_channels)
    results = top_k(predict(model, aug, images, args.views, args.batch_size), ckpt, args.top)
    engines.print_report(model, "predict")
    for path, reason in bad:
        print(f"alexnet predict: error: {path}: cannot read image ({reason})", file=sys.stderr)
    if args.json:
        rows = {p: {"file": str(p), "predictions": r} for p, r in zip(good, results, strict=True)}
        rows.update({p: {"file": str(p), "error": reason} for p, reason in bad})
        print(json.dumps([rows[p] for p in args.images], indent=1))
    else:
        for path, preds in zip(good, results, strict=True):
            print(path)
            for p in preds:
                print(f"  {100 * p['probability']:6.2f}%  {p['class_id']}  {p['name']}")
    return 2 if bad else 0
