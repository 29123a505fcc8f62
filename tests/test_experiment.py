"""``alexnet experiment fig1`` and ``ablations`` on a tiny generated dataset: the tables agree
with the runs behind them, reruns reuse finished work, and the parts behave as specified."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.cli import main
from alexnet.data import PreparedDataset, prepare_arrays
from alexnet.data.subset import subset_indices
from alexnet.lab import ablations as A
from alexnet.lab import fig1 as F1
from alexnet.lab.tables import mean_std
from alexnet.runtime.errors import UserError


def tiny_fashion(root: Path, n_train: int = 320, n_val: int = 40, seed: int = 0) -> Path:
    """28x28x1 images whose class c lights rows 2c+2..2c+7 (visible after crops and flips);
    a validation split and a test split of ``n_val`` each, as ``prepare`` writes them."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28, 1))
        for i, c in enumerate(y):
            x[i, 2 * c + 2 : 2 * c + 8, 4:24] += 180
        splits[split] = (np.clip(x, 0, 255).astype(np.uint8), y)
    names = [f"class {i}" for i in range(10)]
    return prepare_arrays(
        root, splits, names, names, dataset="fashion-mnist", extra_meta={"test_split": "test"}
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_fashion(tmp_path_factory.mktemp("tiny") / "prepared")


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, float(np.std([1, 2, 4], ddof=1))))
    assert mean_std([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([None]))


def test_subset_indices_are_distinct_sorted_and_seeded():
    labels = np.arange(100) % 10
    a = subset_indices(labels, 30, seed=1)
    assert len(set(a.tolist())) == 30 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, subset_indices(labels, 30, seed=1))
    assert not np.array_equal(a, subset_indices(labels, 30, seed=2))
    assert np.array_equal(subset_indices(labels, None, 0), np.arange(100))


def test_four_layer_cnn_shapes_and_activation():
    for size, channels in ((28, 1), (32, 3)):
        relu = F1.FourLayerCNN(channels, size, 10, "relu")
        tanh = F1.FourLayerCNN(channels, size, 10, "tanh")
        tanh.load_state_dict(relu.state_dict())  # same weights: only the units differ
        x = torch.randn(2, channels, size, size)
        assert relu(x).shape == (2, 10)
        assert not torch.allclose(relu(x), tanh(x))
        assert sum(p.numel() for p in relu.parameters()) < 100_000  # four small layers
    with pytest.raises(ValueError, match="relu or tanh"):
        F1.FourLayerCNN(1, 28, 10, "sigmoid")


def _curve(lr, errors, diverged=False):
    n = len(errors)
    return F1.Curve(
        "relu",
        lr,
        0,
        [(i + 1) / 2 for i in range(n)],
        errors,
        [float(i + 1) for i in range(n)],
        diverged,
    )


def test_reach_and_best_rate_follow_the_papers_choice():
    slow, fast = _curve(0.01, [0.9, 0.5, 0.3, 0.2]), _curve(0.1, [0.8, 0.25, 0.2, 0.1])
    never, bad = _curve(0.3, [0.9, 0.6, 0.5, 0.4]), _curve(1.0, [0.9], diverged=True)
    assert fast.reach(0.3) == (1.0, 2.0) and slow.reach(0.3) == (1.5, 3.0)
    assert never.reach(0.3) is None
    assert F1.best_rate([slow, never, fast, bad], 0.3) is fast
    assert F1.best_rate([never, bad], 0.3) is never  # lowest error when none reaches it


def test_train_curve_records_the_error_of_each_tenth_epoch(data):
    images, labels, aug, classes = F1._load(data, None, seed=0)
    c = F1.train_curve(
        images,
        labels,
        aug,
        activation="relu",
        lr=0.01,
        seed=0,
        epochs=3,
        classes=classes,
        batch_size=32,
    )
    assert len(images) // 32 == 10  # one point per step here
    assert c.epochs == pytest.approx([(i + 1) / 10 for i in range(30)])
    assert all(0.0 <= e <= 1.0 for e in c.errors) and np.all(np.diff(c.seconds) > 0)
    # The classes are easy: training error falls well below chance (90%).
    assert np.mean(c.errors[-3:]) < 0.5 < np.mean(c.errors[:2])


def test_fig1_writes_a_table_consistent_with_its_curves(data, tmp_path, monkeypatch):
    out = tmp_path / "fig1"
    argv = [
        "experiment",
        "fig1",
        "--data",
        str(data),
        "--out",
        str(out),
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--lrs",
        "0.01",
        "0.05",
        "--threshold",
        "0.6",
    ]
    assert main(argv) == 0
    r = json.loads((out / "fig1.json").read_text())
    assert (out / "fig1.png").read_bytes()[:4] == b"\x89PNG"
    assert r["threshold"] == 0.6 and r["train_images"] == 320
    for act in ("relu", "tanh"):
        assert r["best_lr"][act] in (0.01, 0.05)
        assert [c["seed"] for c in r["curves"][act]] == [0, 1]
        for c, ep in zip(r["curves"][act], r["epochs_to_threshold"][act], strict=True):
            hit = [e for e, err in zip(c["epochs"], c["errors"], strict=True) if err <= 0.6]
            assert ep == (hit[0] if hit else None)
    reach = r["epochs_to_threshold"]
    pairs = [(t, u) for t, u in zip(reach["tanh"], reach["relu"], strict=True) if t and u]
    if pairs:
        assert r["speedup_epochs"][0] == pytest.approx(np.mean([t / u for t, u in pairs]))
    table = (out / "fig1.md").read_text()
    assert f"| relu | {r['best_lr']['relu']:g} |" in table
    # A rerun reuses every curve: no training at all.
    monkeypatch.setattr(F1, "train_curve", lambda *a, **k: pytest.fail("trained again"))
    assert main(argv) == 0
    assert json.loads((out / "fig1.json").read_text())["curves"] == r["curves"]


def test_ablation_variants_match_the_paper():
    vs = {v.name: v for v in A.variants((48, 128, 192, 192, 128))}
    half = (24, 64, 96, 96, 128)  # conv5 kept whole, as the paper's footnote says
    assert vs["one-tower"].overrides == {"model.towers": False, "model.widths": half}
    assert vs["no-lrn"].paper_delta == 1.4 and vs["pool-2x2"].paper_delta == 0.4
    assert vs["one-tower"].paper_delta == 1.7 and vs["ten-views"].views == 10
    assert vs["pool-2x2"].overrides == {"model.pool_kernel": 2}


def test_subset_data_keeps_the_chosen_images(data, tmp_path):
    sub = A.subset_data(data, tmp_path, 100, seed=3)
    full, part = PreparedDataset(data, "train"), PreparedDataset(sub, "train")
    idx = subset_indices(full.labels, 100, 3)
    assert len(part) == 100 and len(PreparedDataset(sub, "test")) == 40  # the whole test set
    assert len(PreparedDataset(sub, "val")) == 40  # min(1000, all the validation images)
    assert torch.equal(part.get_batch(np.arange(100)), full.get_batch(idx))
    assert torch.equal(part.labels, full.labels[idx])
    mean = full.get_batch(idx).double().mean(0).float()
    assert torch.allclose(part.stats["mean"], mean, atol=1e-3)  # the subset's own mean image


def test_ablations_table_is_the_paired_difference_of_its_runs(data, tmp_path):
    out = tmp_path / "abl"
    argv = [
        "experiment",
        "ablations",
        "--data",
        str(data),
        "--out",
        str(out),
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--train-images",
        "256",
        "--only",
        "no-dropout",
        "ten-views",
    ]
    assert main(argv) == 0
    r = json.loads((out / "ablations.json").read_text())
    assert (out / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    s = {v["variant"]: v for v in r["variants"]}
    assert list(s) == ["baseline", "no-dropout", "ten-views"]
    base = [run["top1_error"] for run in s["baseline"]["runs"]]
    for name in ("no-dropout", "ten-views"):
        errs = [run["top1_error"] for run in s[name]["runs"]]
        assert s[name]["top1_error"] == pytest.approx(list(mean_std(errs)))
        assert s[name]["delta"] == pytest.approx(list(mean_std(np.subtract(errs, base))))
    # ten-views scores the baseline's own runs; no-dropout trained its own.
    runs_of = {name: [x["run_dir"] for x in s[name]["runs"]] for name in s}
    assert runs_of["ten-views"] == runs_of["baseline"] != runs_of["no-dropout"]
    cfg = json.loads((Path(s["no-dropout"]["runs"][0]["run_dir"]) / "config.json").read_text())
    assert cfg["model"]["dropout"] == 0.0 and cfg["data"]["crop_size"] == 24
    ckpt = Path(s["baseline"]["runs"][0]["run_dir"]) / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    assert main(argv) == 0  # rerun: reuses the runs and their scores
    assert ckpt.stat().st_mtime_ns == before
    assert json.loads((out / "ablations.json").read_text())["variants"] == r["variants"]


def test_unknown_variant_is_a_clear_error(data, tmp_path):
    from argparse import Namespace

    from alexnet.lab.experiment import run

    with pytest.raises(UserError, match="--only"):
        run(
            Namespace(
                which="ablations",
                data=data,
                out=tmp_path,
                seeds=1,
                epochs=1,
                train_images=0,
                only=["no-such"],
            )
        )


def test_cached_computes_once_per_key_and_keeps_results_across_calls(tmp_path):
    from alexnet.lab.runs import cached

    calls = []

    def compute(value):
        calls.append(value)
        return {"value": value}

    path = tmp_path / "results.json"
    assert cached(path, "a", lambda: compute(1)) == {"value": 1}
    assert cached(path, "a", lambda: compute(2)) == {"value": 1}  # kept: not computed again
    assert cached(path, "b", lambda: compute(3)) == {"value": 3}
    assert calls == [1, 3]
    assert json.loads(path.read_text()) == {"a": {"value": 1}, "b": {"value": 3}}
