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


# What is skipped is returned as "name\treason" lines (with "\tdetail" where there is one,
# e.g. the system's words for an unreadable file), so the report can say why.
NOT_IMAGE = "not an image file (by its extension)"
HIDDEN = "hidden (name starts with '.')"
OUTSIDE = "not inside a class folder"
LOOP = "a link to a folder already read (a loop, or a second way in): not read again"
CANNOT_READ = "cannot be read"
EMPTY = "an empty class folder: no images of this class"
# Folder names that are the splits of a dataset, not classes (the parent passed as --train).
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "devkit"}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    """Any component starting with '.' (``.ipynb_checkpoints/``, macOS ``._x.jpg``, ``.git``)."""
    return any(part.startswith(".") for part in Path(name).parts if part not in (".", ".."))


def skip_reason(name: str) -> str | None:
    """Why a file is not taken as an image, or None if it is one."""
    if _is_hidden(name):
        return HIDDEN
    return None if _is_image(name) else NOT_IMAGE


def files_under(folder: Path, skipped: list[str]) -> list[Path]:
    """The files below ``folder``, sorted. Links are followed, but each real folder is read
    once, and never one that holds ``folder`` itself: a link back up the tree (a loop) or to
    a folder already read is noted in ``skipped``, not followed. Hidden folders are not
    entered but noted, and so are folders that cannot be read."""
    out, seen, top = [], set(), os.path.realpath(folder)

    def unreadable(e: OSError) -> None:
        skipped.append(f"{e.filename}/\t{CANNOT_READ}\t{e.strerror}")

    for dirpath, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if real in seen or top.startswith(real + os.sep):
            skipped.append(f"{dirpath}/\t{LOOP}")
            dirs.clear()
            continue
        seen.add(real)
        for d in [d for d in dirs if d.startswith(".")]:
            dirs.remove(d)
            skipped.append(f"{Path(dirpath) / d}/\t{HIDDEN}")
        out.extend(Path(dirpath) / f for f in files)
    return sorted(out)


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _refuse_non_classes(root: Path, found: list[str], wnid: bool) -> None:
    """A --train folder whose entries are not classes. The rule: for ImageNet every class
    folder (or per-class tar) must be named by a WNID (n and 8 digits); for any folder tree,
    no sub-folder may be a split name (train/, val/, test/, devkit/, ...) holding folders."""
    if wnid:
        odd = [f for f in found if not WNID.match(f.removesuffix(".tar"))]
        rule = "not ImageNet classes (a WNID: n and 8 digits)"
    else:
        odd = [f for f in found if f.lower() in SPLIT_NAMES and _subfolders(root / f)]
        rule = "the splits of a dataset, not class folders"
    if not odd:
        return
    hint = next((f for f in odd if "train" in f.lower()), None)
    hint = f" (--train {root / hint})" if hint else ""
    other = "; `alexnet prepare folder` takes classes of any name" if wnid else ""
    raise UserError(
        f"{root}: {', '.join(odd[:5])} are {rule}; pass the training set itself{hint}, "
        f"whose entries are the classes{other}"
    )


def folder_name(cls: str) -> str:
    """The folder a class's images are read from: its name, with '_' for each '/', which no
    folder name can hold (Fashion-MNIST's 'T-shirt/top' is read from 'T-shirt_top/')."""
    return cls.replace("/", "_")


def folder_tree(root: str | Path, classes: list[str] | None = None, *, wnid: bool = False):
    """A folder-per-class tree: ``(classes, items, ignored)``. Classes are the sorted
    sub-folder names (as ImageFolder) unless given; ``wnid``: they must be ImageNet WNIDs.
    Non-image files, hidden files and folders and files outside the class folders are
    returned in ``ignored`` (lines "name<TAB>reason") so the caller can report them."""
    root = Path(root).resolve()  # one spelling of the inputs, however they were typed
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    found = [p.name for p in _subfolders(root)]
    if not found:
        raise UserError(f"{root}: no class sub-folders (expected {root}/<class>/<image files>)")
    given = classes is not None
    if not given:
        _refuse_non_classes(root, found, wnid)
        classes = found
    label_of = {folder_name(c): i for i, c in enumerate(classes)}
    unknown = sorted(set(found) - set(label_of))
    if unknown:
        known = ", ".join(folder_name(c) for c in classes[:5]) + (", ..." if classes[5:] else "")
        raise UserError(
            f"{root}: class folders not in the training set: {unknown[:5]} (its {len(classes)} "
            f"classes' folders: {known})"
        )
    ignored = []
    for p in sorted(root.iterdir()):
        if p.name not in label_of:
            ignored.append(
                f"{p}{'/' if p.is_dir() else ''}\t{HIDDEN if _is_hidden(p.name) else OUTSIDE}"
            )
    items, empty = [], []
    for name in found:
        taken = len(items)
        for p in files_under(root / name, ignored):
            why = skip_reason(p.name)
            if why is None:
                try:
                    items.append(Item(str(p), -1, p.stat().st_size, str(p), label_of[name]))
                except OSError as e:  # a broken link, a link to itself
                    ignored.append(f"{p}\t{CANNOT_READ}\t{e.strerror}")
            else:
                ignored.append(f"{p}\t{why}")
        if len(items) == taken:
            empty.append(name)
    if not items:
        raise UserError(
            f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders"
        )
    if empty and not given:
        raise UserError(
            f"{root}: class folder(s) {', '.join(empty[:5])} hold no images: a class without "
            "training images cannot be learnt; add images or remove the folder(s)"
        )
    ignored += [f"{root / name}/\t{EMPTY}" for name in empty]
    return classes, items, ignored


def imagenet_train(src: str | Path):
    """ILSVRC-2012 train: the official tar of per-WNID tars, a folder of those tars, or a
    folder of ``<wnid>/`` folders. Returns ``(wnids, items, ignored)``."""
    src = Path(src).resolve()
    if not src.exists():
        raise UserError(f"{src}: not found (expected ILSVRC2012_img_train.tar or its folder)")
    if src.is_dir() and _subfolders(src):
        return folder_tree(src, wnid=True)
    ignored = []
    if src.is_dir():
        tars = sorted(p for p in src.iterdir() if p.name.endswith(".tar"))
        inner = [(p.name, str(p), 0, p.stat().st_size) for p in tars]
    else:
        members = tar_members(src)
        inner = [(n, str(src), off, sz) for n, off, sz in members if n.endswith(".tar")]
    ignored += [f"{path}:{n}\t{HIDDEN}" for n, path, *_ in inner if _is_hidden(n)]
    inner = [t for t in inner if not _is_hidden(t[0])]
    if not inner:
        raise UserError(f"{src}: no per-class tars (<wnid>.tar) or <wnid>/ folders inside")
    wnids = sorted(Path(n).name[: -len(".tar")] for n, *_ in inner)
    _refuse_non_classes(src, [w + ".tar" for w in wnids], wnid=True)
    label_of = {w: i for i, w in enumerate(wnids)}
    items = []
    for name, path, off, size in sorted(inner, key=lambda t: Path(t[0]).name):
        wnid = Path(name).name[: -len(".tar")]
        for member, m_off, m_size in sorted(tar_members(path, off, size)):
            label = f"{path}:{name}:{member}" if off else f"{path}:{member}"
            why = skip_reason(member)
            if why is None:
                items.append(Item(path, m_off, m_size, label, label_of[wnid]))
            else:
                ignored.append(f"{label}\t{why}")
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
    except Exception as e:  # scipy raises many types (OSError, MatReadError...) for bad bytes
        raise UserError(f"{where}: unreadable .mat file, truncated or damaged? ({e})") from None
    try:
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
    path = Path(path).resolve()
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
    text = files[gt_name].decode("ascii", errors="replace")  # digits only; others are errors
    val_ids = _parse_ground_truth(text, f"{path}:{gt_name}")
    return Devkit(leaves, words, val_ids)


_VAL_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


def imagenet_val(src: str | Path, wnids: list[str], devkit: Devkit | None):
    """ILSVRC-2012 val: the flat tar or folder labelled through the devkit, or a folder
    already split into ``<wnid>/``. Returns ``(items, ignored, excluded)``: ``excluded`` are
    the images of classes outside ``wnids`` (a subset of ImageNet)."""
    src = Path(src).resolve()
    if not src.exists():
        raise UserError(f"{src}: not found (expected ILSVRC2012_img_val.tar or its folder)")
    if src.is_dir() and _subfolders(src):
        _, items, ignored = folder_tree(src, wnids, wnid=True)
        return items, ignored, []
    if src.is_file():
        flat = [(f"{src}:{n}", str(src), off, sz, n) for n, off, sz in tar_members(src)]
    else:
        flat = [(str(p), str(p), -1, p.stat().st_size, p.name) for p in sorted(src.iterdir())]
    images = sorted(t[:4] for t in flat if skip_reason(t[4]) is None)
    ignored = [f"{t[0]}\t{skip_reason(t[4])}" for t in flat if skip_reason(t[4]) is not None]
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
