"""Images that are not 8-bit RGB (PAPER G2) become 8-bit RGB by scaling, not clipping: each
mode against a numpy computation of what its pixels mean, through the loader that
``prepare`` and ``predict`` share."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from alexnet.cli import main
from alexnet.data import PreparedDataset
from alexnet.data.pipeline import RecordFormat, load_rgb, stored_image

H, W = 12, 16


def _ramp(top: float) -> np.ndarray:
    """(H, W) float64 from 0 to ``top`` in a known order."""
    return np.linspace(0, top, H * W).reshape(H, W)


def _saved(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return colour * a + 255.0 * (1 - a)


def _cases():
    """(name, encoded bytes, the 8-bit RGB its pixels mean as float64 (H, W, 3))."""
    v16 = np.round(_ramp(65535)).astype(np.uint16)
    yield "PNG I;16", _saved(Image.fromarray(v16), "PNG"), _grey(v16 / 257)
    big = Image.frombytes("I;16B", (W, H), v16.astype(">u2").tobytes())
    yield "TIFF I;16B", _saved(big, "TIFF"), _grey(v16 / 257)
    yield "TIFF I", _saved(Image.fromarray(v16.astype(np.int32)), "TIFF"), _grey(v16 / 257)
    f01 = _ramp(1.0).astype(np.float32)
    yield "TIFF F [0,1]", _saved(Image.fromarray(f01), "TIFF"), _grey(f01 * 255.0)
    f300 = (_ramp(400.0) - 50).astype(np.float32)
    yield "TIFF F 0..255", _saved(Image.fromarray(f300), "TIFF"), _grey(np.clip(f300, 0, 255))
    bits = np.indices((H, W)).sum(0) % 3 == 0
    yield "PNG 1", _saved(Image.fromarray(bits), "PNG"), _grey(bits * 255.0)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (H, W)).astype(np.uint8)
    alpha = np.round(_ramp(255)).astype(np.uint8)
    la = Image.fromarray(np.stack([grey, alpha], -1), "LA")
    yield "PNG LA", _saved(la, "PNG"), _over_white(_grey(grey.astype(float)), alpha)
    rgb = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA")
    yield "PNG RGBA", _saved(rgba, "PNG"), _over_white(rgb.astype(float), alpha)
    palette = rng.integers(0, 256, (4, 3)).astype(np.uint8)
    idx = (np.indices((H, W)).sum(0) % 4).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.reshape(-1).tolist())
    p.info["transparency"] = 2
    want = palette[idx].astype(float)
    want[idx == 2] = 255.0
    yield "PNG P+transparency", _saved(p, "PNG"), want
    key = tuple(int(v) for v in rgb[0, 0])
    keyed = Image.fromarray(rgb)
    keyed.info["transparency"] = key  # PNG tRNS: this one colour is transparent
    want = rgb.astype(float)
    want[(rgb == key).all(-1)] = 255.0
    yield "PNG RGB+transparency", _saved(keyed, "PNG"), want
    cmyk = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    c = cmyk.astype(float)
    want = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255  # the usual CMYK -> RGB
    yield "TIFF CMYK", _saved(Image.fromarray(cmyk, "CMYK"), "TIFF"), want


CASES = list(_cases())


@pytest.mark.parametrize(("name", "data", "want"), CASES, ids=[c[0] for c in CASES])
def test_each_mode_is_scaled_to_8_bit_rgb(name, data, want):
    got, kind = load_rgb(data, RecordFormat(size=0))
    assert got.dtype == np.uint8 and got.shape == (H, W, 3), kind
    assert np.abs(got.astype(np.float64) - want).max() <= 1.0, kind


def test_predict_reads_a_16_bit_png_as_prepare_does(tmp_path):
    v16 = np.round(_ramp(65535)).astype(np.uint16)[:, :H]  # square: the stored crop is all
    path = tmp_path / "deep.png"
    Image.fromarray(v16).save(path)
    got = stored_image(path, H, 3).astype(np.float64)  # (3, H, H)
    assert np.abs(got - (v16 / 257)[None]).max() <= 1.0


def test_prepare_stores_deep_images_scaled(tmp_path, capsys):
    v16 = np.round(_ramp(65535)).astype(np.uint16)
    f01 = _ramp(1.0).astype(np.float32)
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "b").mkdir()
    Image.fromarray(v16).save(tmp_path / "src" / "a" / "x.png")
    Image.fromarray(f01).save(tmp_path / "src" / "b" / "y.tif")
    argv = [
        "folder",
        "--train",
        tmp_path / "src",
        tmp_path / "out",
        "--size",
        "0",
        "--storage",
        "raw",
        "--workers",
        "1",
    ]
    assert main(["prepare", *map(str, argv)]) == 0
    ds = PreparedDataset(tmp_path / "out")
    for k, want in enumerate((v16 / 257, f01 * 255.0)):
        got = ds[k][0].numpy().astype(np.float64)
        assert np.abs(got - want[None]).max() <= 1.0
