"""JPEG record decoding: the decoder choice, the fallback to PIL, agreement with PIL's pixels,
errors on bad records with every decoder, and the nvJPEG path's CPU fallback."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from datagen import make_folder_tree, random_image
from PIL import Image

from alexnet.cli import main
from alexnet.data import decode, store
from alexnet.data.dataset import PreparedDataset, make_loader
from alexnet.runtime.errors import UserError

FAST = [n for n in decode.ORDER if n != "pil"]


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test sees the packages as it arranges them (``_load`` caches per process)."""
    monkeypatch.delenv(decode.ENV, raising=False)
    decode._load.cache_clear()
    yield
    decode._load.cache_clear()


def _hide(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail, as where the package is not installed."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _pil_pixels(data: bytes) -> np.ndarray:
    """The reference: PIL's own decode, written out here, not through ``alexnet.data``."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _installed(name: str) -> None:
    if name not in decode.available():
        pytest.skip(
            f"{name} is not installed here (pip install '.[jpeg]'; turbojpeg also "
            "needs the system's libturbojpeg)"
        )


@pytest.fixture(scope="module")
def records() -> list[bytes]:
    """Records as prepare writes them (4:4:4, quality 90), RGB and greyscale."""
    rng = np.random.default_rng(0)
    out = [store.encode_jpeg(random_image(rng, 256, 256), 90) for _ in range(6)]
    out.append(store.encode_jpeg(random_image(rng, 64, 48), 75))
    grey = random_image(rng, 40, 56)[:, :, :1]
    return out + [store.encode_jpeg(grey, 90)]


def test_the_first_installed_decoder_in_the_measured_order_is_chosen(monkeypatch):
    installed = decode.available()
    assert installed[-1] == "pil" and installed == [n for n in decode.ORDER if n in installed]
    assert decode.choose() == installed[0]
    if len(installed) > 1:  # the fastest one missing: the next one
        _hide(monkeypatch, installed[0])
        decode._load.cache_clear()
        assert decode.choose() == installed[1]


def test_without_the_fast_packages_pil_decodes(monkeypatch, records):
    _hide(monkeypatch, *FAST)
    assert decode.available() == ["pil"] and decode.choose() == "pil"
    for data in records:
        ref = _pil_pixels(data)
        out = np.empty_like(ref)
        store.decode_jpeg_into(data, out)
        assert np.array_equal(out, ref)


def test_forcing_a_decoder_and_forcing_one_that_is_missing(monkeypatch):
    monkeypatch.setenv(decode.ENV, "pil")
    assert decode.choose() == "pil"
    _hide(monkeypatch, "simplejpeg")
    monkeypatch.setenv(decode.ENV, "simplejpeg")
    with pytest.raises(UserError, match="'simplejpeg' is not installed"):
        decode.choose()
    with pytest.raises(UserError, match="unknown; choose from simplejpeg, turbojpeg, pil"):
        decode.choose("libjpeg")


@pytest.mark.parametrize("name", decode.ORDER)
def test_decoders_give_pils_pixels(name, records):
    # All three run libjpeg-turbo's accurate integer IDCT; measured max |difference| 0.
    _installed(name)
    for data in records:
        ref = _pil_pixels(data)
        out = np.full_like(ref, 7)
        decode.decode_into(data, out, name)
        assert np.array_equal(out, ref), int(np.abs(out.astype(int) - ref).max())


@pytest.mark.parametrize("name", decode.ORDER)
def test_bad_records_are_errors_with_every_decoder(name, records):
    _installed(name)
    good = records[0]
    out = np.empty((256, 256, 3), np.uint8)
    for bad in (good[: len(good) // 2], good[:-2], b"not a jpeg at all"):
        with pytest.raises((OSError, ValueError)):
            decode.decode_into(bad, out, name)
    for shape in ((255, 256, 3), (256, 256, 1)):
        with pytest.raises(ValueError):
            decode.decode_into(good, np.empty(shape, np.uint8), name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedDataset:
    tmp = tmp_path_factory.mktemp("jpeg")
    make_folder_tree(tmp / "src", classes=2, per_class=6)
    argv = ["prepare", "folder", "--train", str(tmp / "src"), str(tmp / "out")]
    assert main([*argv, "--size", "64", "--workers", "1"]) == 0
    return PreparedDataset(tmp / "out", "train")


def _reference_batch(ds: PreparedDataset, idx) -> torch.Tensor:
    return torch.stack([torch.from_numpy(_pil_pixels(bytes(r))) for r in ds.records(idx)])


@pytest.mark.parametrize("name", decode.ORDER)
def test_batches_use_the_forced_decoder(name, prepared, monkeypatch):
    _installed(name)
    monkeypatch.setenv(decode.ENV, name)
    idx = np.array([3, 0, 11, 5])
    got = prepared.get_batch(idx)
    assert torch.equal(got.permute(0, 2, 3, 1), _reference_batch(prepared, idx))


def test_the_forced_decoder_reaches_loader_workers(prepared, monkeypatch):
    monkeypatch.setenv(decode.ENV, "no-such-decoder")
    loader = make_loader(prepared, 4, shuffle=False, num_workers=1)
    try:
        with pytest.raises(UserError, match="no-such-decoder"):
            next(iter(loader))
    finally:
        loader.close()


def test_nvjpeg_falls_back_to_the_cpu_without_torchvision(prepared, monkeypatch):
    _hide(monkeypatch, "torchvision", "torchvision.io")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "torchvision is not importable" in decode.nvjpeg_unavailable("cuda")
    monkeypatch.undo()
    _hide(monkeypatch, "torchvision", "torchvision.io")
    assert "not CUDA" in decode.nvjpeg_unavailable("cpu")
    if not torch.cuda.is_available():
        assert decode.nvjpeg_unavailable("cuda") == "CUDA is not available"
    dec = decode.DeviceDecoder("cpu", prepared.record_shape)
    assert dec.backend == decode.choose() and dec.reason
    idx = np.array([1, 2, 7])
    got = dec(prepared.records(idx))
    assert got.shape == (3, 3, 64, 64) and got.dtype == torch.uint8
    assert torch.equal(got.permute(0, 2, 3, 1), _reference_batch(prepared, idx))


def test_bench_loader_compares_decoders(prepared, capsys):
    argv = ["bench-loader", "--data", str(prepared.root), "--decoders", "pil", "nvjpeg"]
    argv += [
        "--device",
        "cpu",
        "--batches",
        "1",
        "--batch-size",
        "4",
        "--repeats",
        "1",
        "--crop",
        "32",
    ]
    assert main([*argv, "--workers", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pil = out["decoders"]["pil"]
    assert pil["loop_median"] > 0 and pil["workers_0_median"] > 0
    assert pil["max_abs_diff_vs_pil"] == 0
    assert out["decoders"]["nvjpeg"] == {"unavailable": "device cpu is not CUDA"}
    assert out["record_bytes_mean"] > 0


def test_torchvisions_decode_jpeg_in_the_nvjpeg_path_gives_pils_pixels(prepared, monkeypatch):
    """The nvJPEG branch of DeviceDecoder with torchvision's own decode_jpeg (on the CPU
    here: the same call, batched, that runs on the GPU there): where torchvision is
    installed (the suite on torch 2.14.1, make test-torch214)."""
    from references import torchvision_installed

    if not torchvision_installed():
        pytest.skip("torchvision is not installed with this torch (make test-torch214 has it)")
    monkeypatch.setattr(decode, "nvjpeg_unavailable", lambda device: None)
    dec = decode.DeviceDecoder("cpu", prepared.record_shape)
    assert dec.backend == "nvjpeg"
    idx = np.array([4, 0, 9])
    got = dec(prepared.records(idx))
    want = _reference_batch(prepared, idx).permute(0, 3, 1, 2)
    assert got.shape == want.shape and int((got.int() - want.int()).abs().max()) <= 1
