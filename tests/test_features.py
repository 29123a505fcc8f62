"""``alexnet features``: extraction to a memory-mapped .npy (resumable), exact kNN against a
float64 numpy brute force, FAISS against the same, binary codes and their recall."""

from __future__ import annotations

import json

import evalkit
import numpy as np
import pytest
import torch

from alexnet.cli import main
from alexnet.data import PreparedDataset
from alexnet.features import extract
from alexnet.inference import Predictor
from alexnet.retrieval import (
    BinaryCoder,
    code_table,
    exact_knn,
    hamming,
    hamming_knn,
    knn,
    recall_at_k,
)


def brute_force(query, index, k):
    d = np.sqrt(
        ((query[:, None, :].astype(np.float64) - index[None].astype(np.float64)) ** 2).sum(-1)
    )
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def clustered(rng, n, dim=64, centres=20, spread=0.6):
    c = rng.normal(0, 1, (centres, dim))
    return (c[rng.integers(0, centres, n)] + rng.normal(0, spread, (n, dim))).astype(np.float32)


def test_exact_knn_matches_float64_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    index, query = clustered(rng, 1000), clustered(rng, 37)
    index += 50.0  # far from the origin: the |q|^2 - 2 q.x + |x|^2 expansion loses digits
    query += 50.0
    np.save(tmp_path / "index.npy", index)
    mm = np.load(tmp_path / "index.npy", mmap_mode="r")
    dist, idx = exact_knn(query, mm, 6, block=128)  # blocks: exercises the running merge
    want_d, want_i = brute_force(query, index, 6)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-5)


def test_faiss_gives_the_exact_answer():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    index, query = clustered(rng, 500), clustered(rng, 20)
    dist, idx = knn(query, index, 5, backend="faiss")
    want_d, want_i = brute_force(query, index, 5)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-3)


def test_hamming_and_code_search_against_python_reference():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (7, 8), dtype=np.uint8)
    b = rng.integers(0, 256, (11, 8), dtype=np.uint8)
    want = [[sum(bin(x ^ y).count("1") for x, y in zip(p, q, strict=True)) for q in b] for p in a]
    np.testing.assert_array_equal(hamming(a, b), want)
    found = hamming_knn(a, b, 4, block=3)
    for row, d in zip(found, np.array(want), strict=True):
        np.testing.assert_array_equal(row, sorted(range(11), key=lambda j: (d[j], j))[:4])


def test_itq_rotation_is_orthogonal_and_codes_balanced():
    x = clustered(np.random.default_rng(3), 2000)
    coder = BinaryCoder(x, 32, "itq")
    np.testing.assert_allclose(coder.r @ coder.r.T, np.eye(32), atol=1e-8)
    bits = coder.bits_of(x)
    assert bits.shape == (2000, 32)
    assert 0.2 < bits.mean() < 0.8  # centred PCA projections split the data, not all one side
    lsh = BinaryCoder(x, 32, "lsh")
    # ITQ minimises the quantisation loss ||B - V R||: lower than with the random start
    v = (x - coder.mean) @ coder.w
    loss = lambda r: np.square(np.where(v @ r >= 0, 1.0, -1.0) - v @ r).sum()  # noqa: E731
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
    assert loss(coder.r) < loss(q)
    assert lsh.encode(x).shape == (2000, 4)


def test_recall_grows_with_bits_and_reranking_helps():
    both = clustered(np.random.default_rng(4), 2060)  # queries from the same clusters
    index, query = both[:2000], both[2000:]
    rows = code_table(index, query, [16, 64], ["lsh", "itq"], k=10, rerank=100)
    rows += code_table(index, query, [256], ["lsh"], k=10, rerank=100)  # ITQ: bits <= dims
    r = {(row["method"], row["bits"]): row for row in rows}
    for method in ("lsh", "itq"):
        assert r[(method, 16)]["recall@10"] < r[(method, 64)]["recall@10"]
    assert r[("lsh", 64)]["recall@10"] < r[("lsh", 256)]["recall@10"]
    for row in rows:
        assert row["recall@10_rerank100"] >= row["recall@10"]
    assert r[("lsh", 256)]["recall@10_rerank100"] > 0.9
    # short codes: PCA + ITQ keeps the cluster structure far better than random hyperplanes
    assert r[("itq", 16)]["recall@10_rerank100"] > r[("lsh", 16)]["recall@10_rerank100"] + 0.1
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)


def test_extract_matches_forward_features_and_resumes(tmp_path, monkeypatch, capsys):
    data, run = evalkit.tiny_run()
    predictor = Predictor.load(run, device="cpu", backend="torch", precision="fp32", batch_size=16)
    model, aug = predictor.network, predictor.test_views
    ds = PreparedDataset(data, "train")
    out = tmp_path / "train_fc7.npy"
    calls = {"n": 0}
    real = model.forward_features

    def failing(x, layer):
        calls["n"] += 1
        if calls["n"] == 4:  # the 1 sizing call, then batches 1 and 2 succeed
            raise KeyboardInterrupt
        return real(x, layer)

    monkeypatch.setattr(model, "forward_features", failing)
    with pytest.raises(KeyboardInterrupt):
        extract(predictor, ds, "fc7", out)
    assert not out.exists() and out.with_suffix(".partial.json").exists()
    assert json.loads(out.with_suffix(".partial.json").read_text())["rows_done"] == 32
    calls["n"] = 10
    feats = extract(predictor, ds, "fc7", out)
    assert calls["n"] == 10 + 1 + 2  # sizing + the two batches left, not all four
    assert "resuming the extraction stopped at 32 of 64 rows" in capsys.readouterr().err
    with torch.no_grad():
        want = real(aug.views(ds.get_batch(np.arange(len(ds))).contiguous(), 1), "fc7")
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)
    assert json.loads(out.with_suffix(".json").read_text())["layer"] == "fc7"
    assert not out.with_suffix(".partial.npy").exists()
    # a damaged state beside a partial: started again, not a traceback
    other = tmp_path / "again.npy"
    np.save(other.with_suffix(".partial.npy"), np.zeros((2, 2), np.float32))
    other.with_suffix(".partial.json").write_text('{"meta": ')
    np.testing.assert_array_equal(extract(predictor, ds, "fc7", other), feats)
    assert "resuming" not in capsys.readouterr().err


def test_cli_extract_knn_codes(tmp_path, capsys):
    data, run = evalkit.tiny_run()
    for split in ("train", "val"):
        assert (
            main(
                [
                    "features",
                    "extract",
                    "--checkpoint",
                    str(run),
                    "--data",
                    str(data),
                    "--split",
                    split,
                    "--layer",
                    "pool5",
                    "--out",
                    str(tmp_path / f"{split}.npy"),
                ]
            )
            == 0
        )
    train, val = np.load(tmp_path / "train.npy"), np.load(tmp_path / "val.npy")
    assert train.shape[0] == 64 and val.shape[0] == 21 and train.shape[1] == val.shape[1]
    assert (
        main(
            [
                "features",
                "knn",
                "--index",
                str(tmp_path / "train.npy"),
                "--query",
                str(tmp_path / "val.npy"),
                "-k",
                "6",
                "--backend",
                "torch",
                "--out",
                str(tmp_path / "nn.npz"),
            ]
        )
        == 0
    )
    nn = np.load(tmp_path / "nn.npz")
    np.testing.assert_array_equal(nn["indices"], brute_force(val, train, 6)[1])
    capsys.readouterr()
    assert (
        main(
            [
                "features",
                "codes",
                "--index",
                str(tmp_path / "train.npy"),
                "--query",
                str(tmp_path / "val.npy"),
                "--bits",
                "8",
                "16",
                "-k",
                "5",
                "--rerank",
                "20",
                "--json",
                str(tmp_path / "codes.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "recall@5" in out and len(json.loads((tmp_path / "codes.json").read_text())) == 4
    assert (
        main(
            [
                "features",
                "knn",
                "--index",
                str(tmp_path / "nn.npz"),
                "--query",
                str(tmp_path / "val.npy"),
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
