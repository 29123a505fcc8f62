"""``alexnet prepare`` on generated ImageNet-layout sources (PAPER G1, G2): counts, labels
through the devkit, odd and broken files, resize geometry (B1), the mean image and PCA (B2,
B4) against numpy, kill-and-resume, verify, and the small datasets."""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from datagen import make_folder_tree, make_imagenet_tars
from datagen import one_error_line as _one_error
from datagen import prepare_cli as _cli
from PIL import Image

from alexnet.cli import main
from alexnet.data import PreparedDataset, prepare
from alexnet.data.store import read_stats


def _imagenet_args(src, out, *extra):
    return [
        "imagenet",
        "--train",
        src.train_tar,
        "--val",
        src.val_tar,
        "--devkit",
        src.devkit,
        out,
        "--size",
        "32",
        "--chunk",
        "4",
        *extra,
    ]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet")
    src = make_imagenet_tars(tmp / "src", n_classes=4, per_class=5, val_per_class=3, bad=True)
    out = tmp / "prepared"
    assert (
        main(["prepare", *map(str, _imagenet_args(src, out, "--skip-bad", "--workers", "2"))]) == 0
    )
    return src, out


def test_imagenet_counts_labels_and_names(imagenet):
    src, out = imagenet
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["count"] == 4 * 5 + 3  # + the CMYK, grey and PNG files
    assert meta["splits"]["train"]["skipped"] == 3
    assert sorted(
        Path(p).name.split(":")[-1] for p in meta["splits"]["train"]["skipped_files"]
    ) == sorted(src.bad)
    assert meta["splits"]["train"]["converted"] == {"JPEG/CMYK": 1, "JPEG/L": 1, "PNG/RGB": 1}
    assert meta["classes"] == src.wnids and meta["class_names"] == [src.words[w] for w in src.wnids]
    train = PreparedDataset(out, "train")
    names = (out / "train.files.txt").read_text().split()
    for name, label in zip(names, train.labels.tolist(), strict=True):
        assert name.split(":")[-1].startswith(src.wnids[label])
    val = PreparedDataset(out, "val")
    assert len(val) == 12 and (out / "val.files.txt").read_text().split()[0].endswith(
        "00000001.JPEG"
    )
    # PAPER G1: ground-truth IDs map through meta.mat to WNIDs, then to sorted-WNID indices.
    assert val.labels.tolist() == [src.wnids.index(w) for w in src.val_wnids]
    assert any(src.ids[w] != k + 1 for k, w in enumerate(src.wnids))  # the trap is present


def test_odd_files_become_rgb(imagenet):
    src, out = imagenet
    names = (out / "train.files.txt").read_text().split()
    ds = PreparedDataset(out, "train")
    for tag in ("cmyk", "grey", "png"):
        k = next(i for i, n in enumerate(names) if n.endswith(f"_{tag}.JPEG"))
        img = ds[k][0].numpy().astype(int)
        assert img.shape == (3, 32, 32)
        if tag == "grey":
            assert np.abs(img[0] - img[1]).max() <= 3 and np.abs(img[2] - img[1]).max() <= 3


def test_bad_files_fail_with_a_report_unless_skipped(tmp_path, capsys):
    src = make_imagenet_tars(tmp_path / "src", n_classes=2, per_class=2, bad=True, odd=False)
    rc, _, err = _cli(capsys, *_imagenet_args(src, tmp_path / "out", "--workers", "1"))
    err = _one_error(err)
    assert rc == 2 and "3 unreadable file(s)" in err and "--skip-bad" in err
    report = (tmp_path / "out" / "bad_files.txt").read_text()
    assert {line.split("\t")[0].split(":")[-1] for line in report.splitlines()} == set(src.bad)
    assert "empty file" in report and "truncated" in report
    assert not (tmp_path / "out" / "meta.json").exists()
    rc, out, _ = _cli(capsys, *_imagenet_args(src, tmp_path / "out", "--skip-bad"))
    assert rc == 0 and "skipped 3 unreadable" in out and "resuming" in out


def _gradient_image(w: int, h: int) -> np.ndarray:
    """R rises with x, G with y: a stored pixel's value says where it came from."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 170 * (x + 0.5) / w, 40 + 170 * (y + 0.5) / h, np.full_like(x, 128)], -1)
    return np.round(img).astype(np.uint8)


@pytest.mark.parametrize(("size", "storage", "tol"), [(32, "raw", 1.0), (16, "jpeg", 3.0)])
def test_resize_geometry_is_shorter_side_then_central_crop(tmp_path, capsys, size, storage, tol):
    shapes = {"wide": (200, 100), "tall": (90, 150), "square": (64, 64)}
    for name, (w, h) in shapes.items():
        (tmp_path / "src" / name).mkdir(parents=True)
        # PNG keeps the source exact; JPEG sources take the DCT-downscaling (draft) path.
        ext = "png" if storage == "raw" else "jpg"
        Image.fromarray(_gradient_image(w, h)).save(
            tmp_path / "src" / name / f"a.{ext}", quality=98, subsampling=0
        )
    rc, _, _ = _cli(
        capsys,
        "folder",
        "--train",
        tmp_path / "src",
        tmp_path / "out",
        "--size",
        size,
        "--storage",
        storage,
        "--workers",
        "1",
    )
    assert rc == 0
    ds = PreparedDataset(tmp_path / "out", "train")
    for k, name in enumerate(ds.classes):
        w, h = shapes[name]
        s = min(w, h)
        got = ds[k][0].numpy().astype(np.float64)
        assert got.shape == (3, size, size)
        # PAPER B1: stored pixel j covers source x in the central s-wide band, s/size per pixel.
        centre = (np.arange(size) + 0.5) * s / size
        x_src, y_src = (w - s) / 2 + centre, (h - s) / 2 + centre
        want_r = 40 + 170 * x_src / w
        want_g = 40 + 170 * y_src / h
        inner = slice(2, size - 2)  # the resampling filter meets the image border at the edge
        assert np.abs(got[0][inner, inner] - want_r[None, inner]).max() <= tol
        assert np.abs(got[1][inner, inner] - want_g[inner, None]).max() <= tol
        # The two-step recipe of B1, computed independently with PIL: resize then crop.
        src = Image.fromarray(_gradient_image(w, h))
        rw, rh = (size, round(h * size / w)) if w < h else (round(w * size / h), size)
        two = np.asarray(src.resize((rw, rh), Image.Resampling.BICUBIC))
        top, left = (rh - size) // 2, (rw - size) // 2
        two = two[top : top + size, left : left + size].transpose(2, 0, 1).astype(np.float64)
        assert np.abs(got - two)[:, inner, inner].mean() < tol + 1.0


def test_mean_image_and_pca_match_numpy(imagenet):
    _, out = imagenet
    ds = PreparedDataset(out, "train")
    images = np.stack([ds[i][0].numpy() for i in range(len(ds))]).astype(np.float64)
    stats = read_stats(out)
    np.testing.assert_allclose(stats["mean"], images.mean(0), atol=1e-3)  # PAPER B2
    pixels = images.transpose(0, 2, 3, 1).reshape(-1, 3)
    cov = np.cov(pixels.T, bias=True)  # PAPER B4: covariance of all training RGB pixels
    vals, vecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats["eigvals"], vals[::-1], rtol=1e-4)
    for i in range(3):
        assert abs(float(stats["eigvecs"][:, i] @ vecs[:, 2 - i])) > 1 - 1e-4
    np.testing.assert_allclose(stats["eigvecs"].T @ stats["eigvecs"], np.eye(3), atol=1e-5)


def _parse(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    prepare.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def _same_dataset(a: Path, b: Path) -> None:
    for name in ("train.bin", "val.bin", "train.files.txt", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for split in ("train", "val"):
        assert np.array_equal(np.load(a / f"{split}.index.npy"), np.load(b / f"{split}.index.npy"))
    sa, sb = read_stats(a), read_stats(b)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


def test_interrupted_prepare_resumes_to_the_same_result(imagenet, tmp_path):
    src, unbroken = imagenet
    out = tmp_path / "out"
    done = []

    def stop_after_two() -> None:
        done.append(1)
        if len(done) == 2:
            raise KeyboardInterrupt

    args = _parse(*_imagenet_args(src, out, "--skip-bad", "--workers", "1"))
    with pytest.raises(KeyboardInterrupt):
        prepare.run_imagenet(args, after_chunk=stop_after_two)
    assert not (out / "meta.json").exists() and len(list(out.glob(".parts/train/*.npz"))) == 2
    # Reusing the source with the same settings continues; other settings are refused.
    with pytest.raises(prepare.UserError, match="other inputs or settings"):
        prepare.run_imagenet(_parse(*_imagenet_args(src, out, "--quality", "80")))
    assert prepare.run_imagenet(args) == 0
    _same_dataset(out, unbroken)


def test_killed_prepare_resumes_to_the_same_result(imagenet, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src, unbroken = imagenet
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "alexnet",
        "prepare",
        *map(str, _imagenet_args(src, out, "--skip-bad", "--workers", "2", "--chunk", "1")),
    ]
    proc = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob(".parts/train/chunk_*.npz")):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its pool workers, mid-write
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "meta.json").exists()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "resuming" in run.stdout
    _same_dataset(out, unbroken)
    assert not (out / ".parts").exists()


def test_extracted_folders_give_the_same_records_as_the_tars(imagenet, tmp_path, capsys):
    src, from_tars = imagenet
    train_dir, val_dir, dev_dir = tmp_path / "train", tmp_path / "val", tmp_path / "devkit"
    with tarfile.open(src.train_tar) as outer:
        for m in outer:
            inner = tarfile.open(fileobj=outer.extractfile(m))
            inner.extractall(train_dir / m.name[:-4], filter="data")
    with tarfile.open(src.val_tar) as t:
        t.extractall(val_dir, filter="data")
    with tarfile.open(src.devkit) as t:
        t.extractall(dev_dir, filter="data")
    out = tmp_path / "out"
    rc, _, _ = _cli(
        capsys,
        "imagenet",
        "--train",
        train_dir,
        "--val",
        val_dir,
        "--devkit",
        dev_dir,
        out,
        "--size",
        "32",
        "--skip-bad",
        "--workers",
        "1",
    )
    assert rc == 0
    assert (out / "train.bin").read_bytes() == (from_tars / "train.bin").read_bytes()
    assert (out / "val.bin").read_bytes() == (from_tars / "val.bin").read_bytes()
    assert np.array_equal(np.load(out / "val.index.npy"), np.load(from_tars / "val.index.npy"))
    # A validation folder already split into <wnid>/ needs no devkit.
    split_val = tmp_path / "val_split"
    for name, wnid in zip(sorted(p.name for p in val_dir.iterdir()), src.val_wnids, strict=True):
        (split_val / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copy(val_dir / name, split_val / wnid / name)
    out2 = tmp_path / "out2"
    rc, _, _ = _cli(
        capsys,
        "imagenet",
        "--train",
        train_dir,
        "--val",
        split_val,
        out2,
        "--size",
        "32",
        "--skip-bad",
        "--workers",
        "1",
    )
    assert rc == 0
    a, b = PreparedDataset(out, "val"), PreparedDataset(out2, "val")
    assert sorted(a.labels.tolist()) == sorted(b.labels.tolist())
    assert json.loads((out2 / "meta.json").read_text())["class_names"] == src.wnids


def test_malformed_sources_are_one_clear_error(imagenet, tmp_path, capsys):
    src, _ = imagenet
    out = tmp_path / "out"
    no_gt = tmp_path / "devkit.tar.gz"
    with tarfile.open(no_gt, "w:gz") as t:
        t.add(src.train_tar, "data/meta.mat")  # a file of the right name but wrong content
    short_val = tmp_path / "val.tar"
    with tarfile.open(src.val_tar) as full, tarfile.open(short_val, "w") as t:
        for m in full.getmembers()[:-1]:
            t.addfile(m, full.extractfile(m))
    cases = [
        (["imagenet", "--train", tmp_path / "nope.tar", out], "nope.tar: not found"),
        (["imagenet", "--train", src.train_tar, "--val", src.val_tar, out], "needs --devkit"),
        (
            ["imagenet", "--train", src.train_tar, "--val", short_val, "--devkit", src.devkit, out],
            "11 validation images but the devkit ground truth lists 12",
        ),
        (["imagenet", "--train", src.train_tar, "--devkit", no_gt, out], "devkit has no data/"),
        (["imagenet", "--train", src.devkit, out], "not a readable uncompressed tar"),
        (["folder", "--train", tmp_path, out], "no class sub-folders"),
    ]
    for argv, message in cases:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and message in _one_error(err), (argv, err)


def test_folder_tree_train_and_val(tmp_path, capsys):
    files = make_folder_tree(tmp_path / "train", ["cat", "dog"], per_class=3)
    make_folder_tree(tmp_path / "val", ["dog"], per_class=2, seed=1)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    rc, out, _ = _cli(
        capsys,
        "folder",
        "--train",
        tmp_path / "train",
        "--val",
        tmp_path / "val",
        tmp_path / "out",
        "--size",
        "24",
        "--workers",
        "2",
        "--chunk",
        "2",
    )
    assert rc == 0 and "ignored 1 non-image file" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["splits"]["val"]["count"] == 2
    assert PreparedDataset(tmp_path / "out", "val").labels.tolist() == [1, 1]
    assert len(files["cat"]) == 3
    rc, out, _ = _cli(capsys, "folder", "--train", tmp_path / "train", tmp_path / "out")
    assert rc == 0 and "already prepared" in out
    make_folder_tree(tmp_path / "val2", ["bird"], per_class=1)
    rc, _, err = _cli(
        capsys,
        "folder",
        "--train",
        tmp_path / "train",
        "--val",
        tmp_path / "val2",
        tmp_path / "out3",
    )
    assert rc == 2 and "not in the training set" in err


def test_native_size_keeps_pixels_exactly(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", 2, per_class=3, sizes=[(20, 12)], ext=".png")
    rc, _, _ = _cli(
        capsys,
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
    )
    assert rc == 0
    ds = PreparedDataset(tmp_path / "out", "train")
    assert ds.image_size == (12, 20)
    src = np.asarray(Image.open(tmp_path / "src" / "class_1" / "0001.png").convert("RGB"))
    assert np.array_equal(ds[4][0].permute(1, 2, 0).numpy(), src)


def test_verify_finds_damage(imagenet, tmp_path, capsys):
    _, prepared = imagenet
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    rc, stdout, _ = _cli(capsys, "verify", out)
    assert rc == 0 and "OK" in stdout
    index = np.load(out / "val.index.npy")
    data = bytearray((out / "val.bin").read_bytes())
    off = int(index["offset"][3])
    data[off : off + 40] = bytes(40)  # wipe the JPEG header of record 3
    (out / "val.bin").write_bytes(bytes(data))
    rc, _, err = _cli(capsys, "verify", out)
    assert rc == 2 and "val.bin: record 3 (source " in err and "_val_00000004.JPEG)" in err
    (out / "val.bin").write_bytes(bytes(data[:-10]))
    rc, _, err = _cli(capsys, "verify", out)
    assert rc == 2 and "its index ends at byte" in err and "truncated" in err
