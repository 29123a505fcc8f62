"""Generators of fake sources laid out as users have them (PAPER G1, G2), for tests.

Every image is a real file (JPEG unless stated) with smooth content plus noise, of varied
sizes and aspect ratios. Reusable from other tests::

    src = make_imagenet_tars(tmp_path, n_classes=4, per_class=5)
    prepare = ["imagenet", "--train", src.train_tar, "--val", src.val_tar,
               "--devkit", src.devkit, out]
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(64, 48), (48, 64), (100, 40), (40, 90), (75, 75), (130, 97), (57, 120), (300, 200)]


def random_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour gradients plus noise: compresses like a photo, has structure to check."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(30, 220, 3)
    slope = rng.uniform(-1.5, 1.5, (3, 2)) * 100 / max(w, h)
    img = base + x[..., None] * slope[:, 0] + y[..., None] * slope[:, 1]
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(rng, w: int, h: int, *, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """An encoded image; ``mode`` "CMYK" / "L" gives the odd JPEGs of PAPER G2, ``fmt`` "PNG"
    gives a PNG (to be saved under a .JPEG name)."""
    img = Image.fromarray(random_image(rng, w, h)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ImageNetSource:
    train_tar: Path
    val_tar: Path
    devkit: Path
    wnids: list[str]  # sorted: label i is wnids[i]
    ids: dict[str, int]  # WNID -> ILSVRC2012_ID (deliberately not sorted-WNID order)
    words: dict[str, str]
    val_wnids: list[str]  # true class of validation image 1, 2, ...
    train_files: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    odd: list[str] = field(default_factory=list)  # train member names of the G2 files
    bad: list[str] = field(default_factory=list)  # train member names that cannot be read


def write_meta_mat(path: Path, ids: dict[str, int], words: dict[str, str], extra: int = 3) -> None:
    """A devkit-like meta.mat: a ``synsets`` struct array, leaves plus a few parent synsets."""
    import scipy.io

    rows = [(i, w, words[w], 0) for w, i in ids.items()]
    top = max(ids.values())
    rows += [(top + k + 1, f"n9{k:07d}", f"parent {k}", 2) for k in range(extra)]
    dt = [
        ("ILSVRC2012_ID", "O"),
        ("WNID", "O"),
        ("words", "O"),
        ("gloss", "O"),
        ("num_children", "O"),
        ("children", "O"),
        ("wordnet_height", "O"),
        ("num_train_images", "O"),
    ]
    arr = np.zeros((len(rows), 1), dtype=dt)
    for k, (i, w, word, nc) in enumerate(rows):
        arr[k, 0] = (
            np.array([[i]], np.uint16),
            w,
            word,
            "a gloss",
            np.array([[nc]], np.uint8),
            np.zeros((1, nc)),
            np.array([[0]]),
            np.array([[10]]),
        )
    scipy.io.savemat(path, {"synsets": arr})


def make_imagenet_tars(
    tmp: str | Path,
    n_classes: int = 4,
    per_class: int = 5,
    *,
    val_per_class: int = 2,
    odd: bool = True,
    bad: bool = False,
    seed: int = 0,
) -> ImageNetSource:
    """ILSVRC-2012-layout tars: a train tar of per-WNID tars, a flat val tar, a devkit tar.gz
    (data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt). With ``odd`` the first
    class holds a CMYK JPEG, a greyscale JPEG and a PNG named .JPEG; with ``bad`` the last
    class holds a truncated, an empty and a non-image .JPEG."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = sorted({f"n{rng.integers(1e7, 1e8):08d}" for _ in range(n_classes * 3)})[:n_classes]
    ids = dict(zip(wnids, (rng.permutation(n_classes) + 1).tolist(), strict=True))
    if n_classes > 1 and all(ids[w] == k + 1 for k, w in enumerate(wnids)):
        ids[wnids[0]], ids[wnids[1]] = ids[wnids[1]], ids[wnids[0]]  # never sorted order
    words = {w: f"thing {k}, object {w[-3:]}" for k, w in enumerate(wnids)}
    src = ImageNetSource(
        tmp / "ILSVRC2012_img_train.tar",
        tmp / "ILSVRC2012_img_val.tar",
        tmp / "ILSVRC2012_devkit_t12.tar.gz",
        wnids,
        ids,
        words,
        [],
    )
    with tarfile.open(src.train_tar, "w") as outer:
        for c, w in enumerate(wnids):
            files = []
            for k in range(per_class):
                sw, sh = SIZES[(c * per_class + k) % len(SIZES)]
                files.append((f"{w}_{k + 1}.JPEG", jpeg_bytes(rng, sw, sh)))
            if odd and c == 0:
                for tag, kw in (
                    ("cmyk", {"mode": "CMYK"}),
                    ("grey", {"mode": "L"}),
                    ("png", {"fmt": "PNG"}),
                ):
                    files.append((f"{w}_{tag}.JPEG", jpeg_bytes(rng, 90, 70, **kw)))
                    src.odd.append(files[-1][0])
            if bad and c == n_classes - 1:
                good = jpeg_bytes(rng, 80, 60)
                for tag, data in (
                    ("trunc", good[: len(good) // 2]),
                    ("empty", b""),
                    ("text", b"not an image at all"),
                ):
                    files.append((f"{w}_{tag}.JPEG", data))
                    src.bad.append(files[-1][0])
            src.train_files[w] = files
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for name, data in files:
                    _add(t, name, data)
            _add(outer, f"{w}.tar", inner.getvalue())
    order = rng.permutation(np.repeat(np.arange(n_classes), val_per_class))
    src.val_wnids = [wnids[c] for c in order]
    with tarfile.open(src.val_tar, "w") as t:
        for k, _ in enumerate(order):
            sw, sh = SIZES[(k * 3) % len(SIZES)]
            _add(t, f"ILSVRC2012_val_{k + 1:08d}.JPEG", jpeg_bytes(rng, sw, sh))
    meta = tmp / "meta.mat"
    write_meta_mat(meta, ids, words)
    gt = "".join(f"{ids[w]}\n" for w in src.val_wnids).encode()
    with tarfile.open(src.devkit, "w:gz") as t:
        t.add(meta, "ILSVRC2012_devkit_t12/data/meta.mat")
        _add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)
    meta.unlink()
    return src


def make_folder_tree(
    root: str | Path,
    classes: list[str] | int = 3,
    per_class: int = 4,
    *,
    sizes=SIZES,
    seed: int = 0,
    ext: str = ".jpg",
) -> dict[str, list[Path]]:
    """``root/<class>/<k>.jpg`` with varied sizes; returns the files of each class."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = [f"class_{k}" for k in range(classes)] if isinstance(classes, int) else classes
    out = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for k in range(per_class):
            w, h = sizes[(c * per_class + k) % len(sizes)]
            p = root / name / f"{k:04d}{ext}"
            fmt = "PNG" if ext.lower() == ".png" else "JPEG"
            p.write_bytes(jpeg_bytes(rng, w, h, fmt=fmt))
            out[name].append(p)
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped when ``path`` ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_fashion_idx(folder: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
        arrays[prefix] = (x, y)
    return arrays


def make_cifar_batches(folder: str | Path, per_batch: int = 10, seed: int = 0):
    """A cifar-10-batches-py folder with small batches; returns {batch name: (x NHWC, y)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        d = {b"batch_label": name.encode(), b"labels": y, b"data": x.reshape(per_batch, -1)}
        (folder / name).write_bytes(pickle.dumps(d))
        out[name] = (x.transpose(0, 2, 3, 1), np.array(y))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return out


def prepare_cli(capsys, *argv) -> tuple[int, str, str]:
    """``alexnet prepare ARGV`` in-process: (exit status, stdout, stderr)."""
    from alexnet.cli import main

    rc = main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The CLI's single error line (progress lines also go to stderr); no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("alexnet prepare: error:")]
    assert len(lines) == 1, err
    return lines[0]
