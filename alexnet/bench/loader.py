"""``alexnet bench-loader``: images/s of loading + augmentation from the prepared format,
beside the usual per-image approach on the original files, measured in the same run.

Prepared: ``make_loader`` (decode only; uint8 batches) then ``DeviceAugment`` on the CPU
(random crop, flip, PCA noise, mean image). Usual: a DataLoader over the original files doing
per image what torchvision's ImageNet recipe does with PIL: open, convert to RGB, resize the
shorter side to 256, random 224 crop, flip, to a float tensor, normalise. Both with 0, 1 and 2
worker processes; the figure is the median over repeats of steady-state images/s (the first
batch of each repeat, which pays for worker start-up, is not counted).

``--decoders pil simplejpeg turbojpeg nvjpeg`` instead compares the JPEG decoders of
``alexnet.data.decode`` on the same records: per decoder, decoding batches in one thread of
this process ("loop": decode and assemble the uint8 batch, one core; "loop cpu": the same
per second of that thread's CPU time) and through
``make_loader`` with ``--workers`` (default 1: one worker is one core), with the largest
difference from PIL's pixels; nvJPEG decodes whole batches on ``--device``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alexnet.data import decode
from alexnet.data.augment import DeviceAugment
from alexnet.data.dataset import PreparedDataset, make_loader
from alexnet.runtime.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="a prepared dataset directory")
    p.add_argument(
        "--source",
        type=Path,
        help="the original files for the baseline: a folder-per-class tree "
        "(default: the files listed in DATA/train.files.txt)",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="instead of --data: write N 500x375 JPEGs in a temporary folder tree, "
        "prepare them, and measure on those",
    )
    p.add_argument("--batches", type=int, default=8, help="batches per measurement (default 8)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--crop", type=int, default=224, help="crop side after loading (default 224)")
    p.add_argument("--workers", type=int, nargs="+", help="default 0 1 2 (with --decoders: 1)")
    p.add_argument(
        "--decoders",
        nargs="+",
        choices=[*decode.ORDER, "nvjpeg"],
        help="instead: compare these JPEG decoders on the records, in one thread and through "
        "the loader's workers, with their pixels against PIL's (nvjpeg: on --device)",
    )
    p.add_argument("--device", default="cuda", help="for nvjpeg (default cuda)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per figure; the median")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the main process (default 1: with worker processes "
        "on few cores, more threads oversubscribe them and every side slows)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


class _PilBaseline(torch.utils.data.Dataset):
    """The usual per-image pipeline, as torchvision's RandomResizedCrop-free ImageNet recipe."""

    def __init__(self, files: list[str], crop: int) -> None:
        self.files, self.crop = files, crop
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng(i)
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            w, h = img.size
            s = 256 / min(w, h)
            img = img.resize(
                (max(256, round(w * s)), max(256, round(h * s))), Image.Resampling.BILINEAR
            )
        w, h = img.size
        x, y = int(rng.integers(0, w - self.crop + 1)), int(rng.integers(0, h - self.crop + 1))
        img = img.crop((x, y, x + self.crop, y + self.crop))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        return (t - self.mean) / self.std


def _rate(batches, n_batches: int, work=lambda b: b) -> float:
    """Steady-state images/s over ``n_batches`` after the first batch."""
    it = iter(batches)
    work(next(it))
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        b = next(it)
        out = work(b)
        n += out.shape[0]
    return n / (time.perf_counter() - t0)


def _cycle(make):
    while True:
        yield from make()


def _measure_prepared(ds, args, workers: int, augment: bool) -> float:
    aug = DeviceAugment(ds.stats, args.crop, train=True)
    g = torch.Generator().manual_seed(0)
    loader = make_loader(
        ds, args.batch_size, shuffle=True, seed=0, num_workers=workers, drop_last=True
    )
    epoch = iter(range(10**9))

    def one_epoch():
        loader.set_epoch(next(epoch))
        return iter(loader)

    try:
        work = (lambda b: aug(b[0], g)) if augment else (lambda b: b[0])
        return _rate(_cycle(one_epoch), args.batches, work)
    finally:
        loader.close()


def _measure_pil(files: list[str], args, workers: int) -> float:
    need = (args.batches + 1) * args.batch_size
    sampler = torch.utils.data.RandomSampler(
        range(len(files)),
        replacement=len(files) < need,
        num_samples=need,
        generator=torch.Generator().manual_seed(0),
    )
    loader = torch.utils.data.DataLoader(
        _PilBaseline(files, args.crop),
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
    )
    return _rate(iter(loader), args.batches)


def _baseline_files(args, ds: PreparedDataset) -> list[str]:
    if args.source is not None:
        from alexnet.data.sources import folder_tree

        return [it.path for it in folder_tree(args.source)[1]]
    names = (ds.root / "train.files.txt").read_text().split("\n")
    files = [n for n in names if n]
    if not files or not Path(files[0]).is_file():
        raise UserError(f"{ds.root}: its sources are not plain files (a tar?); pass --source")
    return files


def _synthetic(n: int, tmp: Path) -> Path:
    from alexnet.data.prepare import prepare_folder

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for k in range(n):
        folder = tmp / "src" / f"class_{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        a = rng.uniform(-0.3, 0.3, (3, 2))
        img = 128 + x[..., None] * a[:, 0] + y[..., None] * a[:, 1]
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{k:05d}.JPEG", quality=90)
    return prepare_folder(tmp / "src", tmp / "prepared")


@contextlib.contextmanager
def _forced(name: str):
    """``ALEXNET_JPEG_DECODER=name`` for this process and the loader workers it starts."""
    before = os.environ.get(decode.ENV)
    os.environ[decode.ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(decode.ENV, None)
        else:
            os.environ[decode.ENV] = before


def _batch_indices(ds: PreparedDataset, args) -> list[np.ndarray]:
    """``--batches`` + 1 batches of a shuffled epoch, repeated if the split is short."""
    order = make_loader(ds, args.batch_size, shuffle=True, seed=0, drop_last=True).batches()
    return [order[k % len(order)] for k in range(args.batches + 1)]


def _measure_loop(ds: PreparedDataset, batches, name: str) -> tuple[float, float]:
    """One thread of this process decodes and assembles the uint8 batches: images per
    second of wall time, and per second of this thread's CPU time (the per-core rate, which
    other processes on a busy machine do not dilute)."""
    shape = ds.record_shape

    def one(idx):
        buf = np.empty((len(idx), *shape), np.uint8)
        for k, rec in enumerate(ds.records(idx)):
            decode.decode_into(rec, buf[k], name)
        return buf

    one(batches[0])
    t0, c0 = time.perf_counter(), time.thread_time()
    n = sum(one(idx).shape[0] for idx in batches[1:])
    return n / (time.perf_counter() - t0), n / (time.thread_time() - c0)


def _measure_nvjpeg(ds: PreparedDataset, batches, dec: decode.DeviceDecoder) -> float:
    def one(idx):
        x = dec(ds.records(idx))
        torch.cuda.synchronize(dec.device)
        return x

    return _rate(batches, len(batches) - 1, one)


def _max_diff_from_pil(ds: PreparedDataset, idx: np.ndarray, dec) -> int:
    """Largest |pixel - PIL's pixel| over the records ``idx``; ``dec`` maps records to
    uint8 (B, C, H, W)."""
    recs = ds.records(idx)
    pil = decode.DeviceDecoder("cpu", ds.record_shape, cpu="pil")(recs).int()
    return int((dec(recs).cpu().int() - pil).abs().max())


def _decoder_round(ds: PreparedDataset, args, name: str, batches, runs: dict) -> None:
    """One timing of each measure of decoder ``name``, appended to ``runs``."""
    if name == "nvjpeg":
        runs.setdefault("batch", []).append(_measure_nvjpeg(ds, batches, runs["decoder"]))
        return
    with _forced(name):
        wall, cpu = _measure_loop(ds, batches, name)
        runs.setdefault("loop", []).append(wall)
        runs.setdefault("loop_cpu", []).append(cpu)
        for w in args.workers:
            r = _measure_prepared(ds, args, w, augment=False)
            runs.setdefault(f"workers_{w}", []).append(r)


def _unavailable(ds: PreparedDataset, args, name: str) -> str | None:
    if name == "nvjpeg":
        return decode.nvjpeg_unavailable(args.device)
    if name not in decode.available():
        return f"not installed (installed: {', '.join(decode.available())})"
    return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _compare_decoders(ds: PreparedDataset, args) -> dict:
    """Per decoder: the runs, their medians and the largest difference from PIL."""
    if ds.storage != "jpeg":
        raise UserError(f"{ds.root}: records are stored {ds.storage!r}, not JPEG")
    batches = _batch_indices(ds, args)
    runs = {}
    for name in args.decoders:
        why = _unavailable(ds, args, name)
        if why:
            runs[name] = {"unavailable": why}
        elif name == "nvjpeg":
            runs[name] = {"decoder": decode.DeviceDecoder(args.device, ds.record_shape)}
        else:
            runs[name] = {"decoder": decode.DeviceDecoder("cpu", ds.record_shape, cpu=name)}
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        for name, r in runs.items():
            if "unavailable" not in r:
                _decoder_round(ds, args, name, batches, r)
    results = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
        "record_bytes_mean": float(np.mean([len(r) for i in batches for r in ds.records(i)])),
        "decoders": {},
    }
    for name, r in runs.items():
        dec = r.pop("decoder", None)
        for key in [k for k, v in r.items() if isinstance(v, list)]:
            r[f"{key}_median"] = statistics.median(r[key])
        if dec is not None:
            r["max_abs_diff_vs_pil"] = _max_diff_from_pil(ds, batches[0], dec)
        results["decoders"][name] = r
        if not args.json:
            print(f"{name:10s} " + _decoder_line(r), flush=True)
    return results


def _decoder_line(r: dict) -> str:
    if "unavailable" in r:
        return f"unavailable: {r['unavailable']}"
    rates = " | ".join(
        f"{k.removesuffix('_median').replace('_', ' ')} {v:7.1f} img/s"
        for k, v in r.items()
        if k.endswith("_median")
    )
    return f"{rates} | max |diff| from PIL {r['max_abs_diff_vs_pil']}"


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            args.data = _synthetic(args.synthetic, Path(tmp))
        if args.data is None:
            raise UserError("give --data PREPARED (and --source TREE) or --synthetic N")
        ds = PreparedDataset(args.data, "train")
        if len(ds) < args.batch_size:
            raise UserError(f"{args.data}: fewer than --batch-size {args.batch_size} images")
        if args.decoders:
            args.workers = args.workers or [1]
            results = _compare_decoders(ds, args)
            if args.json:
                print(json.dumps(results, indent=2))
            return 0
        args.workers = args.workers or [0, 1, 2]
        files = _baseline_files(args, ds)
        need = (args.batches + 1) * args.batch_size
        if len(ds) < args.batch_size or len(files) < args.batch_size:
            raise UserError(f"{args.data}: fewer than --batch-size {args.batch_size} images")
        results = {
            "data": str(args.data),
            "images": len(ds),
            "batch_size": args.batch_size,
            "batches": args.batches,
            "images_per_measure": need - args.batch_size,
            "threads": torch.get_num_threads(),
            "workers": {},
        }
        for w in args.workers:
            runs = {"decode": [], "prepared": [], "pil": []}
            for _ in range(args.repeats):  # interleaved, so load changes hit all alike
                runs["decode"].append(_measure_prepared(ds, args, w, augment=False))
                runs["prepared"].append(_measure_prepared(ds, args, w, augment=True))
                runs["pil"].append(_measure_pil(files, args, w))
            med = {k: statistics.median(v) for k, v in runs.items()}
            med["ratio"] = med["prepared"] / med["pil"]
            results["workers"][w] = med
            if not args.json:
                print(
                    f"workers {w}: prepared, decode only {med['decode']:7.1f} img/s | "
                    f"+ DeviceAugment on CPU {med['prepared']:7.1f} img/s | per-image PIL "
                    f"{med['pil']:7.1f} img/s | ratio {med['ratio']:4.2f}x",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0
