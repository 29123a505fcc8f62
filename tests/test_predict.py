"""``alexnet predict``: any common image file in, the top-5 classes out; bad files named."""

from __future__ import annotations

import io
import json

import evalkit
import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.data import PreparedDataset
from alexnet.data.pipeline import stored_image

BIAS = [0.3, 2.0, 1.5, -1.0, 0.9, -0.5, 1.2, 0.0]


def _write_images(folder, rng) -> list:
    """One file per kind users have: JPEG of odd size, greyscale JPEG, CMYK JPEG, PNG with
    alpha, palette GIF, 16-bit greyscale PNG, a PNG named .JPEG (PAPER G2), a TIFF."""
    folder.mkdir()
    base = Image.fromarray(rng.integers(0, 255, (90, 140, 3), dtype=np.uint8))
    files = {
        "photo.jpg": (base, "JPEG"),
        "grey.jpg": (base.convert("L"), "JPEG"),
        "cmyk.jpg": (base.convert("CMYK"), "JPEG"),
        "alpha.png": (base.convert("RGBA"), "PNG"),
        "palette.gif": (base.convert("P"), "GIF"),
        "deep.png": (Image.fromarray((rng.random((40, 30)) * 65535).astype(np.uint16)), "PNG"),
        "png_named.JPEG": (base, "PNG"),
        "scan.tif": (base.resize((300, 37)), "TIFF"),
    }
    paths = []
    for name, (img, fmt) in files.items():
        img.save(folder / name, format=fmt)
        paths.append(folder / name)
    return paths


def test_every_kind_of_file_gets_the_known_top5(tmp_path, capsys):
    ckpt = evalkit.known_checkpoint(tmp_path / "known.pt", BIAS)
    paths = _write_images(tmp_path / "images", np.random.default_rng(0))
    assert (
        main(
            [
                "predict",
                *map(str, paths),
                "--checkpoint",
                str(ckpt),
                "--json",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    probs = torch.softmax(torch.tensor(BIAS), 0)
    want = probs.argsort(descending=True)[:5].tolist()
    assert [r["file"] for r in out] == [str(p) for p in paths]
    for r in out:
        got = r["predictions"]
        assert [p["class_index"] for p in got] == want
        assert [p["name"] for p in got] == [evalkit.NAMES[i] for i in want]
        np.testing.assert_allclose([p["probability"] for p in got], probs[want].numpy(), rtol=1e-5)


def test_bad_files_are_named_and_the_rest_still_printed(tmp_path, capsys):
    ckpt = evalkit.known_checkpoint(tmp_path / "known.pt", BIAS)
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 20), (10, 200, 30)).save(good)
    truncated = tmp_path / "truncated.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    status = main(
        [
            "predict",
            str(truncated),
            str(good),
            str(text),
            str(missing),
            "--checkpoint",
            str(ckpt),
            "--precision",
            "fp32",
        ]
    )
    captured = capsys.readouterr()
    assert status == 2
    for bad in (truncated, text, missing):
        assert f"{bad}: cannot read image" in captured.err
    assert str(good) in captured.out and str(good) not in captured.err
    assert captured.out.count("%") == 5
    top = torch.softmax(torch.tensor(BIAS), 0).max().item()
    assert f"{100 * top:6.2f}%  {evalkit.CLASSES[1]}  {evalkit.NAMES[1]}" in captured.out


@pytest.mark.parametrize("views", [1, 10])
def test_a_stored_image_as_a_file_gets_the_evaluation_probabilities(tmp_path, capsys, views):
    """A prepared val image written losslessly to PNG goes through predict's file path and
    must give exactly the probabilities the evaluation path gives for the stored record."""
    data, run = evalkit.tiny_run()
    model, card = load_model(run)
    ds = PreparedDataset(data, "val")
    record = ds.get_batch(np.array([3]))
    path = tmp_path / "val3.png"
    Image.fromarray(record[0].permute(1, 2, 0).numpy()).save(path)
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(path),
                "--checkpoint",
                str(run),
                "--views",
                str(views),
                "--top",
                "8",
                "--json",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)[0]["predictions"]
    aug = card.test_views()
    with torch.no_grad():
        x = aug.views(record.contiguous(), views)
        want = torch.softmax(model(x), 1).mean(0)
    got_probs = torch.zeros(8)
    for p in got:
        got_probs[p["class_index"]] = p["probability"]
    torch.testing.assert_close(got_probs, want, rtol=1e-5, atol=1e-6)


def test_load_image_resizes_shorter_side_and_converts_modes(tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 100, 3), np.uint8))
    img.convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    rgb = stored_image(tmp_path / "c.jpg", 32, 3)
    assert rgb.shape == (3, 32, 32) and rgb.dtype == np.uint8
    grey = stored_image(tmp_path / "c.jpg", 32, 1)
    assert grey.shape == (1, 32, 32)
    # One-channel models see PIL's luminance of the RGB image (ITU-R 601-2 weights).
    lum = (rgb.astype(np.float64) * np.array([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    assert np.abs(grey[0] - lum).max() <= 1.0
