"""Converters: Caffe .caffemodel and torchvision weights in, ONNX and safetensors out.

The real weight files cannot be downloaded here, so each test writes a small file in the same
format (a caffemodel is a NetParameter protobuf; a torchvision checkpoint is a state dict with
``features.*`` / ``classifier.*`` keys) and checks the imported model against an independent
forward pass written with torch's own layers in the foreign convention (BGR, Caffe's LRN k=1,
torchvision's 0-1 normalisation).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from caffekit import CLASSES, caffe_blob, caffe_reference, caffe_weights, write_caffemodel
from references import torchvision_reference, torchvision_state

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.data import DeviceAugment
from alexnet.interop import caffe_pb
from alexnet.interop.convert import import_caffe
from alexnet.runtime.fileio import atomic_torch_save


@pytest.mark.parametrize("v1", [True, False], ids=["V1-layers", "V2-layer"])
def test_caffe_import_matches_caffe_forward(tmp_path, v1):
    weights = caffe_weights()
    write_caffemodel(tmp_path / "net.caffemodel", weights, v1=v1)
    g = torch.Generator().manual_seed(1)
    mean_bgr = torch.rand(3, 256, 256, generator=g) * 40 + 100
    msgs = caffe_pb.messages()
    (tmp_path / "mean.binaryproto").write_bytes(
        caffe_blob(msgs, mean_bgr[None].numpy(), legacy=True).SerializeToString()
    )
    (tmp_path / "synsets.txt").write_text(
        "".join(f"n0000000{i} class {i}, thing\n" for i in range(CLASSES))
    )
    ckpt = import_caffe(
        tmp_path / "net.caffemodel", tmp_path / "mean.binaryproto", tmp_path / "synsets.txt"
    )
    assert ckpt["classes"][2] == "n00000002" and ckpt["class_names"][2] == "class 2, thing"
    assert ckpt["augment"]["crop_size"] == 227 and ckpt["model_config"]["conv1_padding"] == 0
    assert ckpt["model_config"]["lrn_per_tower"] is False and ckpt["source"]["lrn_k"] == 1.0
    # The stored mean is the RGB flip of Caffe's BGR mean image.
    torch.testing.assert_close(ckpt["data_stats"]["mean"], mean_bgr.flip(0))
    atomic_torch_save(tmp_path / "imported.pt", ckpt)
    model, ckpt = load_model(tmp_path / "imported.pt")

    # Our pipeline: RGB uint8 256x256 images, centre 227 view minus the RGB mean crop.
    images = torch.randint(0, 256, (2, 3, 256, 256), generator=g, dtype=torch.uint8)
    aug = DeviceAugment(ckpt.data_stats, 227, train=False)
    with torch.no_grad():
        ours = model(aug.views(images, 1)).double()
    # Caffe's: BGR, the same crop, minus the BGR mean crop.
    crop = slice(14, 14 + 227)
    x_bgr = images.flip(1).double()[:, :, crop, crop] - mean_bgr.double()[:, crop, crop]
    ref = caffe_reference(x_bgr, weights)
    assert ref.abs().max() > 1.0  # not a vacuous comparison of near-zero outputs
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # conv3..fc8 land unchanged (only conv1/conv2/conv3 carry the LRN k rescaling)
    torch.testing.assert_close(model.fc6.weight, torch.from_numpy(weights["fc6"][0]))
    torch.testing.assert_close(model.conv4.weight, torch.from_numpy(weights["conv4"][0]))


def test_caffe_import_refuses_caffenet_order_and_garbage(tmp_path):
    write_caffemodel(tmp_path / "caffenet.caffemodel", caffe_weights(), pool_first=True)
    assert (
        main(
            [
                "convert",
                "caffe",
                str(tmp_path / "caffenet.caffemodel"),
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
        == 2
    )
    (tmp_path / "junk.caffemodel").write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    assert (
        main(
            ["convert", "caffe", str(tmp_path / "junk.caffemodel"), "--out", str(tmp_path / "x.pt")]
        )
        == 2
    )
    assert not (tmp_path / "x.pt").exists()


def test_caffe_cli_default_mean_pixel(tmp_path, capsys):
    write_caffemodel(tmp_path / "net.caffemodel", caffe_weights())
    out = tmp_path / "bvlc.pt"
    assert main(["convert", "caffe", str(tmp_path / "net.caffemodel"), "--out", str(out)]) == 0
    _, ckpt = load_model(out)
    pixel = ckpt.data_stats["mean"][:, 100, 100]
    torch.testing.assert_close(pixel, torch.tensor([122.67891434, 116.66876762, 104.00698793]))
    assert "227" in capsys.readouterr().out


def test_torchvision_import_matches_torchvision_preprocessing(tmp_path):
    sd = torchvision_state()
    torch.save(sd, tmp_path / "alexnet-owt.pth")
    assert (
        main(
            [
                "convert",
                "torchvision",
                str(tmp_path / "alexnet-owt.pth"),
                "--out",
                str(tmp_path / "owt.pt"),
            ]
        )
        == 0
    )
    model, ckpt = load_model(tmp_path / "owt.pt")
    assert ckpt.model_config["arch"] == "owt" and ckpt.crop_size == 224
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 256, 256), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ours = model(DeviceAugment(ckpt.data_stats, 224, train=False).views(images, 1))
        # torchvision: Resize(256) + CenterCrop(224) + ToTensor + Normalize
        x = images[:, :, 16:240, 16:240].float() / 255.0
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ref = torchvision_reference(sd)((x - mean) / std)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_torchvision_import_rejects_other_files(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    assert (
        main(
            [
                "convert",
                "torchvision",
                str(tmp_path / "resnet.pth"),
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A small-arch paper-pattern checkpoint with LRN (the op ONNX export must handle)."""
    from alexnet.model import AlexNet

    torch.manual_seed(0)
    model = AlexNet(4, arch="small", image_size=28, widths=(8, 16, 16, 16, 8), fc_width=16).eval()
    g = torch.Generator().manual_seed(0)
    stats = {
        "mean": torch.rand(3, 32, 32, generator=g) * 255,
        "eigvals": torch.ones(3),
        "eigvecs": torch.eye(3),
    }
    ckpt = {
        "model": model.state_dict(),
        "model_config": model.config,
        "classes": list("abcd"),
        "class_names": ["ant", "bee", "cat", "dog"],
        "data_stats": stats,
        "augment": {"crop_size": 28, "scale": 1.0 / 64},
        "config": {},
    }
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    atomic_torch_save(path, ckpt)
    return path


def test_onnx_export_matches_torch(tmp_path, small_checkpoint, capsys):
    import onnx
    import onnxruntime

    out = tmp_path / "small.onnx"
    assert main(["convert", "onnx", "--checkpoint", str(small_checkpoint), "--out", str(out)]) == 0
    assert "max abs difference" in capsys.readouterr().out
    proto = onnx.load(str(out))
    # ONNX's own LRN op, once per LRN layer: the towers folded into the batch axis (A12)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LRN") == 2
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == ["ant", "bee", "cat", "dog"]
    # An independent check on a batch of 5, beyond the exporter's own comparison.
    model, _ = load_model(small_checkpoint)
    x = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(9)) * 60
    got = onnxruntime.InferenceSession(str(out)).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_export_with_preprocessing(tmp_path, small_checkpoint):
    import onnxruntime

    out = tmp_path / "pre.onnx"
    assert (
        main(
            [
                "convert",
                "onnx",
                "--checkpoint",
                str(small_checkpoint),
                "--out",
                str(out),
                "--preprocessing",
            ]
        )
        == 0
    )
    model, ckpt = load_model(small_checkpoint)
    images = torch.randint(
        0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8
    )
    aug = DeviceAugment(ckpt.data_stats, 28, train=False, scale=1.0 / 64)
    with torch.no_grad():
        want = torch.softmax(model(aug.views(images, 1)), 1).numpy()
    crops = images[:, :, 2:30, 2:30].contiguous().numpy()
    got = onnxruntime.InferenceSession(str(out)).run(None, {"images_uint8": crops})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)


def test_safetensors_export_round_trips(tmp_path, small_checkpoint):
    from safetensors.torch import load_file

    out = tmp_path / "small.safetensors"
    assert (
        main(["convert", "safetensors", "--checkpoint", str(small_checkpoint), "--out", str(out)])
        == 0
    )
    model, _ = load_model(small_checkpoint)
    again, ckpt = load_model(out)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    assert ckpt.class_names == ("ant", "bee", "cat", "dog")
    assert set(model.state_dict()) <= set(load_file(out))


def test_a_killed_onnx_export_leaves_the_whole_file_or_none(tmp_path, small_checkpoint):
    """`convert onnx` wrote the graph under its final name and then added its metadata:
    killed between the two, model.onnx had no classes or model config. SIGKILL at moments
    spread over the export: each time the file is either absent or whole with its
    metadata, and no temp file is left once the command runs again."""
    import onnx

    out = tmp_path / "m.onnx"
    cmd = [sys.executable, "-m", "alexnet", "convert", "onnx", "--no-check"]
    cmd += ["--checkpoint", str(small_checkpoint), "--out", str(out)]
    seen = set()
    for delay in (1.5, 3.0, 4.5):
        out.unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        seen.add(out.exists())
        if out.exists():
            keys = {p.key for p in onnx.load(str(out)).metadata_props}
            assert {"model_config", "classes", "augment"} <= keys
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert not list(tmp_path.glob(".*.tmp"))
    assert seen, "no kill landed"


def test_an_onnx_export_stopped_before_its_metadata_leaves_no_file(
    tmp_path, small_checkpoint, monkeypatch
):
    """The worst moment for a kill, made certain: the graph exists, its metadata is being
    added. The old export had written the graph under the final name by then."""
    import onnx

    def killed(proto):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.checker, "check_model", killed)
    out = tmp_path / "m.onnx"
    argv = ["convert", "onnx", "--no-check", "--checkpoint", str(small_checkpoint)]
    assert main([*argv, "--out", str(out)]) == 130
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
