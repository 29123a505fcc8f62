"""The GPU check, for the day a CUDA GPU is at hand: ``make gpu-check`` in a clone, or

    python3 -m alexnet.bench.gpu_check --out gpu-check.json      # from the clone's root

It runs with the Python it is started with, whose CUDA build of torch it uses as it is:
nothing is installed and nothing is downloaded (the machine may have no network), and none
of the optional packages is needed (JPEG decoding falls back to PIL, inference to torch and
ONNX Runtime). Steps, each with its own time limit; after each, a line says what it found
and the summary (``--out``) is rewritten, so a check stopped at any point keeps its findings:

1. dataset: ``--images`` synthetic 256x256 JPEGs (a tenth as many for validation, 10
   classes), prepared by ``alexnet.data.prepare.prepare_folder`` (PAPER B1);
2. pytest: ``pytest -m gpu`` on that dataset (LRN, augmentation, ten views, a killed and
   resumed paper-model run, two towers on cuda:0, nvJPEG, no host synchronisation);
3. bench: ``alexnet bench --device cuda --model paper`` at batch 128, 256 and 512;
4. end to end: the prepared JPEGs through ``make_loader`` workers (CPU decoding) or nvJPEG,
   ``DeviceAugment`` and the paper model's bf16 training step with ``PaperSGD`` (PAPER D1,
   what ``alexnet train`` runs), against the same step alone on a batch already there;
5. loader: ``alexnet bench-loader --decoders``, each CPU decoder's rate per core (and
   nvJPEG's).

``--budget`` (seconds) counts from the end of the dataset step. Planned on one H100: the
dataset ~30 s, pytest at most 180 s, the benches 3 x 50 s, end to end 60 s, the loader 60 s:
under 8 minutes. A step over its limit is stopped with every process it started (a training
a test left running would otherwise hold the GPU through the benches). Without CUDA (a
rehearsal on a CPU machine, which ``make test`` runs offline), the steps that need it are
reported as skipped, not failed, and the others run. Exit status 0: no step failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
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
LIMITS = {"pytest": 180, "bench": 50, "e2e": 60, "loader": 60}  # seconds, each
NO_CUDA = "no CUDA device (a rehearsal: this step needs one)"


def synthetic_jpegs(root: Path, n_train: int, n_val: int, classes: int = 10, seed: int = 0):
    """``root/src/{train,val}/<class>/<k>.jpg``: 256x256 JPEGs, a class-coloured gradient
    plus noise (learnable, compresses like a photo), prepared into ``root/prepared``."""
    from PIL import Image

    from alexnet.data.prepare import Options, prepare_folder

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
    src = root / "src"
    return prepare_folder(
        src / "train", root / "prepared", val=src / "val", options=Options(size=256)
    )


# ------------------------------------------------------------------------ running steps
def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """A subprocess in a session of its own, with a time limit: over it, the whole session
    (the command and every process it started) is killed. Return code, seconds, output."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
        rc: int | str = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = "timeout"
    return {
        "cmd": " ".join(cmd),
        "rc": rc,
        "seconds": round(time.monotonic() - t0, 1),
        "stdout": out or "",
        "stderr_tail": (err or "")[-3000:],
    }


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
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "why": "pytest is not installed"}
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
        f"--junitxml={xml}",
        "--rootdir",
        str(ROOT),
        str(ROOT / "tests"),
    ]
    r = _run(cmd, timeout, env)
    r["stdout"] = r["stdout"][-3000:]
    r.update(_junit(xml))
    failed = r["rc"] not in (0, 5) or r.get("failed") or r.get("error")
    ran = r.get("passed", 0)
    r["status"] = "failed" if failed else ("passed" if ran else "skipped")
    return r


def _run_json(cmd: list[str], timeout: float) -> dict:
    """``_run``, with the command's JSON output parsed into ``result`` (None if it is not)."""
    r = _run(cmd, timeout)
    try:
        r["result"] = json.loads(r.pop("stdout"))
    except ValueError:
        r["result"] = None
    r["status"] = "passed" if r["rc"] == 0 and r["result"] is not None else "failed"
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


def run_bench_loader(data: Path, workers: int, timeout: float, cuda: bool) -> dict:
    from alexnet.data import PreparedDataset, decode

    decoders = [*decode.available(), *(["nvjpeg"] if cuda else [])]
    batch = min(128, len(PreparedDataset(data, "train")))
    cmd = [
        sys.executable,
        "-m",
        "alexnet",
        "bench-loader",
        "--data",
        str(data),
        "--decoders",
        *decoders,
        "--workers",
        *sorted({"1", str(workers)}),
        "--batch-size",
        str(batch),
        "--batches",
        "10",
        "--repeats",
        "3",
        "--crop",
        "224",
        "--json",
    ]
    if cuda:
        cmd += ["--device", "cuda"]
    return _run_json(cmd, timeout)


def end_to_end(data: Path, workers: int, nvjpeg: bool, device: str = "cuda", **kw) -> dict:
    """Step 4: the paper model's bf16 channels_last training step with PaperSGD (what
    ``alexnet train`` runs) fed from the prepared JPEGs, at batch 256, 20 steps a stretch
    (alexnet/bench/end_to_end.py). ``kw``: other sizes, for testing this on a CPU."""
    import torch

    from alexnet.bench import end_to_end as e2e
    from alexnet.bench.steps import RunSettings

    torch.backends.cudnn.benchmark = True
    settings = RunSettings("bf16", channels_last=True, compile=False, optimizer="paper")
    args = {"arch": "paper", "batch": 256, "steps": 20, **kw}
    batch = args.pop("batch")
    return e2e.measure(data, settings, device, batch, workers=workers, nvjpeg=nvjpeg, **args)


# ----------------------------------------------------------------------------- summary
def _environment() -> dict:
    import torch

    from alexnet.data import decode

    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "jpeg_decoders": decode.available(),
        "nvjpeg": decode.nvjpeg_unavailable("cuda") or "available",
    }
    if env["cuda_available"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        env["git"] = rev.stdout.strip() if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


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


class Check:
    """The summary, rewritten after each step, and a line said per step."""

    def __init__(self, out: Path, steps: int) -> None:
        self.out, self.steps, self.done = out, steps, 0
        self.s = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **_environment(),
            "steps": {},
        }
        self.save()

    def save(self) -> None:
        atomic_write_json(self.out, self.s)

    def step(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.done += 1
        self.s["steps"][name] = {"status": status, "seconds": round(seconds, 1), "detail": detail}
        self.save()
        tail = f": {detail}" if detail else ""
        print(
            f"gpu-check [{self.done}/{self.steps}] {name}: {status} in {seconds:.0f} s{tail}",
            flush=True,
        )


def _bench_step(c: Check, left) -> None:
    """``alexnet bench`` at each of ``BATCHES``, within ``left``'s time."""
    s, cuda = c.s, c.s["cuda_available"]
    s["bench"] = {}
    for b in BATCHES:
        if not cuda:
            continue
        s["bench"][str(b)] = run_bench(b, left(LIMITS["bench"]))
    runs = s["bench"].values()
    failed = any(r["status"] == "failed" for r in runs)
    status = "skipped" if not cuda else "failed" if failed else "passed"
    ips = [
        f"{b}: {r['result']['train_ips']:.0f} img/s"
        for b, r in s["bench"].items()
        if r.get("result")
    ]
    c.step("bench", status, sum(r["seconds"] for r in runs), ", ".join(ips) or NO_CUDA)


def _end_to_end_step(c: Check, data: Path) -> None:
    """The prepared JPEGs through the training step, decoded by CPU workers and by nvJPEG."""
    s, cuda = c.s, c.s["cuda_available"]
    t1, s["end_to_end"] = time.monotonic(), {}
    workers = max(1, (os.cpu_count() or 2) - 1)  # one core left for the training process
    for name, nv in (("cpu_workers", False), ("nvjpeg", True)) if cuda else ():
        try:
            s["end_to_end"][name] = end_to_end(data, workers, nv)
        except Exception as e:  # a failure here is a finding; the other steps still run
            s["end_to_end"][name] = {"error": f"{type(e).__name__}: {e}"}
    errors = [r["error"] for r in s["end_to_end"].values() if "error" in r]
    status = "skipped" if not cuda else "failed" if errors else "passed"
    found = [
        f"{k}: {r['end_to_end_ips']:.0f} img/s"
        for k, r in s["end_to_end"].items()
        if "end_to_end_ips" in r
    ]
    c.step("end to end", status, time.monotonic() - t1, "; ".join(errors + found) or NO_CUDA)


def check(args: argparse.Namespace, work: Path) -> dict:
    c = Check(args.out, 5)
    s, cuda = c.s, c.s["cuda_available"]
    t0 = time.monotonic()
    data = work / "prepared"
    if not (data / "meta.json").is_file():
        data = synthetic_jpegs(work, args.images, max(args.images // 10, 64))
    s["dataset"] = {"path": str(data), "train": args.images}
    c.step("dataset", "passed", time.monotonic() - t0, f"{args.images} JPEGs prepared")
    t0 = time.monotonic()  # the budget starts here, after the dataset (--budget)

    def left(limit: float) -> float:
        return max(1.0, min(limit, t0 + args.budget - time.monotonic()))

    if "pytest" not in args.skip:
        s["pytest"] = p = run_pytest(data, work, left(LIMITS["pytest"]))
        counts = ", ".join(f"{p.get(k, 0)} {k}" for k in ("passed", "failed", "skipped"))
        c.step("pytest", p["status"], p.get("seconds", 0), p.get("why") or counts)
    if "bench" not in args.skip:
        _bench_step(c, left)
    if "e2e" not in args.skip:
        _end_to_end_step(c, data)
    if "loader" not in args.skip:
        workers = max(1, (os.cpu_count() or 2) - 1)
        s["loader"] = r = run_bench_loader(data, workers, left(LIMITS["loader"]), cuda)
        s["decode_per_core"] = _decode_per_core(r)
        per_core = [f"{k} {v['per_core']:.0f}/s" for k, v in s["decode_per_core"].items()]
        c.step("loader", r["status"], r["seconds"], "per core: " + ", ".join(per_core))
    s["targets"] = _targets(s)
    s["steps_failed"] = [name for name, st in s["steps"].items() if st["status"] == "failed"]
    s["ok"] = not s["steps_failed"]
    s["seconds"] = round(time.monotonic() - t0, 1)
    c.save()
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=output_file, default=Path("gpu-check.json"), help="the summary")
    p.add_argument("--images", type=int, default=4096, help="synthetic training JPEGs")
    p.add_argument("--workdir", type=Path, help="keep the dataset here (default: a temp dir)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pytest", "bench", "e2e", "loader"])
    p.add_argument(
        "--budget", type=float, default=420, help="seconds for all steps after the dataset"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alexnet.bench.gpu_check", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alexnet-gpu-check-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        summary = check(args, work)
    keys = ("ok", "cuda_available", "steps_failed", "targets", "decode_per_core", "seconds")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
