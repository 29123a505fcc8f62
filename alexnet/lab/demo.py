"""``alexnet demo``: the whole system end to end on real data (Fashion-MNIST), on a CPU.

    alexnet demo [--out runs/demo] [--data data/fashion-mnist] [--epochs N] [--quick]
                 [--models K [--jobs J]]

1. data: the four IDX files of Fashion-MNIST (60,000 training and 10,000 test images), from
   Debian's ``dataset-fashion-mnist`` (installed with apt-get when we are root and it is
   missing) or else the canonical download, MD5-checked;
2. prepare: the prepared format of ``alexnet prepare`` (skipped when the directory is there
   and verifies);
3. train: the ``small`` network with the paper's recipe scaled to the data (the ``demo``
   preset of alexnet/recipes.py);
   a finished run is reused, an interrupted one resumed (``--retrain`` starts afresh);
   with ``--models K`` the K models train at the same time on a CPU, one process per core;
4. evaluate: top-1/top-5 error on the 10,000 test images, centre view and ten views (PAPER B5),
   and the softmax-averaged ensemble with ``--models K`` (PAPER F4);
5. figures: conv1 kernels (F1), top-5 predictions (F2), fc7 neighbours (F3), training curves;
6. ``report.md`` and ``results.json`` in the run directory.

Fashion-MNIST has no validation split: preparation holds 5,000 of the 60,000 training images
out as ``val`` (stratified, seeded), which training validates on after every epoch, and keeps
the official test set as ``test``, which only the reported numbers use. The schedule is a
fixed one and the model reported is the last one.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from alexnet import config as C
from alexnet import evaluate as E
from alexnet.checkpoint import resolve
from alexnet.data import PreparedDataset
from alexnet.inference import Predictor
from alexnet.lab.fashion import ensure_prepared
from alexnet.lab.report import make_figures, pct, write_report
from alexnet.lab.runs import train_one
from alexnet.recipes import DEMO_EPOCHS, schedule_for
from alexnet.runtime import distributed as D
from alexnet.runtime.errors import UserError
from alexnet.runtime.runlog import environment, read_metrics

QUICK_EPOCHS = 1


def demo_config(data: Path, out: Path, *, epochs: int, seed: int, name: str = "train"):
    """The ``demo`` preset (alexnet/recipes.py) for ``epochs`` on ``data``. A run that is
    already there keeps the rate cuts it was started with, so ``--epochs N`` extends a
    finished demo at its last rate instead of asking for another schedule."""
    run_dir = out / name
    milestones = schedule_for(epochs)
    kept = _milestones_of(run_dir)
    if kept is not None and kept != milestones:
        print(
            f"demo: {run_dir} was started with rate cuts after epochs {list(kept)}: "
            f"keeping them for {epochs} epochs",
            flush=True,
        )
        milestones = kept
    return C.preset(
        "demo",
        **{
            "data.root": str(data),
            "schedule.epochs": epochs,
            "schedule.milestones": milestones,
            "run.seed": seed,
            "run.out_dir": str(out),
            "run.name": name,
        },
    )


def _milestones_of(run_dir: Path) -> tuple[int, ...] | None:
    path = run_dir / "config.json"
    if not resolve(run_dir).is_file() or not path.is_file():
        return None
    return tuple(C.load_file(path).schedule.milestones)


# ----------------------------------------------------------------------------- 3. train
def default_jobs(models: int) -> int:
    """How many models train at once: on a CPU, one per core (up to ``models``), since a
    small net uses several cores in one process poorly (docs/RESULTS.md, the demo's
    ensemble); on a GPU, one."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(models, torch.get_num_threads()))


def _train_child(cfg, retrain: bool, threads: int, log: Path | None) -> dict:
    """``train_one`` in a child process with ``threads`` intra-op threads, its output in
    ``log`` (None: this console)."""
    torch.set_num_threads(threads)
    if log is None:
        return train_one(cfg, retrain=retrain)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", buffering=1) as f:
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            return train_one(cfg, retrain=retrain)


def train_all(cfgs: list, *, retrain: bool, jobs: int) -> list[dict]:
    """Train every config, ``jobs`` at a time: one after another in this process when
    ``jobs`` is 1, else in child processes that share the intra-op threads out; the first
    run prints on this console, the others into ``<out>/<name>.log``, and a line here marks
    each run's end. Each run resumes or is reused as ``train_one`` decides, so an
    interrupted ensemble continues where it stopped."""
    if jobs <= 1 or len(cfgs) == 1:
        return [train_one(c, retrain=retrain) for c in cfgs]
    jobs = min(jobs, len(cfgs))
    threads = max(1, torch.get_num_threads() // jobs)
    logs = [None] + [Path(c.run.out_dir) / f"{c.run.name}.log" for c in cfgs[1:]]
    print(
        f"demo: training {len(cfgs)} models, {jobs} at once with {threads} thread(s) each; "
        f"the others' output: {', '.join(str(g) for g in logs[1:])}",
        flush=True,
    )
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_train_child, c, retrain, threads, log)
            for c, log in zip(cfgs, logs, strict=True)
        ]
        try:
            for n, f in enumerate(as_completed(futures), 1):
                r = f.result()  # the first failed run raises here
                print(f"demo: finished {n}/{len(cfgs)}: {r['run_dir']}", flush=True)
            return [f.result() for f in futures]
        except BaseException:
            # A failed run (or Ctrl-C, which reaches the children too: each saves a
            # checkpoint and stops) ends the ensemble: runs not yet started are not started,
            # those in progress are waited for.
            print("demo: stopping; waiting for the runs in progress", flush=True)
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# -------------------------------------------------------------------------- 4. evaluate
def evaluate_runs(checkpoints: list[Path], data: Path) -> dict:
    """Centre and ten-view results of the first model and, for several, of the ensemble."""
    # the networks in torch fp32, channels_last (faster oneDNN convolutions)
    predictors = [Predictor.of_network(c, device="cpu", channels_last=True) for c in checkpoints]
    ds = PreparedDataset(data, "test")
    for p in predictors:
        p.check_data(ds)
    env = D.DistEnv.from_environ()
    out: dict = {}
    groups = [("single", 1)] + ([("ensemble", len(predictors))] if len(predictors) > 1 else [])
    for views in (1, 10):
        # one pass scores the first model and the ensemble: each model runs once
        t0 = time.perf_counter()
        counts = E.evaluate(
            predictors, ds, views=views, batch_size=100, env=env, sizes=[k for _, k in groups]
        )
        seconds = round(time.perf_counter() - t0, 2)
        for (what, k), c in zip(groups, counts, strict=True):
            res = E.summary(c, views, checkpoints[:k], "test")
            res["seconds"] = seconds  # the pass's, shared by the single model and the ensemble
            res["per_class_top1_accuracy"] = (c.top1 / c.images.clamp(min=1)).tolist()
            out[f"{what}_{views}view"] = res
            print(
                f"demo: {what} ({k} model{'s' * (k > 1)}), {views} view(s): top-1 error "
                f"{100 * res['top1_error']:.2f}%, top-5 {100 * res['top5_error']:.2f}%"
            )
    return out


# --------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="the demo's directory: training runs, figures, report.md",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/fashion-mnist"),
        help="prepared dataset directory (prepared here if missing)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="a folder with the Fashion-MNIST IDX files "
        "(default: the Debian package, else the canonical download)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"training epochs (default {DEMO_EPOCHS}; --quick: {QUICK_EPOCHS})",
    )
    parser.add_argument(
        "--models",
        type=int,
        default=1,
        help="train this many models (seeds seed, seed+1, ...) and also report "
        "their ensemble (PAPER F4)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="models trained at once (default: on a CPU one per core, up to --models; on a GPU 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the first model's seed (the next ones follow)"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epoch: a smoke run")
    parser.add_argument(
        "--retrain", action="store_true", help="train again even where a finished run is there"
    )


def _stage(n: int, title: str) -> float:
    print(f"\n== demo [{n}/6] {title}", flush=True)
    return time.perf_counter()


def _results(
    args,
    cfg: C.TrainConfig,
    jobs: int,
    meta: dict,
    evaluation: dict,
    run_dir: Path,
    written: dict,
    stages: dict,
) -> dict:
    """results.json: the numbers, the first model's training records, the recipe, where and
    how long (the wall time and load average are added at the end)."""
    records = read_metrics(run_dir)
    return {
        "command": "alexnet demo"
        + (" --quick" if args.quick else "")
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + (f" --models {args.models}" if args.models > 1 else ""),
        "test_accuracy": 1 - evaluation["single_10view"]["top1_error"],
        "test_accuracy_centre": 1 - evaluation["single_1view"]["top1_error"],
        "evaluation": evaluation,
        "train": {
            "run_dir": str(run_dir),
            "epochs": cfg.schedule.epochs,
            "records": records,
            "mean_images_per_sec": sum(r["images_per_sec"] for r in records) / len(records),
            "train_seconds": sum(r["seconds"] for r in records),
        },
        "data": {
            "root": str(args.data),
            "dataset": meta.get("dataset"),
            **{split: meta["splits"][split]["count"] for split in ("train", "val", "test")},
            "validation": meta.get("validation"),
        },
        "recipe": {
            k: v
            for k, v in C.flatten(cfg.to_dict()).items()
            if k.split(".")[0] in ("data", "model", "optim", "schedule")
        },
        "seed": args.seed,
        "models_trained_at_once": min(jobs, args.models),
        "figures": written,
        "environment": environment(torch.device("cpu"), 1, None),
        "stages": stages,
    }


def run(args: argparse.Namespace) -> int:
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEMO_EPOCHS)
    jobs = default_jobs(args.models) if args.jobs is None else args.jobs
    if epochs < 1 or args.models < 1 or jobs < 1:
        raise UserError(
            f"--epochs {epochs}, --models {args.models} and --jobs {jobs}: each must be >= 1"
        )
    stages: dict[str, float] = {}
    t = _stage(1, f"data and preparation ({args.data})")
    meta = ensure_prepared(args.data, args.source)
    stages["data + prepare"] = time.perf_counter() - t
    t = _stage(2, f"train {args.models} small model(s), {epochs} epochs each")
    cfgs = [
        demo_config(
            args.data,
            args.out,
            epochs=epochs,
            seed=args.seed + i,
            name="train" if i == 0 else f"train-{i + 1}",
        )
        for i in range(args.models)
    ]
    trained = train_all(cfgs, retrain=args.retrain, jobs=jobs)
    reused = all(r.get("reused") for r in trained)
    stages["train (reused: already finished)" if reused else "train"] = time.perf_counter() - t
    run_dirs = [Path(r["run_dir"]) for r in trained]
    # The last checkpoint: the schedule is fixed, so nothing picks among the epochs.
    checkpoints = [Path(r["checkpoint"]) for r in trained]
    t = _stage(3, "evaluate on the test set: centre crop and ten views (PAPER B5)")
    evaluation = evaluate_runs(checkpoints, args.data)
    stages["evaluate"] = time.perf_counter() - t
    t = _stage(4, "figures (PAPER F1-F3, curves)")
    written = make_figures(run_dirs, checkpoints[0], args.data, args.out / "figures", args.seed)
    stages["figures"] = time.perf_counter() - t
    _stage(5, "report")
    results = _results(args, cfgs[0], jobs, meta, evaluation, run_dirs[0], written, stages)
    results["wall_seconds"] = time.perf_counter() - t_start
    results["load_average"] = [load0, os.getloadavg()[0]]
    report = write_report(args.out, results, meta["class_names"])
    _stage(6, "done")
    print(f"report: {report}")
    print(
        f"test accuracy: {pct(results['test_accuracy'])} (ten views), "
        f"{pct(results['test_accuracy_centre'])} (centre crop)"
    )
    print(
        f"wall time: {results['wall_seconds']:.0f} s "
        f"({results['wall_seconds'] / 60:.1f} min) for the whole demo"
    )
    return 0
