"""``alexnet features``: fc7 (or any layer) vectors, nearest neighbours, short binary codes.

    alexnet features extract --checkpoint C --data DIR --split train --out train_fc7.npy
    alexnet features extract --weights bvlc_alexnet --data DIR --split train --out train_fc7.npy
    alexnet features knn --index train_fc7.npy --query val_fc7.npy -k 6 --out nn.npz
    alexnet features codes --index train_fc7.npy --query val_fc7.npy --bits 64 128 256

``extract`` writes an (N, D) ``.npy`` batch by batch through a memory map (so a split larger
than memory is fine), with a sidecar ``.json`` naming the checkpoint, data, split and layer;
an interrupted extraction resumes where it stopped. ``knn`` is the exact Euclidean search of
PAPER F3 (torch, in blocks; FAISS's exact index when installed). ``codes`` follows the
paper's suggestion to compress the vectors to short binary codes for fast retrieval: random
projections (LSH, sign of Gaussian projections) and PCA + iterative quantisation (ITQ, Gong &
Lazebnik 2011), searched by Hamming distance, with recall@k against the exact search.
Deviation: the paper proposes an auto-encoder for the codes; LSH and ITQ need no training
run and are the usual baselines for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from alexnet.inference import (
    add_model_arguments,
    add_views_argument,
    card_of,
    load_from_args,
    single_source,
)
from alexnet.runtime.args import output_file, positive_int
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_open, atomic_write_json
from alexnet.runtime.owner import owned
from alexnet.runtime.progress import Progress

# ----------------------------------------------------------------------------- extraction


def features_of(predictor, ds, indices, layer: str = "fc7", *, views: int = 1) -> np.ndarray:
    """``layer``'s activations of the records ``indices`` of ``ds``, in memory:
    (len(indices), D), ``predictor.batch_size`` records at a time."""
    b = predictor.batch_size
    return np.concatenate(
        [
            predictor.features(ds.get_batch(indices[s : s + b]).contiguous(), layer, views).numpy()
            for s in range(0, len(indices), b)
        ]
    )


def extract(
    predictor,
    ds,
    layer: str,
    out: Path,
    *,
    views: int = 1,
    dtype: str = "float32",
    source: dict | None = None,
) -> np.ndarray:
    """Write ``layer``'s activations for every record of ``ds`` to ``out`` (.npy, (N, D)),
    averaged over the test views; resumes from ``out``'s ``.partial`` files. One process
    writes ``out`` at a time (a second is refused, naming the first)."""
    from alexnet.data import make_loader

    out = Path(out)
    with owned(out, directory=False, what="output", hint="wait for it, or use another --out"):
        first = predictor.features(ds.get_batch(np.array([0])).contiguous(), layer, views)
        meta = {
            **(source or {}),
            "layer": layer,
            "views": views,
            "rows": len(ds),
            "dim": first.shape[1],
            "dtype": dtype,
        }
        partial, state = out.with_suffix(".partial.npy"), out.with_suffix(".partial.json")
        done = 0
        if partial.exists() and state.exists() and json.loads(state.read_text())["meta"] == meta:
            done = json.loads(state.read_text())["rows_done"]
            feats = np.lib.format.open_memmap(partial, mode="r+")
        else:
            shape = (len(ds), first.shape[1])
            feats = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        b = predictor.batch_size
        loader = make_loader(ds, b, shuffle=False, pad=False)
        loader.start_batch = done // b
        row = loader.start_batch * b
        with Progress(len(ds), f"features {layer}", initial=row) as progress:
            for images, _ in loader:
                f = predictor.features(images, layer, views)
                feats[row : row + len(f)] = f.numpy().astype(dtype)
                row += len(f)
                feats.flush()
                atomic_write_json(state, {"meta": meta, "rows_done": row})
                progress.update(len(f))
        del feats
        partial.replace(out)
        atomic_write_json(out.with_suffix(".json"), meta)
        state.unlink()
    return np.load(out, mmap_mode="r")


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


# ---------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = sub.add_parser(
        "extract",
        help="a layer's activations of a dataset or a folder of images -> .npy",
        description="A layer's activations (after its ReLU) of every image of a split, "
        "written batch by batch to an (N, D) .npy with a .json beside it; an interrupted "
        "extraction resumes where it stopped.",
    )
    add_model_arguments(p)
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a prepared dataset, or a folder of images (one folder per class, or train/ val/ "
        "test/ folders of such), prepared once into $ALEXNET_HOME/datasets",
    )
    p.add_argument(
        "--split",
        help="default: train where there is one (PAPER F3 searches the training images), "
        "else the folder's images",
    )
    p.add_argument("--layer", default="fc7", help="conv1..conv5, pool5, fc6, fc7 (F3), fc8")
    add_views_argument(p)
    p.add_argument("--out", type=output_file, required=True, help="the .npy to write")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="stored precision of the features (float16: half the file)",
    )
    p = sub.add_parser(
        "knn",
        help="exact Euclidean nearest neighbours (PAPER F3)",
        description="Each query's k nearest rows of the index in Euclidean distance, exact "
        "(re-ranked in float64), written as an .npz of indices and distances.",
    )
    p.add_argument("--index", type=Path, required=True, help="features searched (.npy)")
    p.add_argument("--query", type=Path, required=True, help="features of the queries (.npy)")
    p.add_argument("-k", type=positive_int, default=6, help="neighbours per query (F3 shows six)")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "faiss"),
        default="auto",
        help="auto: FAISS's exact index for over 100,000 vectors where installed, else torch",
    )
    p.add_argument("--out", type=output_file, required=True, help=".npz with indices and distances")
    p = sub.add_parser(
        "codes",
        help="binary codes: Hamming recall@k against exact search",
        description="The paper's suggestion of short binary codes for retrieval (F3): LSH and "
        "PCA + ITQ codes of the index and queries, searched by Hamming distance, their "
        "recall@k against the exact search, with and without exact re-ranking.",
    )
    p.add_argument("--index", type=Path, required=True, help="features searched (.npy)")
    p.add_argument("--query", type=Path, required=True, help="features of the queries (.npy)")
    p.add_argument(
        "--bits",
        type=positive_int,
        nargs="+",
        default=[32, 64, 128, 256],
        help="code lengths to try, in bits (default 32 64 128 256)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=("lsh", "itq"),
        default=["lsh", "itq"],
        help="lsh: signs of random projections; itq: PCA and iterative quantisation",
    )
    p.add_argument("-k", type=positive_int, default=10, help="neighbours whose recall is measured")
    p.add_argument(
        "--rerank",
        type=int,
        default=100,
        help="re-rank this many Hamming candidates by exact distance",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random projections")
    p.add_argument("--json", type=output_file, help="also write the table here")


def _load(path: Path) -> np.ndarray:
    try:
        x = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read features ({e})") from None
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise UserError(f"{path}: expected one (N, D) array, as `features extract` writes")
    return x


def _extract(args: argparse.Namespace) -> int:
    from alexnet.data import PreparedDataset
    from alexnet.data.folders import is_prepared, prepared
    from alexnet.data.store import read_meta, report_split

    source = single_source(args)
    card = card_of(source)
    root = args.data
    if not is_prepared(root):
        root = prepared(root, size=card.stored_size, classes=list(card.classes))
    split = args.split
    if split is None:
        meta = read_meta(root)
        split = "train" if "train" in meta["splits"] else report_split(meta)[0]
    ds = PreparedDataset(root, split)
    predictor = load_from_args(args, source, layer=args.layer, inputs=len(ds))
    predictor.check_data(ds)
    about = {
        "checkpoint": str(predictor.path),
        "data": str(args.data),
        "split": split,
        **({"weights": args.weights} if args.weights else {}),
    }
    feats = extract(
        predictor, ds, args.layer, args.out, views=args.views, dtype=args.dtype, source=about
    )
    line = predictor.report()
    if line:
        print(f"alexnet features: {line}", file=sys.stderr)
    print(f"wrote {args.out}: {feats.shape[0]} x {feats.shape[1]} {args.layer} features")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.what == "extract":
        return _extract(args)
    index, query = _load(args.index), _load(args.query)
    if index.shape[1] != query.shape[1]:
        raise UserError(
            f"{args.query}: {query.shape[1]}-d features, {args.index} holds {index.shape[1]}-d"
        )
    if args.what == "knn":
        t0 = time.perf_counter()
        dist, idx = knn(query, index, args.k, args.backend)
        with atomic_open(args.out, "wb") as f:
            np.savez(f, indices=idx, distances=dist)
        print(
            f"wrote {args.out}: {len(query)} queries x {args.k} neighbours among "
            f"{len(index)} in {time.perf_counter() - t0:.2f} s"
        )
        return 0
    rows = code_table(index, query, args.bits, args.methods, args.k, args.rerank, args.seed)
    if args.json:
        atomic_write_json(args.json, rows)
    k, r = args.k, args.rerank
    print(
        f"{len(query)} queries, {len(index)} indexed {index.shape[1]}-d vectors; exact "
        f"search {rows[0]['exact_search_s']:.3f} s"
    )
    print(
        f"{'method':>6} {'bits':>5} {'bytes':>5} {f'recall@{k}':>10} "
        f"{f'+rerank{r}':>10} {'search s':>9}"
    )
    for row in rows:
        print(
            f"{row['method']:>6} {row['bits']:>5} {row['bytes_per_vector']:>5} "
            f"{row[f'recall@{k}']:>10.3f} {row[f'recall@{k}_rerank{r}']:>10.3f} "
            f"{row['hamming_search_s']:>9.3f}"
        )
    return 0
