"""``alexnet evaluate``: top-1 / top-5 error of one network or an ensemble (PAPER B5, E, F4).

    alexnet evaluate --checkpoint runs/x --data data/imagenet --views 10
    alexnet evaluate --checkpoint a.pt --checkpoint b.pt --data DIR --views 10 --json
    alexnet evaluate --weights bvlc_alexnet --data data/imagenet --views 1
    alexnet evaluate --checkpoint runs/x --data photos/val          # a folder of images
    torchrun --nproc-per-node 8 -m alexnet evaluate --checkpoint a.pt --data DIR --views 10

``--data`` is a prepared dataset, or a folder of images (one folder per class, named as
the network's classes; or ``train/``, ``val/``, ``test/`` folders of such), prepared once
into a cache at the network's stored size (``alexnet.data.folders``). ``--views 1`` scores
the centre crop; ``--views 10`` averages the softmax over the four corner crops, the centre
crop and their reflections (PAPER B5). Several networks average their (view-averaged)
softmax outputs (PAPER F4: the paper's 5- and 7-CNN results). Under torchrun each rank
scores a disjoint share of the split (no image is padded in twice) and the per-class counts
are summed over ranks; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet.data.folders import add_data_argument
from alexnet.inference import (
    NonFiniteOutput,
    Predictor,
    add_model_arguments,
    add_views_argument,
    card_of,
    load_from_args,
    sources_of,
    view_probs,
)
from alexnet.runtime import devices
from alexnet.runtime.args import natural_int, output_file
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_json, atomic_write_text
from alexnet.runtime.progress import Progress


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


def _progress_label(views: int, env) -> str:
    label = f"evaluate {views} view{'s' * (views > 1)}"
    if env.world_size > 1:
        label += f" (rank 0 of {env.world_size})"
    return label


def _score(predictors, images, labels, views: int, batch_size: int, counts, ks) -> torch.Tensor:
    """Add one batch to ``counts``: each ``counts[j]`` scores the ensemble of the first
    ``ks[j]`` networks. Returns the summed probabilities of the first ``max(ks)``."""
    total = None  # the sum of the first i networks' probabilities
    for i in range(max(ks)):
        p = predictors[i]
        # an engine takes all the views at once (``max_batch`` None), torch in chunks
        most = getattr(p.model, "max_batch", batch_size)
        probs = view_probs(p.model, p.test_views, images, views, max_batch=most)
        total = probs if total is None else total + probs
        for c, k in zip(counts, ks, strict=True):
            if k == i + 1:
                c.add(total / k, labels)
    return total


@torch.no_grad()
def evaluate(
    predictors: list[Predictor],
    ds,
    *,
    views: int,
    batch_size: int,
    env,
    workers: int = 0,
    sizes=None,
):
    """Per-class counts over this rank's share of ``ds``, summed over all ranks, for the
    ensemble of all ``predictors``: their view-averaged softmax averaged (PAPER F4). With
    ``sizes``, a list of counts instead, one for the ensemble of the first k networks for
    each k in ``sizes``, from one pass in which each network runs once (the demo scores its
    first model and the ensemble together). Nothing is read back from the device until the
    end; probabilities that were not finite anywhere are refused then."""
    from alexnet.data import make_loader
    from alexnet.runtime import distributed as D

    ks = [len(predictors)] if sizes is None else list(sizes)
    if not all(1 <= k <= len(predictors) for k in ks):
        raise ValueError(f"sizes {ks}: each must be between 1 and {len(predictors)} models")
    device = predictors[0].device
    loader = make_loader(
        ds,
        batch_size,
        shuffle=False,
        num_workers=workers,
        rank=env.rank,
        world_size=env.world_size,
        pad=False,  # each image exactly once over all ranks
        pin_memory=devices.pin_memory(device),
    )
    counts = [Counts.zeros(len(ds.classes), device) for _ in ks]
    finite = torch.ones((), dtype=torch.bool, device=device)
    mine = len(range(env.rank, len(ds), env.world_size))
    with Progress(mine, _progress_label(views, env), enabled=env.is_main) as progress:
        for images, labels in loader:
            images, labels = devices.to_device(images, device), devices.to_device(labels, device)
            total = _score(predictors, images, labels, views, batch_size, counts, ks)
            finite &= torch.isfinite(total).all()
            progress.update(labels.shape[0])
    if not bool(D.all_reduce_min(finite.to(torch.int32))):
        raise NonFiniteOutput(
            f"{ds.root}: the network's class probabilities were not finite (NaN or infinite) "
            "for some images: its weights are damaged or training diverged"
        )
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, ensemble=True)
    data = parser.add_argument_group("the images")
    add_data_argument(data)
    data.add_argument(
        "--split",
        help="default: test where the data has a test split (Fashion-MNIST, CIFAR-10, a "
        "folder's test/), else val (ImageNet, as the paper reports, E2); a single folder of "
        "classes: its images",
    )
    add_views_argument(data)
    data.add_argument("--workers", type=natural_int, default=0, help="loader worker processes")
    out = parser.add_argument_group("the results")
    out.add_argument("--json", action="store_true", help="print the result as JSON only")
    out.add_argument("--results", type=output_file, help="also write the result JSON here")
    out.add_argument("--per-class", type=output_file, help="write per-class accuracy CSV here")


def run(args: argparse.Namespace) -> int:
    from alexnet.data.folders import open_split
    from alexnet.runtime import distributed as D

    env = D.DistEnv.from_environ()
    D.setup(env, devices.pick_device(args.device, env.local_rank))
    try:
        sources = sources_of(args)
        cards = [card_of(s) for s in sources]
        for source, card in zip(sources[1:], cards[1:], strict=True):
            if card.classes != cards[0].classes:
                raise UserError(f"{source}: its classes differ from those of {sources[0]}")
        card = cards[0]
        ds, args.split_is = open_split(
            args.data,
            args.split,
            size=card.stored_size,
            classes=list(card.classes),
            channels=card.channels,
        )
        args.split = ds.split
        predictors = [
            load_from_args(args, s, local_rank=env.local_rank, inputs=len(ds)) for s in sources
        ]
        for p in predictors:
            p.check_data(ds)
        t0 = time.perf_counter()
        counts = evaluate(
            predictors,
            ds,
            views=args.views,
            batch_size=args.batch_size,
            env=env,
            workers=args.workers,
        )
        result = summary(counts, args.views, [p.path for p in predictors], args.split)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["backends"] = [line for line in (p.report() for p in predictors) if line]
        if env.is_main:
            _report(result, counts, ds, args)
    finally:
        D.teardown()
    return 0


def _report(result: dict, counts: Counts, ds, args: argparse.Namespace) -> None:
    """The result on stdout first, then its files: a file that cannot be written (a full
    disk) is one error line, with the figures already on the screen."""
    for line in result.get("backends", []):
        print(f"alexnet evaluate: {line}", file=sys.stderr)
    if args.per_class:
        result["per_class_csv"] = str(args.per_class)
    if args.json:
        print(json.dumps(result, allow_nan=False), flush=True)
    else:
        what = f"{result['models']}-model ensemble" if result["models"] > 1 else "1 model"
        split = args.split + (f" ({args.split_is})" if getattr(args, "split_is", None) else "")
        if ds.meta.get("folder_split") == args.split:  # a folder of images: no split of its own
            split = f"{args.data}, a folder of images"
        print(f"{what}, {result['views']} view(s), {result['images']} images of {split}:")
        print(f"  top-1 error {100 * result['top1_error']:6.2f}%")
        print(f"  top-5 error {100 * result['top5_error']:6.2f}%", flush=True)
    if args.per_class:
        atomic_write_text(args.per_class, per_class_csv(counts, ds.classes, ds.class_names))
    if args.results:
        atomic_write_json(args.results, result)
