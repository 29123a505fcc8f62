"""Finding the images of a source, as users have it (PAPER G1): ILSVRC-2012 tars or folders
and its devkit, any folder-per-class tree. Each image becomes an ``Item`` that names where
its bytes are (a file, or a byte range inside an uncompressed tar), so worker processes read
images straight out of the 140 GB train tar without extracting it.

The small datasets (Fashion-MNIST IDX, CIFAR-10 python batches) are in ``small.py``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexnet.runtime.errors import UserError

# As torchvision's ImageFolder: what counts as an image file (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Item:
    """One source image: ``size`` bytes at ``offset`` of ``path`` (offset -1: the whole file)."""

    path: str
    offset: int
    size: int
    name: str  # shown in reports: a file path, or "archive.tar:member"
    label: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


class _Window(io.RawIOBase):
    """A read-only seekable view of bytes [start, start+size) of an open file (a tar in a tar)."""

    def __init__(self, f, start: int, size: int) -> None:
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def tar_members(path: str | Path, start: int = 0, size: int | None = None):
    """(name, absolute byte offset, size) of each regular file in an uncompressed tar."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size if size is None else size
            fileobj = io.BufferedReader(_Window(f, start, size))
            with tarfile.open(fileobj=fileobj, mode="r:") as tar:
                return [(m.name, start + m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.ReadError as e:
        where = f"{path}" if start == 0 else f"{path} (inner tar at byte {start})"
        raise UserError(f"{where}: not a readable uncompressed tar ({e})") from None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _files_under(folder: Path) -> list[Path]:
    out = []
    for dirpath, _, files in os.walk(folder, followlinks=True):
        out.extend(Path(dirpath) / f for f in files)
    return sorted(out)


def folder_tree(root: str | Path, classes: list[str] | None = None):
    """A folder-per-class tree: ``(classes, items, ignored)``. Classes are the sorted
    sub-folder names (as ImageFolder) unless given; non-image files are returned in
    ``ignored`` so the caller can report them."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"{root}: class folders not in the training set: {unknown[:5]}")
    label_of = {c: i for i, c in enumerate(classes)}
    items, ignored = [], []
    for name in found:
        for p in _files_under(root / name):
            if _is_image(p.name):
                items.append(Item(str(p), -1, p.stat().st_size, str(p), label_of[name]))
            else:
                ignored.append(str(p))
    if not items:
        raise UserError(
            f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders"
        )
    return classes, items, ignored


def imagenet_train(src: str | Path):
    """ILSVRC-2012 train: the official tar of per-WNID tars, a folder of those tars, or a
    folder of ``<wnid>/`` folders. Returns ``(wnids, items, ignored)``."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: not found (expected ILSVRC2012_img_train.tar or its folder)")
    if src.is_dir() and any(p.is_dir() for p in src.iterdir()):
        return folder_tree(src)
    if src.is_dir():
        tars = sorted(p for p in src.iterdir() if p.name.endswith(".tar"))
        inner = [(p.name, str(p), 0, p.stat().st_size) for p in tars]
    else:
        members = tar_members(src)
        inner = [(n, str(src), off, sz) for n, off, sz in members if n.endswith(".tar")]
    if not inner:
        raise UserError(f"{src}: no per-class tars (<wnid>.tar) or <wnid>/ folders inside")
    wnids = sorted(Path(n).name[: -len(".tar")] for n, *_ in inner)
    label_of = {w: i for i, w in enumerate(wnids)}
    items, ignored = [], []
    for name, path, off, size in sorted(inner, key=lambda t: Path(t[0]).name):
        wnid = Path(name).name[: -len(".tar")]
        for member, m_off, m_size in sorted(tar_members(path, off, size)):
            label = f"{path}:{name}:{member}" if off else f"{path}:{member}"
            if _is_image(member):
                items.append(Item(path, m_off, m_size, label, label_of[wnid]))
            else:
                ignored.append(label)
    return wnids, items, ignored


@dataclass
class Devkit:
    """The devkit's leaf synsets and validation ground truth (PAPER G1)."""

    wnid_of_id: dict[int, str]  # ILSVRC2012_ID -> WNID, leaf classes only
    words: dict[str, str]  # WNID -> "tench, Tinca tinca"
    val_ids: list[int]  # ILSVRC2012_ID of validation image 1, 2, ...


def _parse_meta(data: bytes, where: str) -> tuple[dict[int, str], dict[str, str]]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
        synsets = np.atleast_1d(mat["synsets"])
        ids = [int(x) for x in synsets["ILSVRC2012_ID"]]
        wnids = [str(x) for x in synsets["WNID"]]
        words = [str(x) for x in synsets["words"]]
        children = [int(x) for x in synsets["num_children"]]
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"{where}: not a devkit meta.mat with a 'synsets' struct ({e})") from None
    leaves = {i: w for i, w, c in zip(ids, wnids, children, strict=True) if c == 0}
    if not leaves:
        raise UserError(f"{where}: no leaf synsets (num_children == 0)")
    return leaves, dict(zip(wnids, words, strict=True))


def _parse_ground_truth(text: str, where: str) -> list[int]:
    try:
        return [int(line) for line in text.split()]
    except ValueError:
        raise UserError(f"{where}: expected one ILSVRC2012_ID per line") from None


def read_devkit(path: str | Path) -> Devkit:
    """``ILSVRC2012_devkit_t12.tar.gz`` or its extracted folder."""
    path = Path(path)
    meta_name, gt_name = "data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"
    files: dict[str, bytes] = {}
    if path.is_file():
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    for want in (meta_name, gt_name):
                        if m.isfile() and m.name.endswith(want):
                            files[want] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable devkit archive ({e})") from None
    elif path.is_dir():
        for want in (meta_name, gt_name):
            hits = sorted(path.rglob(Path(want).name))
            if hits:
                files[want] = hits[0].read_bytes()
    else:
        raise UserError(f"{path}: devkit not found (expected ILSVRC2012_devkit_t12.tar.gz)")
    for want in (meta_name, gt_name):
        if want not in files:
            raise UserError(f"{path}: devkit has no {want}")
    leaves, words = _parse_meta(files[meta_name], f"{path}:{meta_name}")
    val_ids = _parse_ground_truth(files[gt_name].decode(), f"{path}:{gt_name}")
    return Devkit(leaves, words, val_ids)


_VAL_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


def imagenet_val(src: str | Path, wnids: list[str], devkit: Devkit | None):
    """ILSVRC-2012 val: the flat tar or folder labelled through the devkit, or a folder
    already split into ``<wnid>/``. Returns ``(items, ignored, excluded)``: ``excluded`` are
    the images of classes outside ``wnids`` (a subset of ImageNet)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: not found (expected ILSVRC2012_img_val.tar or its folder)")
    if src.is_dir() and any(p.is_dir() for p in src.iterdir()):
        _, items, ignored = folder_tree(src, wnids)
        return items, ignored, []
    if src.is_file():
        flat = [(f"{src}:{n}", str(src), off, sz) for n, off, sz in tar_members(src)]
    else:
        flat = [(str(p), str(p), -1, p.stat().st_size) for p in sorted(src.iterdir())]
    images = sorted(t for t in flat if _is_image(t[0]))
    ignored = [t[0] for t in flat if not _is_image(t[0])]
    if devkit is None:
        raise UserError(f"{src}: a flat validation set needs --devkit for its labels")
    if len(images) != len(devkit.val_ids):
        raise UserError(
            f"{src}: {len(images)} validation images but the devkit ground truth lists "
            f"{len(devkit.val_ids)}"
        )
    # PAPER G1: ILSVRC2012_ID -> WNID through meta.mat -> index in sorted-WNID order.
    label_of = {w: i for i, w in enumerate(wnids)}
    items, excluded = [], []
    for name, path, off, size in images:
        m = _VAL_NUMBER.search(name)
        if m is None or not 1 <= int(m.group(1)) <= len(devkit.val_ids):
            raise UserError(f"{name}: cannot tell which validation image this is from its name")
        ilsvrc_id = devkit.val_ids[int(m.group(1)) - 1]
        wnid = devkit.wnid_of_id.get(ilsvrc_id)
        if wnid is None:
            raise UserError(f"{name}: ground-truth ILSVRC2012_ID {ilsvrc_id} not a devkit class")
        if wnid not in label_of:
            excluded.append(name)
            continue
        items.append(Item(path, off, size, name, label_of[wnid]))
    return items, ignored, excluded
