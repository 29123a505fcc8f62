"""The small real datasets: Fashion-MNIST IDX files and CIFAR-10 python batches, stored raw
at their native size; the official test set becomes ``val``."""

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
    assert (
        main(["prepare", "fashion-mnist", str(tmp_path / "out"), "--source", str(tmp_path / "src")])
        == 0
    )
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["class_names"] == small.FASHION_MNIST_CLASSES
    assert meta["val_is_official_test_set"] is True and meta["storage"] == "raw"
    for split, prefix in (("train", "train"), ("val", "t10k")):
        ds = PreparedDataset(tmp_path / "out", split)
        x, y = arrays[prefix]
        assert ds.image_size == (28, 28) and ds.channels == 1 and len(ds) == len(x)
        got = ds.get_batch(np.arange(len(ds)))
        assert np.array_equal(got[:, 0].numpy(), x) and np.array_equal(ds.labels.numpy(), y)
    stats = PreparedDataset(tmp_path / "out", "train").stats
    assert stats["eigvals"].shape == (1,) and stats["eigvecs"].shape == (1, 1)
    var = arrays["train"][0].astype(np.float64).var()
    np.testing.assert_allclose(stats["eigvals"][0].item(), var, rtol=1e-5)


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
    md5s = {name: hashlib.md5((site / name).read_bytes()).hexdigest()
            for name in small.FASHION_MNIST_FILES}  # fmt: skip
    monkeypatch.setattr(small, "FASHION_MNIST_FILES", md5s)
    monkeypatch.setattr(small, "FASHION_MNIST_URL", url)
    out = tmp_path / "prepared"
    assert main(["prepare", "fashion-mnist", str(out), "--download"]) == 0
    got = out / "source"
    for name in md5s:
        assert (got / name).read_bytes() == (site / name).read_bytes()
    assert (len(PreparedDataset(out, "train")), len(PreparedDataset(out, "val"))) == (20, 10)
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
    train, val = (PreparedDataset(tmp_path / "out", s) for s in ("train", "val"))
    assert (len(train), len(val)) == (60000, 10000)
    assert np.bincount(train.labels.numpy()).tolist() == [6000] * 10
    assert np.bincount(val.labels.numpy()).tolist() == [1000] * 10
    mean = train.stats["mean"]
    assert mean.shape == (1, 28, 28) and 60 < mean.mean().item() < 85  # known: ~72.9


def test_cifar10_batches(tmp_path, capsys):
    batches = make_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=6)
    out = tmp_path / "out"
    assert (
        main(["prepare", "cifar10", "--source", str(tmp_path / "cifar-10-batches-py"), str(out)])
        == 0
    )
    ds = PreparedDataset(out, "train")
    assert ds.image_size == (32, 32) and ds.channels == 3 and len(ds) == 30
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    x3, y3 = batches["data_batch_3"]
    got = ds.get_batch(np.arange(12, 18)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, x3) and ds.labels[12:18].tolist() == y3.tolist()
    val = PreparedDataset(out, "val")
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
