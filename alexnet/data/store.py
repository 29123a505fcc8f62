"""The prepared on-disk format: one packed record file per split, an index, stats, meta.

A prepared directory ``OUT/`` holds::

    meta.json            classes, class names, image size, channels, storage, split counts,
                         skipped files; written last, so its presence means "complete"
    stats.npz            the training split's mean image (B2) and RGB covariance PCA (B4)
    <split>.bin          the records back to back: JPEG bytes (storage "jpeg") or raw uint8
                         HWC pixels (storage "raw")
    <split>.index.npy    one row per record: byte offset, byte length, label (int64 each),
                         CRC-32 of the record's bytes (uint32; absent in version 1)
    <split>.files.txt    the source path of each record (for reports and figures)

Why this format: a training step needs random access to ~128 records at a time from many
processes. One packed file memory-mapped by every DataLoader worker shares the page cache,
pickles nothing, and opens no file per image (the per-file ``open`` of ImageFolder costs as
much as decoding a 256x256 JPEG on network file systems). JPEG at quality ~90 keeps
ImageNet at 256x256 near 15 KB an image (~20 GB for 1.28M images instead of ~250 GB raw);
small images (Fashion-MNIST, CIFAR) are stored raw because decoding would cost more than
the bytes it saves. The same choice as FFCV's and nanoGPT's one-off preparation.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.data import decode
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_open, atomic_write_json
from alexnet.runtime.owner import owned

FORMAT = "alexnet-prepared"
VERSION = 2  # 2: a CRC-32 per record in the index; version 1 (no checksums) is still read
READABLE_VERSIONS = (1, 2)
INDEX_V1_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("label", "<i8")])
INDEX_DTYPE = np.dtype([*INDEX_V1_DTYPE.descr, ("crc32", "<u4")])


def record_crc(data) -> int:
    """CRC-32 (zlib) of one record's bytes: ~3 GB/s, ~0.3% of decoding a JPEG record."""
    return zlib.crc32(data)


def has_checksums(index: np.ndarray) -> bool:
    return "crc32" in (index.dtype.names or ())


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Encode an (H, W, 3) or (H, W, 1) uint8 array; 4:4:4 chroma so colour edges survive."""
    mode = "L" if image.shape[2] == 1 else "RGB"
    pil = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def decode_jpeg_into(data: bytes | memoryview, out: np.ndarray) -> None:
    """Decode one stored JPEG into ``out`` (H, W, C) uint8, with the fastest installed
    decoder (``alexnet.data.decode``; PIL where no faster one is installed)."""
    decode.decode_into(data, out)


class StatsAccumulator:
    """Exact running sums for the mean image (B2) and the pixel covariance (B4).

    Sums are float64 of integer pixel values, so merging chunks in any grouping gives the same
    result up to float64 rounding of sums far below 2**53.
    """

    def __init__(self, height: int, width: int, channels: int) -> None:
        self.image_sum = np.zeros((height, width, channels), np.float64)
        self.images = 0
        self.pixel_sum = np.zeros(channels, np.float64)
        self.pixel_outer = np.zeros((channels, channels), np.float64)
        self.pixels = 0

    def add_batch(self, images: np.ndarray) -> None:
        """``images``: (N, H, W, C) uint8."""
        x = images.astype(np.float64)
        self.image_sum += x.sum(axis=0)
        self.images += images.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        self.pixel_sum += flat.sum(axis=0)
        self.pixel_outer += flat.T @ flat
        self.pixels += flat.shape[0]

    def merge(self, other: StatsAccumulator) -> None:
        self.image_sum += other.image_sum
        self.images += other.images
        self.pixel_sum += other.pixel_sum
        self.pixel_outer += other.pixel_outer
        self.pixels += other.pixels

    def to_dict(self) -> dict[str, np.ndarray]:
        # Sums of integer pixels: exact in uint32 below 2**32 (16 million images), 4x smaller.
        exact = self.image_sum.max(initial=0) < 2**32
        return {
            "image_sum": self.image_sum.astype(np.uint32) if exact else self.image_sum,
            "images": np.int64(self.images),
            "pixel_sum": self.pixel_sum,
            "pixel_outer": self.pixel_outer,
            "pixels": np.int64(self.pixels),
        }

    @classmethod
    def from_dict(cls, d) -> StatsAccumulator:
        h, w, c = d["image_sum"].shape
        acc = cls(h, w, c)
        acc.image_sum[...] = d["image_sum"]
        acc.images = int(d["images"])
        acc.pixel_sum[...] = d["pixel_sum"]
        acc.pixel_outer[...] = d["pixel_outer"]
        acc.pixels = int(d["pixels"])
        return acc

    def finish(self) -> dict[str, np.ndarray]:
        """Mean image (C, H, W) and the eigen-decomposition of the pixel covariance.

        Eigenvalues are in (0-255 units)^2, sorted largest first; ``eigvecs[:, i]`` is p_i.
        """
        if self.images == 0:
            raise UserError("no training images to compute the mean image and PCA from")
        mean_image = (self.image_sum / self.images).transpose(2, 0, 1)  # PAPER B2
        mu = self.pixel_sum / self.pixels
        cov = self.pixel_outer / self.pixels - np.outer(mu, mu)  # PAPER B4: over all pixels
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
        # Sign convention so the result is reproducible: each eigenvector sums to >= 0.
        signs = np.where(eigvecs.sum(axis=0) < 0, -1.0, 1.0)
        return {
            "mean": mean_image.astype(np.float32),
            "eigvals": eigvals.astype(np.float32),
            "eigvecs": (eigvecs * signs).astype(np.float32),
            "pixel_mean": mu.astype(np.float32),
            "cov": cov.astype(np.float32),
        }


def write_index(path: Path, offsets, lengths, labels, crc32=None) -> None:
    """Without ``crc32`` the index has the version-1 layout (no checksums)."""
    index = np.empty(len(offsets), INDEX_V1_DTYPE if crc32 is None else INDEX_DTYPE)
    index["offset"], index["length"], index["label"] = offsets, lengths, labels
    if crc32 is not None:
        index["crc32"] = crc32
    with atomic_open(path, "wb") as f:
        np.save(f, index)


def write_stats(root: Path, stats: dict[str, np.ndarray]) -> None:
    with atomic_open(root / "stats.npz", "wb") as f:
        np.savez(f, **stats)


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def small_files(root: Path, splits) -> list[str]:
    """The files besides the records that a dataset is read through: each split's index and
    source list, and the statistics. Their CRC-32 is kept in meta.json (a flipped label or
    offset is no record's damage)."""
    names = [f"{s}.{kind}" for s in splits for kind in ("index.npy", "files.txt")]
    return [n for n in [*names, "stats.npz"] if (root / n).is_file()]


def write_meta(root: Path, meta: dict) -> None:
    """Written last: a directory with ``meta.json`` is a complete prepared dataset."""
    crcs = {n: f"{file_crc(root / n):08x}" for n in small_files(root, meta["splits"])}
    meta = {"format": FORMAT, "version": VERSION, **meta, "file_crc32": crcs}
    atomic_write_json(root / "meta.json", meta)


def identity(meta: dict, train_split: str = "train") -> dict:
    """What makes a prepared dataset the one a run was trained on: its classes, image size
    and channels, and its training split's record count and index CRC-32 (the same images
    prepared again, or the directory moved, keep them)."""
    crcs = meta.get("file_crc32") or {}
    return {
        "classes": list(meta["classes"]),
        "image_size": list(meta["image_size"]),
        "channels": int(meta.get("channels", 3)),
        "train_split": train_split,
        "train_images": int(meta["splits"].get(train_split, {}).get("count", -1)),
        "train_index_crc32": crcs.get(f"{train_split}.index.npy"),
    }


def identity_differences(saved: dict, now: dict) -> list[str]:
    """How ``now`` (``identity`` of a dataset) differs from ``saved``, in words; keys that
    ``saved`` lacks (checkpoints from before they were recorded) are not compared."""
    out = []
    if saved.get("classes") is not None and list(saved["classes"]) != list(now["classes"]):
        a, b = list(saved["classes"]), list(now["classes"])
        if len(a) != len(b):
            out.append(f"{len(b)} classes, the run was trained on {len(a)}")
        else:
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            out.append(f"class {i} is {b[i]!r}, the run's class {i} is {a[i]!r}")
    for key, what in (("image_size", "image size"), ("channels", "channels")):
        if saved.get(key) is not None and list(np.atleast_1d(saved[key])) != list(
            np.atleast_1d(now[key])
        ):
            out.append(f"{what} {now[key]}, the run's {saved[key]}")
    if saved.get("train_images") is not None and saved["train_images"] != now["train_images"]:
        out.append(f"{now['train_images']} training images, the run's {saved['train_images']}")
    elif saved.get("train_index_crc32") and saved["train_index_crc32"] != now["train_index_crc32"]:
        out.append("other training images (its index differs from the run's)")
    return out


def pixel_std(stats: dict) -> float:
    """The training pixels' standard deviation in 0-255 units: the root of the mean of the
    RGB covariance's eigenvalues (B4), i.e. of the channels' variances."""
    return float(np.sqrt(np.mean(np.asarray(stats["eigvals"], dtype=np.float64))))


def is_official_test(meta: dict, split: str) -> bool:
    """``split`` holds the official test set: the ``test_split`` of a preparation that holds
    its own validation split out, or ``val`` of an older one that had none."""
    if meta.get("test_split"):
        return split == meta["test_split"]
    return bool(meta.get("val_is_official_test_set")) and split == "val"


def report_split(meta: dict) -> tuple[str, str]:
    """The split results are reported on, and what it is. A dataset prepared with its official
    test set as a split of its own (Fashion-MNIST, CIFAR-10) reports on ``test``; where the
    validation split is all there is (ImageNet: ILSVRC-2012 val, as the paper reports its
    Table 2, PAPER E2), on ``val``."""
    if meta.get("folder_split"):  # a cache of one folder of images (alexnet.data.folders)
        return meta["folder_split"], "the folder's images"
    if meta.get("test_split"):
        return meta["test_split"], meta.get("test_is", "the official test set")
    if meta.get("val_is_official_test_set"):
        return "val", (
            "the official test set, which this older preparation also used for "
            "validation: choices were made on it; prepare the data again"
        )
    return "val", "the validation set"


def search_split(meta: dict) -> str:
    """The split searched for neighbours (PAPER F3: the training images): ``train`` where
    there is one, else the split results are reported on (a folder's images)."""
    return "train" if "train" in meta["splits"] else report_split(meta)[0]


def read_meta(root: str | Path) -> dict:
    root = Path(root)
    path = root / "meta.json"
    if not path.is_file():
        hint = ""
        if (root / ".parts").exists():
            hint = " (an unfinished prepare? run it again to resume)"
        raise UserError(f"{path}: not found; {root} is not a prepared dataset{hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an alexnet prepared dataset (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise UserError(
            f"{path}: format version {meta.get('version')}, this code reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; prepare the dataset again"
        )
    return meta


def read_stats(root: str | Path) -> dict[str, np.ndarray]:
    path = Path(root) / "stats.npz"
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable, truncated or damaged? ({e})") from None


def open_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map a split: (index rows, data bytes). Pages are shared between processes."""
    root = Path(root)
    index_path, data_path = root / f"{split}.index.npy", root / f"{split}.bin"
    for p in (index_path, data_path):
        if not p.is_file():
            raise UserError(f"{p}: not found (split {split!r} missing from {root})")
    try:
        index = np.load(index_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{index_path}: unreadable, truncated or damaged? ({e})") from None
    if index.dtype not in (INDEX_DTYPE, INDEX_V1_DTYPE) or index.ndim != 1:
        raise UserError(f"{index_path}: unexpected index layout {index.dtype} {index.shape}")
    size = data_path.stat().st_size
    end = int(np.max(index["offset"] + index["length"])) if len(index) else 0
    if size < end:
        raise UserError(
            f"{data_path}: {size} bytes, but its index ends at byte {end}: the file is "
            "truncated (an interrupted copy?); copy or prepare it again"
        )
    data = np.zeros(0, np.uint8) if size == 0 else np.memmap(data_path, dtype=np.uint8, mode="r")
    return index, data


def source_name(root: str | Path, split: str, i: int) -> str | None:
    """The source file of record ``i`` (from ``<split>.files.txt``), for error messages."""
    try:
        with open(Path(root) / f"{split}.files.txt", encoding="utf-8") as f:
            for k, line in enumerate(f):
                if k == i:
                    return line.rstrip("\n")
    except (OSError, UnicodeDecodeError):
        pass
    return None


def record_label(root: str | Path, split: str, i: int) -> str:
    """``"val.bin: record 3 (source a/b.JPEG)"``: how errors name a record."""
    name = source_name(root, split, i)
    return f"{Path(root) / (split + '.bin')}: record {i}" + (f" (source {name})" if name else "")


def stats_from_images(images: np.ndarray, block: int = 1024) -> dict[str, np.ndarray]:
    """Mean image and PCA of an in-memory (N, H, W, C) uint8 array, in blocks of images."""
    acc = StatsAccumulator(*images.shape[1:])
    for start in range(0, images.shape[0], block):
        acc.add_batch(np.asarray(images[start : start + block]))
    return acc.finish()


def _checked_split(name: str, images, labels, n_classes: int, shape) -> tuple:
    """A split's images as uint8 (N, H, W, C) and its labels as int64, or one clear error."""
    images = np.asarray(images)
    images = images[..., None] if images.ndim == 3 else images
    labels = np.asarray(labels).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(
            f"split {name!r}: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}"
        )
    if labels.shape != (images.shape[0],):
        raise UserError(f"split {name!r}: {images.shape[0]} images but {labels.shape} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"split {name!r}: labels outside 0..{n_classes - 1}")
    if shape is not None and images.shape[1:] != shape:
        raise UserError(f"split {name!r}: images {images.shape[1:]}, other split {shape}")
    return images, labels


def prepare_arrays(
    root: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    class_names: list[str] | None = None,
    *,
    dataset: str = "arrays",
    extra_meta: dict | None = None,
) -> Path:
    """Write a prepared directory (storage "raw") from in-memory uint8 images.

    ``splits = {"train": (images (N, H, W, C) or (N, H, W), labels (N,)), "val": ...}``. The
    training split must be present: the mean image and PCA (B2, B4) are computed over it.
    """
    root = Path(root)
    if "train" not in splits:
        raise UserError(f"{root}: prepare_arrays needs a 'train' split for the statistics")
    with owned(root, what="prepared dataset", hint="wait for it to end, or use another"):
        _write_arrays(root, splits, classes, class_names, dataset, extra_meta)
    return root


def _write_arrays(root, splits, classes, class_names, dataset, extra_meta) -> None:
    (root / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten last
    shape = None
    split_meta = {}
    for name, (images, labels) in splits.items():
        images, labels = _checked_split(name, images, labels, len(classes), shape)
        shape = images.shape[1:]
        images = np.ascontiguousarray(images)
        with atomic_open(root / f"{name}.bin", "wb") as f:
            f.write(memoryview(images.reshape(-1)))
        n, record = images.shape[0], int(np.prod(shape))
        crc = [record_crc(im) for im in images.reshape(n, record)]
        rows = (np.arange(n) * record, np.full(n, record), labels, crc)
        write_index(root / f"{name}.index.npy", *rows)
        split_meta[name] = {"count": n, "skipped": 0, "skipped_files": []}
        if name == "train":
            write_stats(root, stats_from_images(images))
    h, w, c = shape
    write_meta(
        root,
        {
            "dataset": dataset,
            "storage": "raw",
            "image_size": [h, w],
            "channels": c,
            "classes": list(classes),
            "class_names": list(class_names) if class_names is not None else list(classes),
            "splits": split_meta,
            **(extra_meta or {}),
        },
    )
