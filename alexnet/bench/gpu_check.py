"""The GPU check: ``make gpu-check`` (``python -m alexnet.bench.gpu_check``) on a machine
with one CUDA GPU writes ``gpu-check.json``.

Steps, each with its own time limit, the summary rewritten (atomically) after each so a
killed check still leaves what it found:

1. a prepared dataset of synthetic 256x256 JPEGs (``--images`` training, a tenth as many
   validation images, 10 classes), made by ``alexnet prepare folder`` (PAPER B1);
2. ``pytest -m gpu`` on that dataset (``ALEXNET_GPU_DATA``): LRN, augmentation, ten-view
   counts, a killed-and-resumed paper-model training, the two towers on cuda:0, nvJPEG;
3. ``alexnet bench --device cuda --model paper`` at batch 128, 256 and 512 (model only);
4. end to end from the prepared JPEGs: ``make_loader`` workers (CPU decoding, uint8 batches
   pinned and copied) or nvJPEG, then ``DeviceAugment`` and the training step on the GPU;
5. ``alexnet bench-loader --decoders``: the per-core CPU decoding rate and nvJPEG's.

The targets of the issue (paper model, one H100/H200): 40,000 images/s model-only bf16
training, 20,000 images/s end to end; the summary says whether each was met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from alexnet.runtime.args import output_file
from alexnet.runtime.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]  # the clone: tests/ lives here
TARGETS = {"model_only_train_ips": 40_000, "end_to_end_ips": 20_000}
BATCHES = (128, 256, 512)


def synthetic_jpegs(root: Path, n_train: int, n_val: int, classes: int = 10, seed: int = 0):
    """``root/src/{train,val}/<class>/<k>.jpg``: 256x256 JPEGs, a class-coloured gradient
    plus noise (learnable, compresses like a photo), then ``alexnet prepare folder``."""
    from PIL import Image

    from alexnet.cli import main

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256].astype(np.float32) / 256
    colours = rng.uniform(40, 215, (classes, 3))
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            c = k % classes
            folder = root / "src" / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            slope = rng.uniform(-60, 60, (3, 2))
            img = colours[c] + x[..., None] * slope[:, 0] + y[..., None] * slope[:, 1]
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{k:05d}.jpg", quality=90)
    out = root / "prepared"
    src = root / "src"
    argv = ["prepare", "folder", "--train", str(src / "train"), "--val", str(src / "val")]
    if main([*argv, str(out), "--size", "256"]) != 0:
        raise RuntimeError("preparing the synthetic JPEGs failed")
    return out


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """A subprocess with a time limit: return code, seconds, the tail of its output."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", _text(e.stdout), _text(e.stderr)
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "seconds": round(time.monotonic() - t0, 1),
        "stdout": out,
        "stderr_tail": err[-3000:],
    }


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _junit(path: Path) -> dict:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    if not path.is_file():
        return {"error": f"{path.name} not written"}
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                detail = (node.get("message") or "")[:500]
        tests[name] = {"outcome": outcome, "seconds": float(case.get("time", 0)), "detail": detail}
    counts = {
        k: sum(t["outcome"] == k for t in tests.values())
        for k in ("passed", "failed", "error", "skipped")
    }
    return {**counts, "tests": tests}


def run_pytest(data: Path, work: Path, timeout: float) -> dict:
    xml = work / "pytest-gpu.xml"
    env = {**os.environ, "ALEXNET_GPU_DATA": str(data)}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
        f"--junitxml={xml}",
        str(ROOT / "tests"),
    ]
    r = _run(cmd, timeout, env)
    r["stdout"] = r["stdout"][-3000:]
    return {**r, **_junit(xml)}


def _run_json(cmd: list[str], timeout: float) -> dict:
    """``_run``, with the command's JSON output parsed into ``result`` (None if it is not)."""
    r = _run(cmd, timeout)
    try:
        r["result"] = json.loads(r.pop("stdout"))
    except ValueError:
        r["result"] = None
    return r


def run_bench(batch: int, timeout: float) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "alexnet",
        "bench",
        "--device",
        "cuda",
        "--model",
        "paper",
        "--batch-size",
        str(batch),
        "--rounds",
        "5",
        "--steps",
        "10",
        "--warmup",
        "3",
        "--no-end-to-end",
        "--json",
    ]
    return _run_json(cmd, timeout)


def run_bench_loader(data: Path, workers: int, timeout: float) -> dict:
    from alexnet.data import decode

    cmd = [
        sys.executable,
        "-m",
        "alexnet",
        "bench-loader",
        "--data",
        str(data),
        "--decoders",
        *decode.available(),
        "nvjpeg",
        "--workers",
        "1",
        str(workers),
        "--batch-size",
        "128",
        "--batches",
        "10",
        "--repeats",
        "3",
        "--crop",
        "224",
        "--json",
    ]
    return _run_json(cmd, timeout)


def _batches(ds, loader, dec):
    """Endless uint8 batches: the loader's (CPU decoding in its workers), or nvJPEG's."""
    import torch

    for epoch in range(10**6):
        loader.set_epoch(epoch)
        if dec is None:
            yield from loader
        else:
            for idx in loader.batches():
                yield dec(ds.records(idx)), ds.labels[torch.from_numpy(idx)]


def end_to_end(
    data: Path,
    batch: int,
    workers: int,
    steps: int,
    nvjpeg: bool,
    device: str = "cuda",
    arch: str = "paper",
    crop: int = 224,
) -> dict:
    """Images/s of the paper model's bf16 training step fed from the prepared JPEGs, and of
    the same step alone on a batch already on the device (interleaved, medians of 3).
    ``arch`` and ``crop`` other than the paper's are for testing this on a CPU."""
    import torch

    from alexnet.bench.speed import RunSettings, make_steps
    from alexnet.data import DeviceAugment, PreparedDataset, make_loader
    from alexnet.data.decode import DeviceDecoder
    from alexnet.model import AlexNet

    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.backends.cudnn.benchmark = True
    ds = PreparedDataset(data, "train")
    dec = DeviceDecoder(device, ds.record_shape) if nvjpeg else None
    if dec is not None and dec.backend != "nvjpeg":
        return {"unavailable": dec.reason}
    model = AlexNet(len(ds.classes), arch=arch, image_size=crop)
    settings = RunSettings("bf16", channels_last=True, compile=False)
    steps_of = make_steps(model, settings, device, batch, crop, len(ds.classes))
    train_model, _, train_batch, _ = steps_of
    aug = DeviceAugment(ds.stats, crop, train=True, channels_last=True)
    gen = torch.Generator(device=device).manual_seed(0)
    loader = make_loader(
        ds,
        batch,
        shuffle=True,
        drop_last=True,
        pin_memory=cuda,
        num_workers=0 if nvjpeg else workers,
    )

    it = _batches(ds, loader, dec)

    def step():
        images, labels = next(it)
        images = images.to(device, non_blocking=True)
        train_batch(aug(images, gen), labels.to(device, non_blocking=True))

    for _ in range(5):  # warm-up: cuDNN's autotuner, the workers' first batches
        step()
    rates = {"e2e": [], "model": []}
    for _ in range(3):
        for name, fn in (("e2e", step), ("model", train_model)):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            rates[name].append(batch * steps / (time.perf_counter() - t0))
    loader.close()
    e2e, alone = statistics.median(rates["e2e"]), statistics.median(rates["model"])
    return {
        "batch": batch,
        "workers": loader.num_workers,
        "decode": dec.backend if dec else "cpu",
        "end_to_end_ips": e2e,
        "model_only_ips": alone,
        "fraction": e2e / alone,
    }


def _environment() -> dict:
    import torch

    from alexnet.data import decode

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "jpeg_decoders": decode.available(),
        "nvjpeg": decode.nvjpeg_unavailable("cuda") or "available",
    }
    if env["cuda_available"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    rev = _run(["git", "rev-parse", "HEAD"], 10)
    env["git"] = rev["stdout"].strip() if rev["rc"] == 0 else None
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=output_file, default=Path("gpu-check.json"))
    p.add_argument("--images", type=int, default=4096, help="synthetic training JPEGs")
    p.add_argument("--workdir", type=Path, help="keep the dataset here (default: a temp dir)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pytest", "bench", "e2e", "loader"])
    p.add_argument(
        "--budget", type=float, default=420, help="seconds for all steps after the dataset"
    )


def _targets(summary: dict) -> dict:
    train = [b["result"]["train_ips"] for b in summary.get("bench", {}).values() if b.get("result")]
    e2e = [
        r["end_to_end_ips"] for r in summary.get("end_to_end", {}).values() if "end_to_end_ips" in r
    ]
    best = {
        "model_only_train_ips": max(train, default=None),
        "end_to_end_ips": max(e2e, default=None),
    }
    return {
        k: {"target": t, "best": best[k], "met": best[k] is not None and best[k] >= t}
        for k, t in TARGETS.items()
    }


def _decode_per_core(loader: dict) -> dict:
    """Each CPU decoder's images per core-second (one thread, CPU time) and 16 times that."""
    found = ((loader or {}).get("result") or {}).get("decoders", {})
    return {
        name: {"per_core": r["loop_cpu_median"], "16_cores": 16 * r["loop_cpu_median"]}
        for name, r in found.items()
        if "loop_cpu_median" in r
    }


def check(args: argparse.Namespace, work: Path) -> dict:
    s = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_environment()}
    save = lambda: atomic_write_json(args.out, s)  # noqa: E731
    save()
    if not s["cuda_available"]:
        s["ok"], s["error"] = False, "no CUDA device: the GPU check needs one"
        return s
    t0 = time.monotonic()
    left = lambda limit: max(1.0, min(limit, t0 + args.budget - time.monotonic()))  # noqa: E731
    data = work / "prepared"
    if not (data / "meta.json").is_file():
        data = synthetic_jpegs(work, args.images, max(args.images // 10, 256))
    s["dataset"] = {"path": str(data), "train": args.images, "seconds": time.monotonic() - t0}
    save()
    workers = max(1, (os.cpu_count() or 2) - 1)  # one core left for the training process
    if "pytest" not in args.skip:
        s["pytest"] = run_pytest(data, work, timeout=left(240))
        save()
    if "bench" not in args.skip:
        s["bench"] = {}
        for b in BATCHES:
            s["bench"][str(b)] = run_bench(b, timeout=left(75))
            save()
    if "e2e" not in args.skip:
        s["end_to_end"] = {}
        for name, nv in (("cpu_workers", False), ("nvjpeg", True)):
            try:
                s["end_to_end"][name] = end_to_end(data, 256, workers, 20, nv)
            except Exception as e:  # a failure here is a finding; the other steps still run
                s["end_to_end"][name] = {"error": f"{type(e).__name__}: {e}"}
            save()
    if "loader" not in args.skip:
        s["loader"] = run_bench_loader(data, workers, timeout=left(120))
        s["decode_per_core"] = _decode_per_core(s["loader"])
    s["targets"] = _targets(s)
    p = s.get("pytest", {})
    s["ok"] = p.get("rc", 0) == 0 and not p.get("failed") and not p.get("error")
    runs = [
        ("pytest", p),
        *((f"bench {k}", v) for k, v in s.get("bench", {}).items()),
        ("bench-loader", s.get("loader", {})),
    ]
    s["steps_failed"] = [name for name, r in runs if r and r.get("rc", 0) != 0]
    s["seconds"] = round(time.monotonic() - t0, 1)
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alexnet.bench.gpu_check", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alexnet-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        summary = check(args, work)
    atomic_write_json(args.out, summary)
    keys = ("ok", "error", "steps_failed", "targets", "decode_per_core", "seconds")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
