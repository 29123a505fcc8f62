"""The small real datasets: Fashion-MNIST IDX files and CIFAR-10 python batches, stored raw
at their native size; a stratified validation split is held out of the training images and
the official test set is the ``test`` split."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from datagen import make_cifar_batches, make_fashion_idx, write_idx

from alexnet.cli import main
from alexnet.data import PreparedDataset, small
from alexnet.runtime.errors import UserError


def test_fashion_mnist_from_idx_files(tmp_path, capsys):
    arrays = make_fashion_idx(tmp_path / "src", n_train=30, n_test=12)
    out = tmp_path / "out"
    argv = ["prepare", "fashion-mnist", str(out), "--source", str(tmp_path / "src")]
    assert main([*argv, "--val-size", "6", "--val-seed", "3"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["class_names"] == small.FASHION_MNIST_CLASSES and meta["storage"] == "raw"
    assert meta["validation"] == {"size": 6, "seed": 3, "stratified": True, "from": "train"}
    assert meta["test_split"] == "test"
    x_train, y_train = arrays["train"]
    test = PreparedDataset(out, "test")  # the official test set, whole and in order
    assert np.array_equal(test.get_batch(np.arange(len(test)))[:, 0].numpy(), arrays["t10k"][0])
    assert np.array_equal(test.labels.numpy(), arrays["t10k"][1])
    # train + val are the official training images, each exactly once (rows compared whole)
    got = {}
    for split in ("train", "val"):
        ds = PreparedDataset(out, split)
        assert ds.image_size == (28, 28) and ds.channels == 1
        got[split] = (ds.get_batch(np.arange(len(ds)))[:, 0].numpy(), ds.labels.numpy())
    assert len(got["val"][1]) == 6 and len(got["train"][1]) == 24
    rows = {x.tobytes(): y for x, y in zip(x_train, y_train, strict=True)}
    both = [(x.tobytes(), y) for part in got.values() for x, y in zip(*part, strict=True)]
    assert sorted(k for k, _ in both) == sorted(rows) and all(rows[k] == y for k, y in both)
    stats = PreparedDataset(out, "train").stats  # over the training images only (B2, B4)
    var = got["train"][0].astype(np.float64).var()
    np.testing.assert_allclose(stats["eigvals"][0].item(), var, rtol=1e-5)


def test_validation_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])  # shares 0.4, 0.3, 0.2, 0.1
    held = small.stratified_holdout(labels, 10, seed=0)
    assert np.bincount(labels[held], minlength=4).tolist() == [4, 3, 2, 1]
    assert len(set(held.tolist())) == 10 and np.all(np.diff(held) > 0)
    assert np.array_equal(held, small.stratified_holdout(labels, 10, seed=0))
    assert not np.array_equal(held, small.stratified_holdout(labels, 10, seed=1))
    odd = small.stratified_holdout(labels, 7, seed=0)  # 2.8 1.8 1.4 0.7: largest remainders
    assert np.bincount(labels[odd], minlength=4).tolist() == [3, 2, 1, 1]
    with pytest.raises(UserError, match="--val-size"):
        small.carve_validation({"train": (labels, labels), "test": (labels, labels)}, 100, 0)


def test_broken_idx_files_are_clear_errors(tmp_path, capsys):
    make_fashion_idx(tmp_path, n_train=5, n_test=5)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.zeros(4, np.uint8))  # 4 labels for 5 images
    rc = main(["prepare", "fashion-mnist", str(tmp_path / "out"), "--source", str(tmp_path)])
    assert rc == 2 and "do not match" in capsys.readouterr().err
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01garbage"))
    with pytest.raises(UserError, match="not an IDX file"):
        small.read_idx(path)
    rc = main(
        ["prepare", "fashion-mnist", str(tmp_path / "out"), "--source", str(tmp_path / "missing")]
    )
    assert rc == 2 and "dataset-fashion-mnist" in capsys.readouterr().err


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over ``tmp_path / "site"``: the canonical download, offline."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_checks_md5_before_writing_and_prepares(served, tmp_path, monkeypatch):
    site, url = served
    make_fashion_idx(site, n_train=20, n_test=10)  # the four .gz files
    md5s = {
        name: hashlib.md5((site / name).read_bytes()).hexdigest()
        for name in small.FASHION_MNIST_FILES
    }
    monkeypatch.setattr(small, "FASHION_MNIST_FILES", md5s)
    monkeypatch.setattr(small, "FASHION_MNIST_URL", url)
    out = tmp_path / "prepared"
    assert main(["prepare", "fashion-mnist", str(out), "--download", "--val-size", "4"]) == 0
    got = out / "source"
    for name in md5s:
        assert (got / name).read_bytes() == (site / name).read_bytes()
    sizes = [len(PreparedDataset(out, s)) for s in ("train", "val", "test")]
    assert sizes == [16, 4, 10]
    small.download_fashion_mnist(tmp_path / "dl")  # into a folder of one's choice
    # A corrupt file on the server: a clear error naming it, nothing written for it.
    bad = "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "dl" / bad).unlink()
    (site / bad).write_bytes(b"not the file")
    with pytest.raises(UserError, match=f"{bad}: MD5 .* expected"):
        small.download_fashion_mnist(tmp_path / "dl")
    assert not (tmp_path / "dl" / bad).exists()
    with pytest.raises(UserError, match="download failed"):
        small.download_fashion_mnist(tmp_path / "dl2", url=url + "missing/")


def test_checksums_accept_the_right_file_and_name_the_wrong_one(tmp_path):
    f = tmp_path / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(b"some bytes")
    small.check_md5(f, hashlib.md5(b"some bytes").hexdigest())
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz: MD5"):
        small.check_md5(f, small.FASHION_MNIST_FILES["t10k-labels-idx1-ubyte.gz"])


@pytest.mark.skipif(
    not Path(small.FASHION_MNIST_DIR).is_dir(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_the_real_fashion_mnist(tmp_path, capsys):
    assert main(["prepare", "fashion-mnist", str(tmp_path / "out")]) == 0
    train, val, test = (PreparedDataset(tmp_path / "out", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert np.bincount(train.labels.numpy()).tolist() == [5500] * 10  # stratified hold-out
    assert np.bincount(val.labels.numpy()).tolist() == [500] * 10
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    mean = train.stats["mean"]
    assert mean.shape == (1, 28, 28) and 60 < mean.mean().item() < 85  # known: ~72.9


def test_cifar10_batches(tmp_path, capsys):
    batches = make_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=6)
    out = tmp_path / "out"
    assert (
        main(
            [
                "prepare",
                "cifar10",
                "--source",
                str(tmp_path / "cifar-10-batches-py"),
                str(out),
                "--val-size",
                "5",
            ]
        )
        == 0
    )
    ds, held = PreparedDataset(out, "train"), PreparedDataset(out, "val")
    assert ds.image_size == (32, 32) and ds.channels == 3 and (len(ds), len(held)) == (25, 5)
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    x3, y3 = batches["data_batch_3"]  # training images keep their order around the hold-out
    images = np.concatenate([ds.get_batch(np.arange(len(ds))), held.get_batch(np.arange(5))])
    flat = [x.tobytes() for x in images.transpose(0, 2, 3, 1)]
    assert all(x.tobytes() in flat for x in x3)
    val = PreparedDataset(out, "test")
    assert np.array_equal(
        val.get_batch(np.arange(6)).permute(0, 2, 3, 1).numpy(), batches["test_batch"][0]
    )
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    rc = main(
        [
            "prepare",
            "cifar10",
            "--source",
            str(tmp_path / "cifar-10-batches-py"),
            str(tmp_path / "out2"),
        ]
    )
    assert rc == 2 and "missing CIFAR-10 batches ['data_batch_5']" in capsys.readouterr().err
