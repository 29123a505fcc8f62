"""The small real datasets, kept at their native size: Fashion-MNIST (IDX files) and CIFAR-10
(python batches). Neither has a validation set: ``prepare_small`` holds a seeded, stratified
validation split out of the training images (``val``, what every choice during training is
made on: rate cuts, the best checkpoint) and keeps the official test set as ``test``, the
split results are reported on."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_open, file_digest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: dataset-fashion-mnist
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# MD5 of the .gz files as published with the dataset (zalandoresearch/fashion-mnist README).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
# Training images held out as the validation split: 1/12 of Fashion-MNIST's, 1/10 of CIFAR's.
VAL_SIZE = 5000


def check_md5(path: Path, expected: str) -> None:
    got = file_digest(path, "md5")
    if got != expected:
        raise UserError(f"{path}: MD5 {got}, expected {expected} (corrupt or wrong file)")


def download_fashion_mnist(folder: str | Path, url: str | None = None) -> Path:
    """Fetch the four files from the canonical address (or ``url``) into ``folder``. A file
    is written only once its MD5 is right, so a bad download never leaves a file behind;
    files already there with the right MD5 are kept."""
    folder, url = Path(folder), url or FASHION_MNIST_URL
    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in FASHION_MNIST_FILES.items():
        target = folder / name
        if target.is_file() and file_digest(target, "md5") == md5:
            continue
        print(f"downloading {url + name}", flush=True)
        try:
            with urllib.request.urlopen(url + name, timeout=60) as r:
                data = r.read()
        except OSError as e:
            raise UserError(f"{url + name}: download failed ({e})") from None
        got = hashlib.md5(data).hexdigest()
        if got != md5:
            raise UserError(f"{url + name}: MD5 {got}, expected {md5} (corrupt download)")
        with atomic_open(target, "wb") as f:
            f.write(data)
    return folder


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally .gz) of unsigned bytes: magic 0x0000 08 <ndim>, big-endian dims."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {dims.tolist()}, body has {body.size} bytes")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no {stem}(.gz) (Fashion-MNIST IDX files expected)")


def load_fashion_mnist(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (60000x28x28x1, labels), "test": (the 10000 official test images, ...)}``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: not found (install Debian's dataset-fashion-mnist, pass --source, "
            "or use --download)"
        )
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.max(initial=0) > 9:
            raise UserError(f"{folder}: {prefix} labels outside 0..9")
        out[split] = (images[..., None], labels.astype(np.int64))
    return out


def _unpickle(data: bytes, where: str) -> dict:
    try:
        return pickle.loads(data, encoding="bytes")
    except Exception as e:  # a pickle can fail in many ways; all mean "not a batch"
        raise UserError(f"{where}: not a CIFAR-10 python batch ({e})") from None


def _cifar_files(src: Path) -> dict[str, bytes]:
    wanted = [*CIFAR10_BATCHES, "test_batch", "batches.meta"]
    if src.is_dir():
        return {n: (src / n).read_bytes() for n in wanted if (src / n).is_file()}
    if src.is_file():
        try:
            with tarfile.open(src) as tar:
                return {
                    Path(m.name).name: tar.extractfile(m).read()
                    for m in tar
                    if m.isfile() and Path(m.name).name in wanted
                }
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{src}: not a readable cifar-10-python.tar.gz ({e})") from None
    raise UserError(f"{src}: not found (expected the cifar-10-batches-py folder or its tar.gz)")


def load_cifar10(src: str | Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """``cifar-10-batches-py/`` (or ``cifar-10-python.tar.gz``) -> splits (N, 32, 32, 3), names."""
    src = Path(src)
    files = _cifar_files(src)
    missing = [n for n in [*CIFAR10_BATCHES, "test_batch"] if n not in files]
    if missing:
        raise UserError(f"{src}: missing CIFAR-10 batches {missing}")
    names = [f"class {i}" for i in range(10)]
    if "batches.meta" in files:
        meta = _unpickle(files["batches.meta"], f"{src}/batches.meta")
        names = [n.decode() for n in meta[b"label_names"]]

    def batches(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for k in keys:
            d = _unpickle(files[k], f"{src}/{k}")
            if b"data" not in d or b"labels" not in d:
                raise UserError(f"{src}/{k}: no data/labels entries")
            x = np.asarray(d[b"data"], np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != len(d[b"labels"]):
                raise UserError(f"{src}/{k}: data {x.shape}, expected (N, 3072) with N labels")
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[b"labels"], np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    return {"train": batches(CIFAR10_BATCHES), "test": batches(["test_batch"])}, names


def stratified_holdout(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of ``size`` images drawn without replacement, each class in proportion to its
    share of ``labels`` (largest remainders make the counts add up), in increasing order."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(np.int64)
    take[np.argsort(-(exact - take), kind="stable")[: size - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def carve_validation(splits: dict, size: int, seed: int) -> tuple[dict, dict]:
    """``{"train", "test"}`` -> ``{"train", "val", "test"}`` with ``val`` held out of the
    training images (``stratified_holdout``); also the record of it for meta.json."""
    images, labels = splits["train"]
    if not 0 < size < len(labels):
        raise UserError(f"--val-size {size}: must be between 1 and {len(labels) - 1}")
    held = stratified_holdout(labels, size, seed)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    out = {
        "train": (images[keep], labels[keep]),
        "val": (images[held], labels[held]),
        "test": splits["test"],
    }
    note = {"size": int(size), "seed": int(seed), "stratified": True, "from": "train"}
    return out, note


def prepare_small(
    out: Path,
    dataset: str,
    splits: dict,
    classes: list[str],
    source: str,
    *,
    val_size: int = VAL_SIZE,
    val_seed: int = 0,
) -> Path:
    """Write ``splits`` (``{"train", "test"}`` as loaded) as a prepared directory with a
    validation split carved from the training images (PAPER D4 steers by validation error;
    the test set must steer nothing)."""
    from alexnet.data import store

    carved, note = carve_validation(splits, val_size, val_seed)
    meta = {"source": source, "validation": note, "test_split": "test"}
    store.prepare_arrays(out, carved, classes, classes, dataset=dataset, extra_meta=meta)
    counts = ", ".join(f"{k} {len(v[1])}" for k, v in carved.items())
    print(
        f"{out}: {dataset} prepared ({counts}; val: {val_size} training images held out, "
        f"stratified, seed {val_seed}; test: the official test set)"
    )
    return out
