"""``alexnet features``: fc7 (or any layer) vectors, nearest neighbours, short binary codes.

    alexnet features extract --checkpoint C --data DIR --split train --out train_fc7.npy
    alexnet features extract --weights bvlc_alexnet --data photos/ --out photos_fc7.npy
    alexnet features knn --index train_fc7.npy --query val_fc7.npy -k 6 --out nn.npz
    alexnet features codes --index train_fc7.npy --query val_fc7.npy --bits 64 128 256

``extract`` (of a prepared dataset or a folder of images, ``alexnet.data.folders``) writes an
(N, D) ``.npy`` batch by batch through a memory map (so a split larger
than memory is fine), with a sidecar ``.json`` naming the checkpoint, data, split and layer;
an interrupted extraction resumes where it stopped. ``knn`` and ``codes`` are the exact
Euclidean search of PAPER F3 and the short binary codes the paper suggests, searched by
Hamming distance with recall@k against the exact search (alexnet/retrieval.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from alexnet.data.folders import add_data_argument
from alexnet.inference import (
    add_model_arguments,
    add_views_argument,
    card_of,
    load_from_args,
    single_source,
)
from alexnet.retrieval import code_table, knn
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
        done = _rows_done(partial, state, meta)
        if done:
            print(
                f"{out}: resuming the extraction stopped at {done} of {len(ds)} rows",
                file=sys.stderr,
            )
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


def _rows_done(partial: Path, state: Path, meta: dict) -> int:
    """The rows an earlier extraction of the same ``meta`` wrote into ``partial``; 0 where
    there is none, or its state cannot be read (the extraction then starts again)."""
    try:
        saved = json.loads(state.read_text())
        ok = partial.is_file() and saved["meta"] == meta
        return int(saved["rows_done"]) if ok else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ---------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_extract(sub)
    _add_knn(sub)
    _add_codes(sub)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="a layer's activations of a dataset or a folder of images -> .npy",
        description="A layer's activations (after its ReLU) of every image of a split, "
        "written batch by batch to an (N, D) .npy with a .json beside it; an interrupted "
        "extraction resumes where it stopped.",
    )
    add_model_arguments(p)
    add_data_argument(p)
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


def _add_knn(sub: argparse._SubParsersAction) -> None:
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


def _add_codes(sub: argparse._SubParsersAction) -> None:
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
    from alexnet.data.folders import open_images
    from alexnet.data.store import search_split

    source = single_source(args)
    ds = open_images(args.data, args.split, card_of(source), default=search_split)
    split = ds.split
    predictor = load_from_args(args, source, layer=args.layer, inputs=len(ds))
    predictor.check_data(ds, labels=False)  # features need images, not the network's labels
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
            f"{row['hamming_search_s']:>9.3f}",
            flush=True,
        )
    if args.json:  # after the table: a file that cannot be written loses nothing on screen
        atomic_write_json(args.json, rows)
    return 0
