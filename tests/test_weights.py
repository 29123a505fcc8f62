"""Published weights by name: download, verify, convert, cache, preprocess (offline).

A local HTTP server on 127.0.0.1 stands in for download.pytorch.org and
dl.caffe.berkeleyvision.org (``$ALEXNET_WEIGHTS_MIRROR``). It serves small files in the real
formats: a torchvision-style state dict saved with ``torch.save``, a ``.caffemodel`` written
through caffe.proto's messages and a ``.tar.gz`` like Caffe's ILSVRC-12 aux data. The test
entries carry those files' own checksums (computed here with hashlib), registered under names
of their own, so the published entries are untouched. Outputs are compared with forward
passes written with torch's ops in each publisher's convention.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from caffekit import caffe_blob, caffe_reference, caffe_weights, write_caffemodel
from PIL import Image
from references import torchvision_state
from weightkit import FACTS, TV_URL, serve, tv_entry

from alexnet import load_pretrained
from alexnet.cli import main
from alexnet.interop import caffe_pb, weights
from alexnet.interop.registry import BUILTIN, Download, WeightSet
from alexnet.runtime.errors import UserError

OWT_WIDTHS, OWT_FC = (8, 16, 24, 16, 16), 32
CAFFE_URL = "http://dl.caffe.berkeleyvision.org/test_alexnet.caffemodel"
AUX_URL = "http://dl.caffe.berkeleyvision.org/test_ilsvrc12.tar.gz"
SYNSETS = [ln.split(" ", 1) for ln in weights.BUNDLED_SYNSETS.read_text().splitlines()]


def _owt_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return torchvision_state(seed, classes=1000, widths=OWT_WIDTHS, fc=OWT_FC)


def _owt_reference(sd, x01: torch.Tensor) -> torch.Tensor:
    """torchvision's alexnet forward and transforms in torch ops: RGB 0-1, Resize(256) +
    CenterCrop(224) (the input here is 256 square already), Normalize(mean, std)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((x01[:, :, 16:240, 16:240] - mean) / std).double()
    w = {k: v.double() for k, v in sd.items()}

    def conv(t, i, **kw):
        return F.relu(F.conv2d(t, w[f"features.{i}.weight"], w[f"features.{i}.bias"], **kw))

    x = F.max_pool2d(conv(x, 0, stride=4, padding=2), 3, 2)
    x = F.max_pool2d(conv(x, 3, padding=2), 3, 2)
    x = F.max_pool2d(conv(conv(conv(x, 6, padding=1), 8, padding=1), 10, padding=1), 3, 2)
    x = F.adaptive_avg_pool2d(x, (6, 6)).flatten(1)
    x = F.relu(F.linear(x, w["classifier.1.weight"], w["classifier.1.bias"]))
    x = F.relu(F.linear(x, w["classifier.4.weight"], w["classifier.4.bias"]))
    return F.linear(x, w["classifier.6.weight"], w["classifier.6.bias"])


def _torchvision_file(server, sd=None) -> bytes:
    buf = io.BytesIO()
    torch.save(sd or _owt_state(), buf)
    serve(server, TV_URL, buf.getvalue())
    return buf.getvalue()


def _cache_files(home: Path) -> list[str]:
    """Every file in the cache that is not a lock."""
    return sorted(
        str(p.relative_to(home))
        for p in home.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    )


def _image(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 256, 256), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------ torchvision
def test_torchvision_weights_load_predict_and_reuse_the_cache(server, registered, tmp_path, capsys):
    sd = _owt_state()
    registered(tv_entry(_torchvision_file(server, sd)))
    model = load_pretrained("test-owt")
    images = torch.stack([_image(1), _image(2)])
    with torch.no_grad():
        ours = model(model.transforms(images)).double()  # uint8 RGB in
        from01 = model(model.transforms(images.float() / 255)).double()  # ToTensor's 0-1
    ref = _owt_reference(sd, images.float() / 255)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from01, ref, rtol=1e-4, atol=1e-4)
    assert model.meta["classes"][:2] == ["n01440764", "n01443537"]
    home = tmp_path / "home"
    assert _cache_files(home) == [
        "converted/test-owt.json",
        "converted/test-owt.pt",
        "downloads/alexnet-owt-test.pth",
    ]

    # predict prints the class names of the weight set; a second run needs no network.
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    server.shutdown()
    server.server_close()
    assert (
        main(
            [
                "predict",
                str(tmp_path / "a.png"),
                "--weights",
                "test-owt",
                "--json",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    preds = json.loads(capsys.readouterr().out)[0]["predictions"]
    best = int(ref[0].argmax())
    assert preds[0]["class_id"] == SYNSETS[best][0] and preds[0]["name"] == SYNSETS[best][1]


@pytest.mark.parametrize(
    "damage", ["flipped-byte", "short-file", "cut-connection", "wrong-checksum"]
)
def test_damaged_download_is_refused_and_nothing_kept(server, registered, tmp_path, capsys, damage):
    good = _torchvision_file(server)
    entry = tv_entry(good)
    served = received = good
    if damage == "flipped-byte":
        served = received = good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:]
    elif damage == "short-file":
        served = received = good[: len(good) // 2]
    elif damage == "cut-connection":
        server.handler.cut["/models/alexnet-owt-test.pth"] = len(good) // 3
        received = good[: len(good) // 3]
    else:
        entry = tv_entry(good, sha256="0" * 64)
    serve(server, TV_URL, served)
    registered(entry)
    img = tmp_path / "a.png"
    Image.fromarray(_image(0).permute(1, 2, 0).numpy()).save(img)
    assert main(["predict", str(img), "--weights", "test-owt"]) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    (err,) = [ln for ln in lines if "%|" not in ln]  # one line beside the progress bar
    assert err.startswith("alexnet predict: error: ") and "alexnet-owt-test.pth" in err, err
    assert f"SHA256 {hashlib.sha256(received).hexdigest()}, expected {entry.weights.sha256}" in err
    if damage in ("short-file", "cut-connection"):
        assert f"bytes, expected {len(good)}" in err
    assert _cache_files(tmp_path / "home") == []


def test_offline_names_the_url_and_where_to_put_the_file(server, registered, tmp_path, capsys):
    registered(tv_entry(_torchvision_file(server)))
    server.shutdown()
    server.server_close()
    with pytest.raises(UserError) as e:
        weights.checkpoint_path("test-owt", progress=False)
    msg = str(e.value)
    where = tmp_path / "home" / "downloads" / "alexnet-owt-test.pth"
    assert "alexnet-owt-test.pth" in msg and str(where) in msg and "127.0.0.1" in msg
    assert _cache_files(tmp_path / "home") == []


def test_file_placed_by_hand_is_verified_and_used(server, registered, tmp_path):
    data = _torchvision_file(server)
    registered(tv_entry(data))
    server.shutdown()
    server.server_close()
    where = tmp_path / "home" / "downloads" / "alexnet-owt-test.pth"
    where.parent.mkdir(parents=True)
    where.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UserError, match=hashlib.sha256(data).hexdigest()):
        weights.checkpoint_path("test-owt")
    where.write_bytes(data)
    assert weights.checkpoint_path("test-owt").is_file()


def test_killed_download_leaves_nothing_complete_and_is_cleaned(server, registered, tmp_path):
    data = _torchvision_file(server)
    registered(tv_entry(data))
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    # What a run killed mid-download leaves: our temporary name and torch.hub's inside it,
    # named after a process that no longer exists.
    dead = 2**22 + 12345
    stale = [
        downloads / f".alexnet-owt-test.pth.{dead}.download",
        downloads / f".alexnet-owt-test.pth.{dead}.download.0a1b.partial",
    ]
    for p in stale:
        p.write_bytes(data[:100])
    assert not (downloads / "alexnet-owt-test.pth").exists()
    weights.checkpoint_path("test-owt", progress=False)
    assert not any(p.exists() for p in stale)
    assert (downloads / "alexnet-owt-test.pth").read_bytes() == data


def test_converted_file_damaged_in_the_cache_is_rebuilt(server, registered, tmp_path):
    registered(tv_entry(_torchvision_file(server)))
    path = weights.checkpoint_path("test-owt", progress=False)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    server.shutdown()  # the download is cached: the rebuild needs no network
    server.server_close()
    assert weights.checkpoint_path("test-owt", progress=False).read_bytes() == good
    path.with_suffix(".json").write_text('{"sources": ')  # a record cut short
    assert weights.checkpoint_path("test-owt", progress=False).read_bytes() == good


# ------------------------------------------------------------------------------ Caffe
CLASSES = 5


def _aux_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def caffe_files(server, tmp_path):
    """A narrow bvlc_alexnet, a BGR mean image and a word list, served as Caffe serves them."""
    w = caffe_weights()
    write_caffemodel(tmp_path / "net.caffemodel", w)
    model = (tmp_path / "net.caffemodel").read_bytes()
    mean_bgr = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1)) * 40 + 100
    mean = caffe_blob(caffe_pb.messages(), mean_bgr[None].numpy(), legacy=True).SerializeToString()
    words = "".join(f"n0000000{i} class {i}, thing\n" for i in range(CLASSES)).encode()
    aux = _aux_tar(
        {"imagenet_mean.binaryproto": mean, "synset_words.txt": words, "train.txt": b"unused\n"}
    )
    serve(server, CAFFE_URL, model)
    serve(server, AUX_URL, aux)
    entry = _caffe_entry(model, mean, aux)
    return {"weights": w, "mean_bgr": mean_bgr, "entry": entry, "aux": aux}


def _caffe_entry(model: bytes, mean: bytes, aux: bytes) -> WeightSet:
    base = {f: getattr(BUILTIN[1], f) for f in (*FACTS, "mean", "synsets")}
    return WeightSet(
        name="test-caffe",
        format="caffe",
        weights=Download(CAFFE_URL, sha1=hashlib.sha1(model).hexdigest()),
        aux=Download(AUX_URL),  # like Caffe's aux data: no published checksum or size
        members={
            "imagenet_mean.binaryproto": hashlib.sha1(mean).hexdigest(),
            "synset_words.txt": None,
        },
        **base,
    )


def test_caffe_weights_take_rgb_and_apply_bgr_and_the_mean_image(caffe_files, registered, tmp_path):
    registered(caffe_files["entry"])
    model = load_pretrained("test-caffe", progress=False)
    rgb = torch.stack([_image(3), _image(4)])
    with torch.no_grad():
        ours = model(model.transforms(rgb)).double()
    crop = slice(14, 14 + 227)  # Caffe's centre 227 of the 256 image, in BGR, minus its mean
    x_bgr = rgb.flip(1).double()[:, :, crop, crop] - caffe_files["mean_bgr"].double()[:, crop, crop]
    ref = caffe_reference(x_bgr, caffe_files["weights"])
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert model.meta["class_names"][3] == "class 3, thing"
    # the aux archive had no published checksum: its first download's SHA-256 is pinned
    pin = tmp_path / "home" / "downloads" / "test_ilsvrc12.tar.gz.sha256"
    assert pin.read_text().strip() == hashlib.sha256(caffe_files["aux"]).hexdigest()
    # a later change of the cached archive is caught by the pin
    archive = pin.with_name("test_ilsvrc12.tar.gz")
    archive.write_bytes(archive.read_bytes() + b"\0")
    (tmp_path / "home" / "converted" / "test-caffe.json").unlink()
    with pytest.raises(UserError, match="pinned"):
        weights.checkpoint_path("test-caffe", progress=False)


@pytest.mark.parametrize("damage", ["cut-archive", "wrong-mean"])
def test_damaged_caffe_aux_data_is_refused(caffe_files, registered, server, tmp_path, damage):
    entry = caffe_files["entry"]
    if damage == "cut-archive":
        serve(server, AUX_URL, caffe_files["aux"][: len(caffe_files["aux"]) // 2])
    else:
        members = {**entry.members, "imagenet_mean.binaryproto": "1" * 40}
        entry = WeightSet(**{**entry.__dict__, "members": members})
    registered(entry)
    with pytest.raises(UserError) as e:
        weights.checkpoint_path("test-caffe", progress=False)
    assert "test_ilsvrc12.tar.gz" in str(e.value) and len(str(e.value).splitlines()) == 1
    # the verified caffemodel may stay (it is complete and checked); nothing of the archive
    assert _cache_files(tmp_path / "home") == ["downloads/test_alexnet.caffemodel"]


def test_evaluate_and_features_take_weights_by_name(caffe_files, registered, tmp_path, capsys):
    from alexnet.data import prepare_arrays

    registered(caffe_files["entry"])
    rgb = torch.stack([_image(10 + i) for i in range(6)])
    crop = slice(14, 14 + 227)
    x_bgr = rgb.flip(1).double()[:, :, crop, crop] - caffe_files["mean_bgr"].double()[:, crop, crop]
    ref = caffe_reference(x_bgr, caffe_files["weights"])
    labels = np.array([int(ref[0].argmax()), 0, 1, 2, 3, 4])  # the first is right, by design
    classes = [f"n0000000{i}" for i in range(CLASSES)]
    hwc = rgb.permute(0, 2, 3, 1).numpy()
    data = prepare_arrays(
        tmp_path / "data", {"train": (hwc, labels), "val": (hwc, labels)}, classes
    )
    assert (
        main(
            [
                "evaluate",
                "--weights",
                "test-caffe",
                "--data",
                str(data),
                "--json",
                "--batch-size",
                "4",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = float((ref.argmax(1).numpy() != labels).mean())
    assert result["top1_error"] == pytest.approx(want)
    out = tmp_path / "fc8.npy"
    assert (
        main(
            [
                "features",
                "extract",
                "--weights",
                "test-caffe",
                "--data",
                str(data),
                "--split",
                "val",
                "--layer",
                "fc8",
                "--out",
                str(out),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(out), ref.numpy(), rtol=1e-4, atol=1e-4)
    assert json.loads(out.with_suffix(".json").read_text())["weights"] == "test-caffe"


# ------------------------------------------------------------------- hub and registry
def test_torch_hub_loads_weights_from_a_local_clone(server, registered):
    sd = _owt_state(seed=5)
    registered(tv_entry(_torchvision_file(server, sd)))
    root = Path(__file__).resolve().parents[1]
    model = torch.hub.load(str(root), "alexnet", source="local", weights="test-owt", progress=False)
    img = _image(7)[None]
    with torch.no_grad():
        got = model(model.transforms(img)).double()
    torch.testing.assert_close(got, _owt_reference(sd, img.float() / 255), rtol=1e-4, atol=1e-4)
    plain = torch.hub.load(str(root), "alexnet", source="local", num_classes=10)
    assert plain.fc8.out_features == 10 and plain.config["arch"] == "paper"


def test_registry_names_are_protected_and_mistakes_named():
    with pytest.raises(UserError, match="built-in"):
        weights.register(WeightSet(**{**BUILTIN[0].__dict__, "aliases": ()}))
    with pytest.raises(UserError, match="did you mean 'bvlc_alexnet'"):
        weights.lookup("bvlc_alexnte")
    assert weights.lookup("imagenet1k_v1") is weights.lookup("DEFAULT") is BUILTIN[0]


def test_registry_file_from_the_environment(tmp_path, monkeypatch):
    entry = {
        "name": "mine",
        "format": "torchvision",
        "weights": {"url": TV_URL, "size": 3},
        **{f: getattr(BUILTIN[0], f) for f in FACTS},
    }
    (tmp_path / "reg.json").write_text(json.dumps([entry]))
    monkeypatch.setenv("ALEXNET_WEIGHTS_REGISTRY", str(tmp_path / "reg.json"))
    assert weights.lookup("mine").weights.size == 3
    (tmp_path / "reg.json").write_text(json.dumps([{**entry, "name": "bvlc_alexnet"}]))
    with pytest.raises(UserError, match="built-in"):
        weights.lookup("mine")


def test_bundled_class_list_is_ilsvrc2012():
    ids = [wnid for wnid, _ in SYNSETS]
    # 1000 distinct WordNet ids in sorted order, from tench to toilet tissue (the order of
    # torchvision's categories and Caffe's synset_words.txt).
    assert len(ids) == len(set(ids)) == 1000 and ids == sorted(ids)
    assert SYNSETS[0] == ["n01440764", "tench, Tinca tinca"]
    assert SYNSETS[-1] == ["n15075141", "toilet tissue, toilet paper, bathroom tissue"]
