"""``alexnet figures``: the layout of F1's kernel grid, the bars of F2, the neighbours of F3
(against a brute-force search), training curves; every command writes a real PNG."""

from __future__ import annotations

import evalkit
import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import figures
from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.data import PreparedDataset


def _png(path, min_size=(200, 100)) -> np.ndarray:
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
    a = np.asarray(img.convert("RGB"))
    assert a.std() > 10  # something was drawn
    return a


def test_filter_grid_puts_each_tower_in_its_own_rows_and_normalises_each_kernel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 3, 11, 11, generator=g) * torch.logspace(-3, 1, 96).view(96, 1, 1, 1)
    grid = figures.filter_grid(w, towers=2, cols=16, gap=1, tower_gap=6)
    block = 3 * 12 - 1  # three rows of 16 kernels per tower (48 = 3 x 16)
    assert grid.shape == (2 * block + 6, 16 * 12 - 1, 3)
    for j in (0, 17, 47, 48, 95):
        t, i = divmod(j, 48)
        r, c = divmod(i, 16)
        y, x = t * (block + 6) + r * 12, c * 12
        cell = grid[y : y + 11, x : x + 11]
        want = (w[j] - w[j].min()) / (w[j].max() - w[j].min())
        np.testing.assert_allclose(cell, want.permute(1, 2, 0).numpy(), atol=1e-6)
    assert np.isnan(grid[block : block + 6]).all()  # the gap between the towers


def test_filters_command_writes_png(tmp_path):
    _, run = evalkit.tiny_run()
    out = tmp_path / "conv1.png"
    assert main(["figures", "filters", "--checkpoint", str(run), "--out", str(out)]) == 0
    _png(out, (100, 50))


def test_prediction_bars_show_the_top5_and_mark_the_true_class(tmp_path, monkeypatch):
    bias = [0.3, 2.0, 1.5, -1.0, 0.9, -0.5, 1.2, 0.0]
    ckpt = evalkit.known_checkpoint(tmp_path / "known.pt", bias)
    data = evalkit.make_dataset(tmp_path / "data")
    labels = PreparedDataset(data, "val").labels.numpy()
    chosen = [int(np.flatnonzero(labels == c)[0]) for c in (1, 3, 6)]  # top-1, absent, third
    saved = {}
    monkeypatch.setattr(figures, "save_png", lambda fig, out: saved.setdefault("fig", fig))
    args = ["--indices", *map(str, chosen), "--out", str(tmp_path / "p.png")]
    assert (
        main(["figures", "predictions", "--checkpoint", str(ckpt), "--data", str(data), *args]) == 0
    )
    bar_axes = [ax for ax in saved["fig"].axes if ax.patches]
    assert len(bar_axes) == 3
    probs = torch.softmax(torch.tensor(bias), 0)
    top5 = probs.argsort(descending=True)[:5].tolist()
    for ax, true in zip(bar_axes, (1, 3, 6), strict=True):
        widths = [p.get_width() for p in ax.patches][::-1]  # drawn bottom-up
        np.testing.assert_allclose(widths, probs[top5].numpy(), rtol=1e-5)
        red = [p.get_facecolor()[:3] == (214 / 255, 39 / 255, 40 / 255) for p in ax.patches][::-1]
        assert red == [c == true for c in top5]  # red exactly on the true class, if shown


def test_predictions_and_neighbours_commands_write_pngs(tmp_path):
    data, run = evalkit.tiny_run()
    for what in ("predictions", "neighbours"):
        out = tmp_path / f"{what}.png"
        assert (
            main(
                [
                    "figures",
                    what,
                    "--checkpoint",
                    str(run),
                    "--data",
                    str(data),
                    "--n",
                    "4",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        _png(out)


@pytest.mark.parametrize("layer", ["fc7", "pool5"])
def test_neighbours_are_the_nearest(tmp_path, monkeypatch, layer):
    data, run = evalkit.tiny_run()
    model, card = load_model(run)
    aug = card.test_views()
    train, val = PreparedDataset(data, "train"), PreparedDataset(data, "val")
    assert len(train) == 64  # the index below is the whole training split
    with torch.no_grad():
        ft = model.forward_features(
            aug.views(train.get_batch(np.arange(64)).contiguous(), 1), layer
        )
        fq = model.forward_features(
            aug.views(val.get_batch(np.array([2, 9])).contiguous(), 1), layer
        )
    # The tiny model's fc7 vectors are nearly all alike, so exact ties occur: they go to the
    # lower index (retrieval.knn's rule), hence the stable sort on distances computed as knn
    # does (differences squared, not the |a|^2 + |b|^2 - 2ab form, which rounds ties apart).
    dist = torch.cdist(
        fq.flatten(1).double(), ft.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    want = torch.argsort(dist, dim=1, stable=True)[:, :6]
    got = {}
    monkeypatch.setattr(figures, "plot_neighbours", lambda *a, **k: got.setdefault("args", a))
    out = str(tmp_path / "n.png")
    assert (
        main(
            [
                "figures",
                "neighbours",
                "--checkpoint",
                str(run),
                "--data",
                str(data),
                "--indices",
                "2",
                "9",
                "--layer",
                layer,
                "--out",
                out,
            ]
        )
        == 0
    )
    queries, shown, q_labels, n_labels = got["args"][:4]
    for i in range(2):
        for j in range(6):
            assert torch.equal(shown[i, j], train.get_batch(np.array([int(want[i, j])]))[0])
        assert n_labels[i].tolist() == train.labels[want[i]].tolist()
    assert q_labels.tolist() == val.labels[[2, 9]].tolist()


def test_curves_from_metrics_jsonl(tmp_path, capsys):
    _, run = evalkit.tiny_run()
    out = tmp_path / "curves.png"
    assert main(["figures", "curves", "--run", str(run), "--out", str(out)]) == 0
    _png(out, (600, 200))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0}\nnot json\n')
    assert main(["figures", "curves", "--run", str(tmp_path), "--out", str(out)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err


@pytest.mark.parametrize("towers", [1, 2])
def test_filter_grid_one_channel_and_ungrouped(towers):
    w = torch.randn(48, 1, 3, 3)
    grid = figures.filter_grid(w, towers=towers)
    assert grid.shape[2] == 3 and np.nanmax(grid) == pytest.approx(1.0)


def test_no_images_asked_for_is_a_clear_error(tmp_path, capsys):
    data, run = evalkit.tiny_run()
    out = tmp_path / "p.png"
    assert (
        main(
            [
                "figures",
                "predictions",
                "--checkpoint",
                str(run),
                "--data",
                str(data),
                "--n",
                "0",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "must be at least 1" in capsys.readouterr().err
    assert not out.exists()
