"""``alexnet evaluate``: errors checked against answers known in advance and against an
independent ten-view reference written with numpy slicing (PAPER B5, F4)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import evalkit
import numpy as np
import pytest
import torch

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.data import PreparedDataset
from alexnet.inference import Predictor


def _evaluate_json(capsys, *args: str) -> dict:
    capsys.readouterr()  # drop what earlier steps (the tiny training run) printed
    assert main(["evaluate", *args, "--json", "--device", "cpu", "--precision", "fp32"]) == 0
    return json.loads(capsys.readouterr().out)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return evalkit.make_dataset(tmp_path_factory.mktemp("data"))


def test_known_logits_give_known_errors(tmp_path, data, capsys):
    bias = [0.3, 2.0, 1.5, -1.0, 0.9, -0.5, 1.2, 0.0]  # ranking: 1, 2, 6, 4, 0 | 7, 5, 3
    ckpt = evalkit.known_checkpoint(tmp_path / "known.pt", bias)
    labels = PreparedDataset(data, "val").labels.numpy()
    top5 = np.argsort(bias)[::-1][:5]
    for views in ("1", "10"):
        r = _evaluate_json(capsys, "--checkpoint", str(ckpt), "--data", str(data), "--views", views)
        assert r["images"] == len(labels) == 21 and r["views"] == int(views)
        assert r["top1_error"] == pytest.approx(np.mean(labels != 1))
        assert r["top5_error"] == pytest.approx(np.mean(~np.isin(labels, top5)))


def test_ensemble_averages_softmax_not_logits(tmp_path, data, capsys):
    # Model a is sure of class 6, model b is fairly sure of class 3 and rules 6 out: the
    # averaged softmax (PAPER F4) picks 6, averaging the logits would pick 3.
    a = [0.1, 0.2, 0.3, 5.0, 0.4, 0.5, 10.0, 0.6]
    b = [0.25, 0.05, 0.45, 5.0, 0.15, 0.35, -10.0, 0.55]
    pa = evalkit.known_checkpoint(tmp_path / "a.pt", a)
    pb = evalkit.known_checkpoint(tmp_path / "b.pt", b, seed=1)
    probs = (_softmax(np.array(a)) + _softmax(np.array(b))) / 2
    assert probs.argmax() == 6 and np.argmax(np.add(a, b) / 2) == 3
    labels = PreparedDataset(data, "val").labels.numpy()
    r = _evaluate_json(
        capsys, "--checkpoint", str(pa), "--checkpoint", str(pb), "--data", str(data)
    )
    assert r["models"] == 2
    assert r["top1_error"] == pytest.approx(np.mean(labels != 6))
    assert r["top5_error"] == pytest.approx(np.mean(~np.isin(labels, np.argsort(-probs)[:5])))


def _reference_probs(model, card, images: np.ndarray, views: int) -> np.ndarray:
    """PAPER B5 by hand: numpy slices of the four corners and the centre, and their mirror
    images, minus the same slices of the mean image; softmax averaged over the views."""
    mean = card.data_stats["mean"].numpy()
    crop, scale = card.crop_size, card.scale
    h, w = images.shape[2:]
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
    centre = [((h - crop) // 2, (w - crop) // 2)]
    places = centre if views == 1 else corners + centre
    out = []
    for img in images.astype(np.float64):
        crops = []
        for y, x in places:
            c = (img[:, y : y + crop, x : x + crop] - mean[:, y : y + crop, x : x + crop]) * scale
            crops.append(c)
            if views == 10:
                crops.append(c[:, :, ::-1])
        with torch.no_grad():
            logits = model(torch.tensor(np.stack(crops), dtype=torch.float32)).double().numpy()
        out.append(_softmax(logits).mean(0))
    return np.stack(out)


@pytest.mark.parametrize("views", [1, 10])
def test_trained_checkpoint_matches_reference_and_per_class_csv(tmp_path, capsys, views):
    data, run = evalkit.tiny_run()
    model, ckpt = load_model(run / "checkpoints" / "best.pt")
    ds = PreparedDataset(data, "val")
    images = ds.get_batch(np.arange(len(ds))).numpy()
    labels = ds.labels.numpy()
    probs = _reference_probs(model, ckpt, images, views)
    order = np.argsort(-probs, axis=1)
    hit1, hit5 = order[:, 0] == labels, (order[:, :5] == labels[:, None]).any(1)
    csv_path = tmp_path / "per_class.csv"
    r = _evaluate_json(
        capsys,
        "--checkpoint",
        str(run),
        "--data",
        str(data),
        "--views",
        str(views),
        "--batch-size",
        "4",
        "--per-class",
        str(csv_path),
    )
    assert r["top1_error"] == pytest.approx(1 - hit1.mean())
    assert r["top5_error"] == pytest.approx(1 - hit5.mean())
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["class_id"] for row in rows] == evalkit.CLASSES
    for k, row in enumerate(rows):
        mine = labels == k
        assert int(row["images"]) == mine.sum() and row["name"] == evalkit.NAMES[k]
        assert float(row["top1_acc"]) == pytest.approx(hit1[mine].mean(), abs=1e-6)
        assert float(row["top5_acc"]) == pytest.approx(hit5[mine].mean(), abs=1e-6)


def test_torchrun_two_ranks_count_every_image_once(tmp_path, capsys):
    data, run = evalkit.tiny_run()
    single = _evaluate_json(capsys, "--checkpoint", str(run), "--data", str(data), "--views", "10")
    results = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "alexnet",
        "evaluate",
        "--checkpoint",
        str(run),
        "--data",
        str(data),
        "--views",
        "10",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--results",
        str(results),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads(results.read_text())
    assert multi["images"] == single["images"] == 21  # 11 + 10: nothing padded in twice
    assert multi["top1_error"] == pytest.approx(single["top1_error"])
    assert multi["top5_error"] == pytest.approx(single["top5_error"])
    assert proc.stdout.count("top-1 error") == 1  # rank 0 alone reports


def test_mismatched_classes_and_missing_files_are_clear_errors(tmp_path, data, capsys):
    other = evalkit.known_checkpoint(tmp_path / "five.pt", [0.0] * 5)
    assert main(["evaluate", "--checkpoint", str(other), "--data", str(data)]) == 2
    assert "5" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data)]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_a_full_disk_keeps_the_figures_on_the_screen(tmp_path, data, capsys, small_disk):
    """The result files cannot be written: one error line, exit 2, and the figures are on
    stdout already (an evaluation of hours is not lost for want of a few bytes)."""
    ckpt = evalkit.known_checkpoint(
        tmp_path / "known.pt", [0.3, 2.0, 1.5, -1.0, 0.9, -0.5, 1.2, 0.0]
    )
    disk = small_disk(64)
    (disk / "fill").write_bytes(b"\0" * (disk_free(disk) - 100))
    want = _evaluate_json(capsys, "--checkpoint", str(ckpt), "--data", str(data))
    for out in (["--json"], []):
        argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), *out]
        argv += ["--device", "cpu", "--results", str(disk / "r.json")]
        assert main([*argv, "--per-class", str(disk / "pc.csv")]) == 2
        got, err = capsys.readouterr()
        [line] = [x for x in err.splitlines() if "error:" in x]
        assert "pc.csv: No space left on device" in line and "Traceback" not in err
        if out:
            assert json.loads(got)["top1_error"] == want["top1_error"]
        else:
            assert f"top-1 error {100 * want['top1_error']:6.2f}%" in got
        assert sorted(p.name for p in disk.iterdir()) == ["fill"]  # nothing half-written


def disk_free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_one_pass_scores_the_first_model_and_the_ensemble(tmp_path, data):
    # sizes=[1, 3]: the counts of model a alone and of the three-model ensemble from one
    # pass, exactly as two separate evaluations give them.
    from alexnet import evaluate as E
    from alexnet.runtime import distributed as D

    biases = (
        [0.3, 2.0, 1.5, -1.0, 0.9, -0.5, 1.2, 0.0],
        [0.25, 0.05, 0.45, 5.0, 0.15, 0.35, -10.0, 0.55],
        [1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0],
    )
    paths = [
        evalkit.known_checkpoint(tmp_path / f"{i}.pt", b, seed=i) for i, b in enumerate(biases)
    ]
    predictors = [Predictor.of_network(p) for p in paths]
    ds = PreparedDataset(data, "val")
    common = dict(views=10, batch_size=4, env=D.DistEnv(0, 1, 0))
    first, three = E.evaluate(predictors, ds, sizes=[1, 3], **common)
    for got, k in ((first, 1), (three, 3)):
        alone = E.evaluate(predictors[:k], ds, **common)
        for name in ("images", "top1", "top5"):
            assert torch.equal(getattr(got, name), getattr(alone, name))
    assert not torch.equal(first.top1, three.top1)  # the two differ, so the check can fail
    with pytest.raises(ValueError, match="between 1 and 3"):
        E.evaluate(predictors, ds, sizes=[4], **common)
