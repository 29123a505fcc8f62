"""Retrieval in feature space (PAPER F3): the exact nearest neighbours of the paper's Figure 4
(torch in blocks, re-ranked in float64; FAISS's exact index for large sets) and the short
binary codes the paper suggests for fast retrieval (LSH; PCA + iterative quantisation, Gong &
Lazebnik 2011), with their recall against the exact search. Deviation: the paper proposes an
auto-encoder for the codes; LSH and ITQ need no training run and are the usual baselines."""

from __future__ import annotations

import time

import numpy as np
import torch

from alexnet.runtime.errors import UserError

# ------------------------------------------------------------------------ exact neighbours


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)


def exact_knn(query, index, k: int, *, block: int = 8192):
    """The k nearest rows of ``index`` to each row of ``query`` in Euclidean distance.

    Returns (distances float32 (Q, k), indices int64 (Q, k)), nearest first. Blocks of the
    index (which may be a memory map) are scanned with |q|^2 - 2 q.x + |x|^2; the k + 8
    candidates per query are then re-ranked with distances computed directly in float64, so
    cancellation in that expansion cannot reorder the answer."""
    q64 = torch.from_numpy(np.array(query, dtype=np.float64))
    # Distances do not change under a shift; centring on the queries' mean keeps the
    # expansion's terms small, so float32 resolves features that differ only in late digits.
    shift = q64.mean(0)
    q = (q64 - shift).float()
    n = len(index)
    if not 0 < k <= n:
        raise UserError(f"k={k}: the index holds {n} vectors")
    m = min(n, k + 8)
    best_d = torch.full((len(q), m), float("inf"))
    best_i = torch.full((len(q), m), -1, dtype=torch.int64)
    qn = _sq_norms(q)[:, None]
    for start in range(0, n, block):
        x = torch.from_numpy(np.array(index[start : start + block], dtype=np.float64)) - shift
        x = x.float()
        d = qn - 2.0 * q @ x.T + _sq_norms(x)[None]
        ids = torch.arange(start, start + len(x)).expand(len(q), -1)
        cand_d, cand_i = torch.cat([best_d, d], 1), torch.cat([best_i, ids], 1)
        best_d, pos = cand_d.topk(m, dim=1, largest=False)
        best_i = cand_i.gather(1, pos)
    exact = _rerank(q64, index, best_i)
    # stable sort on (distance, index): ties resolve to the lower index, as in numpy
    order = torch.argsort(best_i, dim=1)
    exact, best_i = exact.gather(1, order), best_i.gather(1, order)
    order = torch.argsort(exact, dim=1, stable=True)[:, :k]
    return exact.gather(1, order).float().numpy(), best_i.gather(1, order).numpy()


def _rerank(q: torch.Tensor, index, ids: torch.Tensor) -> torch.Tensor:
    flat = ids.reshape(-1).numpy()
    uniq, inverse = np.unique(flat, return_inverse=True)
    rows = torch.from_numpy(np.array(index[uniq], dtype=np.float64))[inverse]
    diff = rows.view(*ids.shape, -1) - q[:, None, :]
    return diff.pow(2).sum(-1).sqrt()


def faiss_knn(query, index, k: int):
    """FAISS's exact L2 index (``IndexFlatL2``): same answer as ``exact_knn``, faster on big
    sets. Raises ImportError when FAISS is not installed."""
    import faiss

    db = faiss.IndexFlatL2(index.shape[1])
    for start in range(0, len(index), 65536):
        db.add(np.ascontiguousarray(index[start : start + 65536], dtype=np.float32))
    d, i = db.search(np.ascontiguousarray(query, dtype=np.float32), k)
    return np.sqrt(np.maximum(d, 0)), i.astype(np.int64)


def knn(query, index, k: int, backend: str = "auto"):
    """``exact_knn`` or ``faiss_knn``; ``auto`` takes FAISS when installed and the index is
    large (over 100k vectors), where its BLAS blocking pays."""
    if backend == "auto":
        try:
            import faiss  # noqa: F401

            backend = "faiss" if len(index) > 100_000 else "torch"
        except ImportError:
            backend = "torch"
    if backend == "faiss":
        try:
            return faiss_knn(query, index, k)
        except ImportError:
            raise UserError(
                "--backend faiss: FAISS is not installed (pip install faiss-cpu)"
            ) from None
    return exact_knn(query, index, k)


# -------------------------------------------------------------------------- binary codes


class BinaryCoder:
    """x -> bits: sign(((x - mean) @ W) @ R); packed 8 bits a byte.

    ``lsh``: W Gaussian (D, bits), R = I (random hyperplanes, Charikar 2002). ``itq``: W the
    top-``bits`` PCA directions, R the rotation that iterative quantisation finds by
    alternating B = sign(V R) and the orthogonal Procrustes solution for R (Gong & Lazebnik)."""

    def __init__(
        self,
        train: np.ndarray,
        bits: int,
        method: str = "itq",
        *,
        seed: int = 0,
        iterations: int = 50,
    ) -> None:
        x = np.asarray(train, dtype=np.float64)
        rng = np.random.default_rng(seed)
        self.bits, self.method = bits, method
        self.mean = x.mean(0)
        xc = x - self.mean
        if method == "lsh":
            self.w = rng.standard_normal((x.shape[1], bits))
            self.r = np.eye(bits)
        elif method == "itq":
            if bits > min(x.shape):
                raise UserError(
                    f"itq: {bits} bits need at least {bits} vectors and dimensions, "
                    f"the training set is {x.shape[0]} x {x.shape[1]}"
                )
            _, _, vt = np.linalg.svd(xc, full_matrices=False)
            self.w = vt[:bits].T
            v = xc @ self.w
            r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
            for _ in range(iterations):
                b = np.where(v @ r >= 0, 1.0, -1.0)
                u, _, wt = np.linalg.svd(b.T @ v)  # min ||B - V R||: R = (U W^T)^T
                r = (u @ wt).T
            self.r = r
        else:
            raise UserError(f"unknown code method {method!r}: choose lsh or itq")

    def bits_of(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) @ self.w @ self.r) >= 0

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(self.bits_of(x), axis=1)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Hamming distances between packed codes."""
    return _POPCOUNT[a[:, None, :] ^ b[None, :, :]].sum(-1, dtype=np.int32)


def hamming_knn(query_codes, index_codes, k: int, block: int = 4096) -> np.ndarray:
    """Indices of the k nearest codes, ties broken by the lower index (stable)."""
    out = np.empty((len(query_codes), k), dtype=np.int64)
    for s in range(0, len(query_codes), 256):
        d = np.concatenate(
            [
                hamming(query_codes[s : s + 256], index_codes[i : i + block])
                for i in range(0, len(index_codes), block)
            ],
            axis=1,
        )
        out[s : s + 256] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def _rerank_rows(index, query, shortlist, k: int) -> np.ndarray:
    d = np.linalg.norm(index[shortlist] - query[:, None, :], axis=2)
    return np.take_along_axis(shortlist, np.argsort(d, axis=1, kind="stable"), 1)[:, :k]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i & truth_i| / |truth_i|."""
    hits = [len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def code_table(index, query, bits_list, methods, k: int, rerank: int, seed: int = 0) -> list:
    """Recall@k of Hamming search (and of exact re-ranking of its top ``rerank``) against
    the exact Euclidean search, per method and code length."""
    index, query = np.asarray(index, np.float32), np.asarray(query, np.float32)
    t0 = time.perf_counter()
    _, truth = exact_knn(query, index, k)
    exact_s = time.perf_counter() - t0
    rows = []
    for method in methods:
        for bits in bits_list:
            coder = BinaryCoder(index, bits, method, seed=seed)
            db, qc = coder.encode(index), coder.encode(query)
            t0 = time.perf_counter()
            found = hamming_knn(qc, db, max(k, min(rerank, len(index))))
            search_s = time.perf_counter() - t0
            reranked = np.concatenate(
                [
                    _rerank_rows(index, query[s : s + 64], found[s : s + 64], k)
                    for s in range(0, len(query), 64)
                ]
            )
            rows.append(
                {
                    "method": method,
                    "bits": bits,
                    "bytes_per_vector": db.shape[1],
                    f"recall@{k}": recall_at_k(found[:, :k], truth),
                    f"recall@{k}_rerank{rerank}": recall_at_k(reranked, truth),
                    "hamming_search_s": search_s,
                    "exact_search_s": exact_s,
                }
            )
    return rows
