"""``alexnet demo`` end to end on tiny generated Fashion-MNIST-like IDX files: fetch (the
Debian / apt / download order), prepare, train, evaluate, figures, report; and a rerun that
reuses everything. The accuracy in the report is checked against a direct computation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.cli import main
from alexnet.lab import demo, fashion
from alexnet.runtime.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from datagen import write_idx  # noqa: E402


def learnable_idx(folder: Path, n_train: int = 256, n_test: int = 60, seed: int = 0) -> dict:
    """IDX files in Fashion-MNIST's layout whose class is visible: class c lights rows
    2c..2c+5 (so crops of a few pixels and flips keep it), plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.int64)
        for i, c in enumerate(y):
            x[i, 2 * c + 2 : 2 * c + 8, 4:24] += 180
        x = np.clip(x, 0, 255).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
        out[prefix] = (x, y)
    return out


def _small_net(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The small arch written out from its definition with torch primitives (none of the
    package's code): 3x3 conv1, 5x5 conv2 and 3x3 conv3-5 at stride 1, groups=2 in conv2, 4,
    5 (PAPER A4, A6), per-tower LRN k=2 n=5 alpha=1e-4 beta=0.75 after ReLU 1 and 2 (A8),
    max pooling 3/2 after both LRNs and conv5 (A9), ReLU everywhere but fc8 (A2)."""
    import torch.nn.functional as F

    def conv(t, name, pad, groups=1):
        return F.relu(
            F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=pad, groups=groups)
        )

    def lrn(t):
        return torch.cat([F.local_response_norm(p, 5, 1e-4, 0.75, 2.0) for p in t.chunk(2, 1)], 1)

    x = F.max_pool2d(lrn(conv(x, "conv1", 1)), 3, 2)
    x = F.max_pool2d(lrn(conv(x, "conv2", 2, 2)), 3, 2)
    x = conv(conv(conv(x, "conv3", 1), "conv4", 1, 2), "conv5", 1, 2)
    x = F.max_pool2d(x, 3, 2).flatten(1)
    x = F.relu(F.linear(x, sd["fc6.weight"], sd["fc6.bias"]))
    x = F.relu(F.linear(x, sd["fc7.weight"], sd["fc7.bias"]))
    return F.linear(x, sd["fc8.weight"], sd["fc8.bias"])


def _views(images: np.ndarray, mean: np.ndarray, crop: int, views: int) -> list[np.ndarray]:
    """PAPER B5 by slicing: the centre crop, and for ten also the four corners, each with its
    reflection; the mean image (B2) is cut at the same place."""
    h, w = images.shape[-2:]
    places = [((h - crop) // 2, (w - crop) // 2)]
    if views == 10:
        places += [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
    out = []
    for y, x in places:
        v = images[..., y : y + crop, x : x + crop] - mean[..., y : y + crop, x : x + crop]
        out += [v] if views == 1 else [v, v[..., ::-1]]
    return out


@torch.no_grad()
def direct_accuracy(checkpoints, images: np.ndarray, labels: np.ndarray, views: int):
    """Softmax averaged over the views (and the models of an ensemble, PAPER F4), computed
    from the checkpoint files alone: torch.load, the views by slicing, the network by
    ``_small_net``."""
    probs = 0
    for checkpoint in [checkpoints] if isinstance(checkpoints, Path) else checkpoints:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sd = {k: v.double() for k, v in ck["model"].items()}
        mean = ck["data_stats"]["mean"].double().numpy()
        x = images[:, None].astype(np.float64)
        for v in _views(x, mean, ck["augment"]["crop_size"], views):
            t = torch.from_numpy(np.ascontiguousarray(v)) * ck["augment"]["scale"]
            probs = probs + torch.softmax(_small_net(sd, t), 1) / views
    return float((probs.argmax(1).numpy() == labels).mean())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    arrays = learnable_idx(root / "idx", n_test=40)
    out, data = root / "out", root / "prepared"
    argv = [
        "demo",
        "--source",
        str(root / "idx"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--quick",
    ]
    assert main(argv) == 0
    return root, out, data, arrays, argv


def test_demo_writes_report_results_and_figures(demo_run):
    _, out, data, _, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    ev = results["evaluation"]
    assert set(ev) == {"single_1view", "single_10view"}
    for r in ev.values():
        assert 0.0 <= r["top5_error"] <= r["top1_error"] <= 1.0
        assert r["images"] == 40
    assert results["test_accuracy"] == pytest.approx(1 - ev["single_10view"]["top1_error"])
    assert f"{100 * results['test_accuracy']:.2f}%" in report
    held = fashion.validation_size(256)
    assert results["data"] == {
        "root": str(data),
        "train": 256 - held,
        "val": held,
        "test": 40,
        "dataset": "fashion-mnist",
        "validation": {"size": held, "seed": 0, "stratified": True, "from": "train"},
    }
    records = results["train"]["records"]
    assert [r["epoch"] for r in records] == [1]
    assert all(np.isfinite(r["train_loss"]) and r["images_per_sec"] > 0 for r in records)
    assert results["wall_seconds"] >= sum(results["stages"].values()) > 0
    for name in ("curves.png", "filters.png", "predictions.png", "neighbours.png"):
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figures/{name})" in report


def test_demo_accuracy_matches_a_direct_computation(demo_run):
    _, out, _, arrays, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    ckpt = out / "train" / "checkpoints" / "last.pt"
    x, y = arrays["t10k"]
    for views, key in ((1, "single_1view"), (10, "single_10view")):
        expected = direct_accuracy(ckpt, x, y.astype(np.int64), views)
        assert 1 - results["evaluation"][key]["top1_error"] == pytest.approx(expected, abs=1e-9)


def test_demo_rerun_reuses_data_and_training(demo_run, capsys):
    root, out, data, _, argv = demo_run
    ckpt = out / "train" / "checkpoints" / "last.pt"
    before = (ckpt.stat().st_mtime_ns, (data / "train.bin").stat().st_mtime_ns)
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "reusing the prepared dataset" in log
    assert (ckpt.stat().st_mtime_ns, (data / "train.bin").stat().st_mtime_ns) == before
    again = json.loads((out / "results.json").read_text())
    assert again["evaluation"]["single_10view"] == first["evaluation"]["single_10view"] | {
        "seconds": again["evaluation"]["single_10view"]["seconds"]
    }


def test_demo_trains_an_ensemble_two_at_once(tmp_path, capsys):
    arrays = learnable_idx(tmp_path / "idx", n_test=40)
    out = tmp_path / "out"
    argv = [
        "demo",
        "--source",
        str(tmp_path / "idx"),
        "--data",
        str(tmp_path / "prepared"),
        "--out",
        str(out),
        "--quick",
        "--models",
        "2",
        "--jobs",
        "2",
    ]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "training 2 models, 2 at once" in log
    finished = {
        line.rsplit(": ", 1)[1]
        for line in log.splitlines()
        if line.startswith(("demo: finished 1/2: ", "demo: finished 2/2: "))
    }
    assert finished == {str(out / "train"), str(out / "train-2")}
    results = json.loads((out / "results.json").read_text())
    assert results["models_trained_at_once"] == 2
    ev = results["evaluation"]
    assert set(ev) == {"single_1view", "single_10view", "ensemble_1view", "ensemble_10view"}
    # the second model printed into its log, trained the whole epoch, and is another seed
    assert "epoch 1/1" in (out / "train-2.log").read_text()
    ckpts = [out / name / "checkpoints" / "last.pt" for name in ("train", "train-2")]
    first, second = (torch.load(c, map_location="cpu", weights_only=True) for c in ckpts)
    assert first["step"] == second["step"] == (256 - fashion.validation_size(256)) // 128
    assert not torch.equal(first["model"]["conv1.weight"], second["model"]["conv1.weight"])
    x, y = arrays["t10k"]
    for views in (1, 10):
        got = 1 - ev[f"ensemble_{views}view"]["top1_error"]
        assert got == pytest.approx(direct_accuracy(ckpts, x, y.astype(np.int64), views), abs=1e-9)


def test_demo_jobs_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="--jobs 0"):
        demo.run(argparse.Namespace(models=2, jobs=0, epochs=None, quick=True))


def test_schedule_cuts_at_two_thirds_and_five_sixths():
    assert demo.schedule_for(6) == (4, 5)
    assert demo.schedule_for(12) == (8, 10)
    assert demo.schedule_for(4) == (3,)
    assert demo.schedule_for(1) == ()
    assert demo.schedule_for(2) == (1,)


def _no_debian(monkeypatch, tmp_path):
    from alexnet.data import small

    monkeypatch.setattr(small, "FASHION_MNIST_DIR", str(tmp_path / "debian"))
    return tmp_path / "debian"


def test_fetch_downloads_when_not_root(monkeypatch, tmp_path):
    from alexnet.data import small

    _no_debian(monkeypatch, tmp_path)
    monkeypatch.setattr(fashion.os, "geteuid", lambda: 1000)
    calls = []
    monkeypatch.setattr(small, "download_fashion_mnist", lambda d: calls.append(d) or d)
    assert fashion.fetch_fashion_mnist(None, tmp_path / "dl") == tmp_path / "dl"
    assert calls == [tmp_path / "dl"]


def test_fetch_installs_the_debian_package_as_root_updating_once(monkeypatch, tmp_path):
    from alexnet.data import small

    debian = _no_debian(monkeypatch, tmp_path)
    monkeypatch.setattr(fashion.os, "geteuid", lambda: 0)
    monkeypatch.setattr(fashion.shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(small, "download_fashion_mnist", lambda d: pytest.fail("downloaded"))
    calls = []

    class Done:
        def __init__(self, rc):
            self.returncode = rc

    def fake_run(cmd, env):
        calls.append(cmd[1])
        assert env["DEBIAN_FRONTEND"] == "noninteractive"
        if cmd[1] == "install" and "update" in calls:  # found only after an update
            learnable_idx(debian, 10, 10)
            return Done(0)
        return Done(0 if cmd[1] == "update" else 100)

    monkeypatch.setattr(fashion.subprocess, "run", fake_run)
    assert fashion.fetch_fashion_mnist(None, tmp_path / "dl") == debian
    assert calls == ["install", "update", "install"]


def test_source_without_idx_files_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no Fashion-MNIST IDX files"):
        fashion.fetch_fashion_mnist(tmp_path, tmp_path / "dl")


def test_demo_epochs_extends_a_finished_demo_and_scales_by_the_datas_own_std(demo_run, tmp_path):
    """``--epochs N`` continues a finished demo (its rate cuts are kept) instead of being
    refused; the inputs are divided by the prepared training pixels' own std."""
    import shutil

    _, out, data, _, argv = demo_run
    out2, data2 = tmp_path / "out", tmp_path / "prepared"
    shutil.copytree(out, out2)
    shutil.copytree(data, data2)
    argv = [*argv[:-1], "--epochs", "2"]  # drop --quick
    argv[argv.index(str(out))], argv[argv.index(str(data))] = str(out2), str(data2)
    assert main(argv) == 0
    results = json.loads((out2 / "results.json").read_text())
    assert [r["epoch"] for r in results["train"]["records"]] == [1, 2]
    ck = torch.load(out2 / "train" / "checkpoints" / "last.pt", weights_only=True)
    assert list(ck["config"]["schedule"]["milestones"]) == []  # the 1-epoch run's (none)
    from alexnet.data import PreparedDataset

    train = PreparedDataset(data2, "train")
    pixels = train.get_batch(np.arange(len(train))).double().numpy()
    assert ck["augment"]["scale"] == pytest.approx(1 / pixels.std(), rel=1e-4)
