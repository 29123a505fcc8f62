"""The paper's ablations at small scale: the ``small`` network on a training subset, the
baseline against one change at a time, test error mean and std over seeds beside the
difference the paper credits (PAPER E3, B4, B5, C1, A12).

Every run is an ordinary ``alexnet.train.train`` run under ``OUT/runs/<variant>-seed<k>``
(finished runs are reused); the score is the last checkpoint's top-1 error on the whole
test set (``val``), so nothing is selected on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet import config as C
from alexnet import evaluate as E
from alexnet.data import PreparedDataset, store
from alexnet.data.subset import subset_indices
from alexnet.inference import Predictor
from alexnet.lab.fashion import resolve_data
from alexnet.lab.runs import cached, train_one
from alexnet.lab.tables import mean_std, write_outputs
from alexnet.model import ARCHS
from alexnet.recipes import ABLATIONS, schedule_for
from alexnet.runtime import distributed as D
from alexnet.runtime.errors import UserError
from alexnet.runtime.plotting import pyplot, save_png
from alexnet.runtime.runlog import read_metrics


@dataclass(frozen=True)
class Variant:
    name: str
    fact: str  # the PAPER fact it tests
    change: str  # what differs from the baseline, in words
    overrides: dict = field(default_factory=dict)
    paper_delta: float | None = None  # top-1 error change (points) the paper credits
    paper_note: str = ""
    views: int = 1  # test views; the baseline's ten-view score is the B5 row


def variants(widths: tuple[int, ...]) -> list[Variant]:
    """The baseline and the ablations; ``widths`` are the small net's conv widths."""
    half = tuple(w // 2 for w in widths[:4]) + (widths[4],)
    return [
        Variant(
            "baseline",
            "",
            "the small net as the paper: LRN, 3x3/2 pooling, dropout 0.5, "
            "colour noise, two towers; centre crop at test",
        ),
        Variant(
            "no-lrn",
            "E3",
            "no local response normalisation (A8)",
            {"model.lrn": False},
            1.4,
            "LRN: -1.4 top-1 (ImageNet)",
        ),
        Variant(
            "pool-2x2",
            "E3",
            "non-overlapping 2x2/2 max pooling instead of 3x3/2 (A9)",
            {"model.pool_kernel": 2},
            0.4,
            "overlapping pooling: -0.4 top-1",
        ),
        Variant(
            "no-dropout",
            "C1",
            "no dropout on fc6, fc7",
            {"model.dropout": 0.0},
            None,
            "without dropout the net overfits substantially (no figure given)",
        ),
        Variant(
            "no-colour-noise",
            "B4",
            "no PCA colour noise (a brightness noise on grey images)",
            {"data.pca_std": 0.0},
            1.0,
            "colour noise: over 1% lower top-1",
        ),
        # The paper's one-GPU net keeps conv5 and the FC layers at full size (its footnote).
        Variant(
            "one-tower",
            "A12",
            f"one tower with half the kernels in conv1-4 {half}",
            {"model.towers": False, "model.widths": half},
            1.7,
            "two GPUs vs one with half the kernels: -1.7 top-1",
        ),
        Variant(
            "ten-views",
            "B5",
            "the baseline scored on ten views instead of the centre crop",
            {},
            None,
            "ten-view averaging (no separate figure given)",
            views=10,
        ),
    ]


def base_config(data: Path, image_size: int, epochs: int):
    """The baseline: the ``ablations`` preset (alexnet/recipes.py), its crops at 0.875 of the
    image size (B3: 224 of 256, so the ten views of B5 differ), for ``epochs``."""
    crop = int(round(image_size * 0.875 / 2) * 2)
    return C.preset(
        "ablations",
        **{
            "data.root": str(data),
            "data.crop_size": crop,
            "schedule.epochs": epochs,
            "schedule.milestones": schedule_for(epochs),
        },
    )


MONITOR_IMAGES = 1000  # validation images scored after every epoch (curves only)


def subset_data(data: Path, out: Path, n: int | None, seed: int = 0) -> Path:
    """A prepared copy of ``data`` with ``n`` random training images (all when None), a
    fixed 1,000 of its held-out validation images (``val``, scored after every epoch: with a
    small training set, validating on all of them would cost more than the training) and
    the whole official test set (``test``, the score). Made once; the statistics (B2, B4)
    are those of the training subset."""
    train = PreparedDataset(data, "train")
    if "test" not in train.meta["splits"]:
        raise UserError(
            f"{data}: no test split (its val split is the test set: an older preparation); "
            "prepare it again for a held-out validation split"
        )
    target = out / f"data-{n or len(train)}"
    if (target / "meta.json").is_file():
        return target
    idx = subset_indices(train.labels, n, seed)
    val, test = PreparedDataset(data, "val"), PreparedDataset(data, "test")

    def arrays(ds, i):
        return ds.get_batch(i).permute(0, 2, 3, 1).numpy(), ds.labels[i].numpy()

    splits = {
        "train": arrays(train, idx),
        "val": arrays(val, subset_indices(val.labels, MONITOR_IMAGES, seed)),
        "test": arrays(test, np.arange(len(test))),
    }
    meta = train.meta
    store.prepare_arrays(
        target,
        splits,
        meta["classes"],
        meta["class_names"],
        dataset=meta.get("dataset", "arrays"),
        extra_meta={"subset_of": str(data), "subset_seed": seed, "test_split": "test"},
    )
    return target


def score(checkpoint: Path, data: Path, views: int) -> dict:
    predictor = Predictor.of_network(checkpoint, device="cpu", channels_last=True)
    counts = E.evaluate(
        [predictor],
        PreparedDataset(data, "test"),
        views=views,
        batch_size=100,
        env=D.DistEnv.from_environ(),
    )
    return E.summary(counts, views, [checkpoint], "test")


def run_variant(v: Variant, base, seeds: int, data: Path, out: Path) -> list[dict]:
    """Train (or reuse) the variant's runs and score their last checkpoints."""
    rows = []
    for seed in range(seeds):
        cfg = C.from_dict(base.to_dict())
        run_name = f"{'baseline' if v.views != 1 else v.name}-seed{seed}"
        C.apply_overrides(
            cfg,
            {
                **v.overrides,
                "run.seed": seed,
                "run.out_dir": str(out / "runs"),
                "run.name": run_name,
            },
            source=v.name,
        )
        print(f"\n== ablation {v.name}, seed {seed}: {v.change}", flush=True)
        result = train_one(cfg, retrain=False, argv=["alexnet", "experiment", "ablations"])
        ckpt = Path(result["checkpoint"])  # the last checkpoint: the schedule is fixed
        key = f"{run_name}@{result['step']}/views{v.views}"
        s = cached(out / "scores.json", key, lambda c=ckpt: score(c, data, v.views))
        last = read_metrics(Path(result["run_dir"]))[-1]
        rows.append(
            {
                "seed": seed,
                "top1_error": s["top1_error"],
                "top5_error": s["top5_error"],
                "train_error": last["train_error"],
                "train_loss": last["train_loss"],
                "train_seconds": sum(r["seconds"] for r in read_metrics(Path(result["run_dir"]))),
                "run_dir": result["run_dir"],
            }
        )
        print(f"   test top-1 error {100 * s['top1_error']:.2f}% ({v.views} view(s))")
    return rows


def summarise(vs: list[Variant], rows: dict[str, list[dict]]) -> list[dict]:
    """Per variant: test error mean/std and the paired (same seed) difference to baseline."""
    base = {r["seed"]: r["top1_error"] for r in rows["baseline"]}
    out = []
    for v in vs:
        errs = [r["top1_error"] for r in rows[v.name]]
        deltas = [r["top1_error"] - base[r["seed"]] for r in rows[v.name] if r["seed"] in base]
        out.append(
            {
                "variant": v.name,
                "fact": v.fact,
                "change": v.change,
                "views": v.views,
                "top1_error": mean_std(errs),
                "delta": mean_std(deltas) if v.name != "baseline" else (0.0, 0.0),
                "train_error": mean_std([r["train_error"] for r in rows[v.name]]),
                "paper_delta": v.paper_delta,
                "paper_note": v.paper_note,
                "runs": rows[v.name],
            }
        )
    return out


def _pm(ms, scale: float = 100.0) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m * scale:+.2f} ± {s * scale:.2f}"


def table(summary: list[dict], info: str) -> list[str]:
    lines = [
        info,
        "",
        "| variant | paper | test top-1 error % | change vs baseline (points) | "
        "paper's change | final train error % |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        m, sd = s["top1_error"]
        paper = (
            f"{s['paper_delta']:+.1f} ({s['paper_note']})"
            if s["paper_delta"] is not None
            else s["paper_note"] or "-"
        )
        delta = "-" if s["variant"] == "baseline" else _pm(s["delta"])
        lines.append(
            f"| {s['variant']}: {s['change']} | {s['fact'] or '-'} | {100 * m:.2f} ± "
            f"{100 * sd:.2f} | {delta} | {paper} | {100 * s['train_error'][0]:.2f} |"
        )
    return lines


def plot(summary: list[dict], out: Path, title: str) -> None:
    """Bars: what each of the paper's choices is worth here (mean, std over seeds) beside
    what the paper credits it with, all on one sign: the top-1 error its absence costs. A
    variant that removes or replaces the choice (no LRN, 2x2 pooling) costs its change in
    error; one that adds it (ten views for the centre crop) saves minus its change."""
    plt = pyplot()
    rows = [s for s in summary if s["variant"] != "baseline"]
    y = np.arange(len(rows))
    sign = [-1.0 if s["views"] != 1 else 1.0 for s in rows]  # ten views: the paper's, added
    fig, ax = plt.subplots(figsize=(8.0, 0.55 * len(rows) + 2.1), dpi=100)
    ours = [100 * k * s["delta"][0] for k, s in zip(sign, rows, strict=True)]
    err = [100 * s["delta"][1] for s in rows]
    ax.barh(y - 0.2, ours, 0.38, xerr=err, color="#1f77b4", label="here (mean ± std)")
    paper = [s["paper_delta"] if s["paper_delta"] is not None else np.nan for s in rows]
    ax.barh(y + 0.2, paper, 0.38, color="#ff7f0e", label="the paper (ImageNet)")
    for yi, p in zip(y, paper, strict=True):
        if np.isnan(p):
            ax.text(0.05, yi + 0.2, "no figure in the paper", va="center", fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    names = {
        "no-lrn": "LRN (A8)",
        "pool-2x2": "overlapping pooling (A9)",
        "no-dropout": "dropout (C1)",
        "no-colour-noise": "colour noise (B4)",
        "one-tower": "two towers (A12)",
        "ten-views": "ten test views (B5)",
    }
    ax.set_yticks(y, [names.get(s["variant"], s["variant"]) for s in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(
        xlabel="top-1 test error the paper's choice saves (points; right of 0: it helps)",
        title=f"What each of the paper's choices is worth\n{title}",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    save_png(fig, out, tight=False)


def run_ablations(args) -> int:
    data, meta = resolve_data(args.data)
    vs = variants(tuple(ABLATIONS.get("model.widths") or ARCHS["small"].widths))
    if args.only:
        unknown = set(args.only) - {v.name for v in vs}
        if unknown:
            raise UserError(f"--only {sorted(unknown)}: choose from {[v.name for v in vs]}")
        vs = [v for v in vs if v.name == "baseline" or v.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    sub = subset_data(data, args.out, args.train_images or None)
    train = PreparedDataset(sub, "train")
    base = base_config(sub, train.image_size[0], args.epochs)
    rows = {v.name: run_variant(v, base, args.seeds, sub, args.out) for v in vs}
    summary = summarise(vs, rows)
    info = (
        f"Ablations on {meta.get('dataset')}: the small net, {len(train)} training images, "
        f"{args.epochs} epochs, {args.seeds} seed(s); test top-1 error on all "
        f"{meta['splits']['test']['count']} test images (last checkpoint); change = paired "
        "difference to the baseline of the same seed."
    )
    results = {
        "data": str(data),
        "train_data": str(sub),
        "dataset": meta.get("dataset"),
        "train_images": len(train),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "base_config": base.to_dict(),
        "variants": summary,
    }
    plot(
        summary,
        args.out / "ablations.png",
        f"{meta.get('dataset')}: {len(train)} images, {args.epochs} epochs, {args.seeds} seeds",
    )
    write_outputs(args.out, "ablations", results, table(summary, info))
    return 0
