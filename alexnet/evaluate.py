"""``alexnet evaluate``: top-1 / top-5 error of one network or an ensemble (PAPER B5, E, F4).

    alexnet evaluate --checkpoint runs/x/checkpoints/best.pt --data data/imagenet --views 10
    alexnet evaluate --checkpoint a.pt --checkpoint b.pt --data DIR --views 10 --json
    alexnet evaluate --weights bvlc_alexnet --data data/imagenet --views 1
    torchrun --nproc-per-node 8 -m alexnet evaluate --checkpoint a.pt --data DIR --views 10

``--views 1`` scores the centre crop; ``--views 10`` averages the softmax over the four
corner crops, the centre crop and their reflections (PAPER B5). Several ``--checkpoint``s
average their (view-averaged) softmax outputs (PAPER F4: the paper's 5- and 7-CNN results).
Under torchrun each rank scores a disjoint share of the split (no image is padded in twice)
and the per-class counts are summed over ranks; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet.runtime import devices
from alexnet.runtime.args import natural_int, output_file, positive_int
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_json, atomic_write_text
from alexnet.runtime.progress import Progress


def view_probs(model, aug, images: torch.Tensor, views: int, max_batch: int | None = None):
    """One model's softmax averaged over the views of each image (PAPER B5): (B, K).

    ``max_batch``: forward at most this many views at a time (default: all B*views at once).
    On the CPU ten views of a 100-image batch as one 1,000-image forward ran at less than
    half the images/s of ten 100-view forwards (the activations fall out of cache)."""
    x = aug.views(images, views)  # (B*views, C, crop, crop), image-major
    chunks = x.split(max_batch) if max_batch else (x,)
    probs = torch.softmax(torch.cat([model(c).float() for c in chunks]), dim=1)
    return probs.view(images.shape[0], views, -1).mean(dim=1)


@dataclass
class Counts:
    """Per-class tallies; sums over ranks are exact (integers)."""

    images: torch.Tensor  # (K,) int64
    top1: torch.Tensor  # (K,) correct at rank 1
    top5: torch.Tensor  # (K,) true class among the five most probable

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images, self.top1, self.top5

    @classmethod
    def zeros(cls, k: int, device) -> Counts:
        return cls(*(torch.zeros(k, dtype=torch.int64, device=device) for _ in range(3)))

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        k = min(5, probs.shape[1])
        hit = probs.topk(k, dim=1).indices == labels[:, None]
        ones = torch.ones_like(labels)
        self.images.index_add_(0, labels, ones)
        self.top1.index_add_(0, labels, hit[:, 0].long())
        self.top5.index_add_(0, labels, hit.any(dim=1).long())


def load_ensemble(paths: list[Path], device: torch.device):
    """Models, their checkpoints and test augmentations; all must predict the same classes."""
    from alexnet.checkpoint import load_model, view_augment

    models, ckpts, augs = [], [], []
    for path in paths:
        model, ckpt = load_model(path, map_location=device)
        if ckpts and list(ckpt.get("classes") or []) != list(ckpts[0].get("classes") or []):
            raise UserError(f"{path}: its classes differ from those of {paths[0]}")
        models.append(model.eval())
        ckpts.append(ckpt)
        augs.append(view_augment(ckpt))
    return models, ckpts, augs


def check_data(ds, ckpt: dict, model, path: Path) -> None:
    """The split must be labelled with the checkpoint's classes and have its channels."""
    classes = list(ckpt.get("classes") or [])
    if classes and len(classes) != len(ds.classes):
        raise UserError(f"{ds.root}: {len(ds.classes)} classes, {path} predicts {len(classes)}")
    if classes and classes != list(ds.classes):
        first = next(i for i, (a, b) in enumerate(zip(classes, ds.classes, strict=True)) if a != b)
        raise UserError(
            f"{ds.root}: class {first} is {ds.classes[first]!r}, but {path} calls it "
            f"{classes[first]!r} (give the converter --synsets, or evaluate on matching data)"
        )
    if ds.channels != model.conv1.in_channels:
        raise UserError(
            f"{ds.root}: {ds.channels}-channel images, {path} takes {model.conv1.in_channels}"
        )


@torch.no_grad()
def evaluate(
    models, augs, ds, *, views: int, batch_size: int, device, env, workers: int = 0, sizes=None
):
    """Per-class counts over this rank's share of ``ds``, summed over all ranks, for the
    ensemble of all ``models``: their view-averaged softmax averaged (PAPER F4). With
    ``sizes``, a list of counts instead, one for the ensemble of the first k models for each
    k in ``sizes``, from one pass in which each model runs once (the demo scores its first
    model and the ensemble together)."""
    from alexnet.data import make_loader
    from alexnet.runtime import distributed as D

    ks = [len(models)] if sizes is None else list(sizes)
    if not all(1 <= k <= len(models) for k in ks):
        raise ValueError(f"sizes {ks}: each must be between 1 and {len(models)} models")
    loader = make_loader(
        ds,
        batch_size,
        shuffle=False,
        num_workers=workers,
        rank=env.rank,
        world_size=env.world_size,
        pad=False,  # each image exactly once over all ranks
    )
    counts = [Counts.zeros(len(ds.classes), device) for _ in ks]
    label = f"evaluate {views} view{'s' * (views > 1)}"
    if env.world_size > 1:
        label += f" (rank 0 of {env.world_size})"
    mine = len(range(env.rank, len(ds), env.world_size))
    with Progress(mine, label, enabled=env.is_main) as progress:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            total = None  # the sum of the first i models' probabilities
            for i in range(max(ks)):
                # an engine takes all the views at once (``max_batch`` None), torch in chunks
                most = getattr(models[i], "max_batch", batch_size)
                p = view_probs(models[i], augs[i], images, views, max_batch=most)
                total = p if total is None else total + p
                for c, k in zip(counts, ks, strict=True):
                    if k == i + 1:
                        c.add(total / k, labels)
            progress.update(labels.shape[0])
    for c in counts:
        for t in c.tensors():
            D.all_reduce_sum(t)
    return counts[0] if sizes is None else counts


def summary(counts: Counts, views: int, paths: list[Path], split: str) -> dict:
    n = int(counts.images.sum())
    return {
        "top1_error": 1.0 - int(counts.top1.sum()) / max(n, 1),
        "top5_error": 1.0 - int(counts.top5.sum()) / max(n, 1),
        "images": n,
        "views": views,
        "models": len(paths),
        "checkpoints": [str(p) for p in paths],
        "split": split,
    }


def per_class_csv(counts: Counts, classes: list[str], names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_index", "class_id", "name", "images", "top1_acc", "top5_acc"])
    for i, (cid, name) in enumerate(zip(classes, names, strict=True)):
        n = int(counts.images[i])
        acc1 = f"{int(counts.top1[i]) / n:.6f}" if n else ""
        acc5 = f"{int(counts.top5[i]) / n:.6f}" if n else ""
        w.writerow([i, cid, name, n, acc1, acc5])
    return buf.getvalue()


def add_views_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--views",
        type=int,
        choices=(1, 10),
        default=1,
        help="1: centre crop; 10: corners + centre and reflections (PAPER B5)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from alexnet.interop.weights import add_weights_argument

    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        help="a checkpoint, run directory or .safetensors; repeat for an "
        "ensemble (softmax averaged, PAPER F4)",
    )
    add_weights_argument(parser, repeat=True)
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    parser.add_argument(
        "--split",
        help="default: test where the data has its official test set as a split "
        "(Fashion-MNIST, CIFAR-10), else val (ImageNet, as the paper reports, E2)",
    )
    add_views_argument(parser)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="images per batch per rank; also the most views per forward pass",
    )
    parser.add_argument("--workers", type=natural_int, default=0, help="loader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument("--results", type=output_file, help="also write the result JSON here")
    parser.add_argument("--per-class", type=output_file, help="write per-class accuracy CSV here")
    from alexnet.interop.engines import add_backend_argument

    add_backend_argument(parser)


def run(args: argparse.Namespace) -> int:
    from alexnet.data import PreparedDataset
    from alexnet.data.store import read_meta, report_split
    from alexnet.interop.weights import resolve
    from alexnet.runtime import distributed as D

    args.checkpoint = resolve(args.checkpoint, args.weights)  # named weights: cached files
    env = D.DistEnv.from_environ()
    device = devices.pick_device(args.device, env.local_rank)
    D.setup(env, device)
    try:
        if args.split is None:
            args.split, args.split_is = report_split(read_meta(args.data))
        ds = PreparedDataset(args.data, args.split)
        models, ckpts, augs = load_ensemble(args.checkpoint, device)
        for model, ckpt, path in zip(models, ckpts, args.checkpoint, strict=True):
            check_data(ds, ckpt, model, path)
        models = _backends(models, ckpts, args)
        t0 = time.perf_counter()
        counts = evaluate(
            models,
            augs,
            ds,
            views=args.views,
            batch_size=args.batch_size,
            device=device,
            env=env,
            workers=args.workers,
        )
        result = summary(counts, args.views, args.checkpoint, args.split)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["backends"] = _reports(models)
        if env.is_main:
            _report(result, counts, ds, args)
    finally:
        D.teardown()
    return 0


def _backends(models: list, ckpts: list, args: argparse.Namespace) -> list:
    from alexnet.interop import engines

    return [
        engines.for_inference(
            m, c, p, args.backend, precision=args.precision, batch_size=args.batch_size * args.views
        )
        for m, c, p in zip(models, ckpts, args.checkpoint, strict=True)
    ]


def _reports(models: list) -> list[str]:
    from alexnet.interop import engines

    return [line for line in map(engines.report, models) if line]


def _report(result: dict, counts: Counts, ds, args: argparse.Namespace) -> None:
    import sys

    for line in result.get("backends", []):
        print(f"alexnet evaluate: {line}", file=sys.stderr)
    if args.per_class:
        atomic_write_text(args.per_class, per_class_csv(counts, ds.classes, ds.class_names))
        result["per_class_csv"] = str(args.per_class)
    if args.results:
        atomic_write_json(args.results, result)
    if args.json:
        print(json.dumps(result))
        return
    what = f"{result['models']}-model ensemble" if result["models"] > 1 else "1 model"
    split = args.split + (f" ({args.split_is})" if getattr(args, "split_is", None) else "")
    print(f"{what}, {result['views']} view(s), {result['images']} images of {split}:")
    print(f"  top-1 error {100 * result['top1_error']:6.2f}%")
    print(f"  top-5 error {100 * result['top5_error']:6.2f}%")
