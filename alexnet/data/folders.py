"""Folders of images wherever a dataset is taken, and the image files ``predict`` is given.

``train``, ``evaluate``, ``features extract`` and ``figures`` take a prepared dataset
(``alexnet prepare``) or a folder of images:

- a folder-per-class tree (``<class>/<image files>``, as torchvision's ImageFolder reads it);
- or a folder of such trees named as splits (``train/``, ``val/`` or ``valid/``, ``test/``).

A folder is prepared once (PAPER B1: shorter side to the stored size, the central square;
EXIF orientation applied, as for ``alexnet prepare folder``) into a cache under
``$ALEXNET_HOME/datasets`` (``alexnet.runtime.paths``), keyed by its contents (every image's
path in the folder, size and modification time) and the settings (stored size, classes,
held-out share): the next command on the same folder reads the cache, and a changed, added
or removed image makes a new key, so a cache is never stale. A line on stderr says which.
Two commands preparing the same folder at once: the second waits for the first's cache. An
unfinished cache (a stopped or refused preparation) is resumed by the next command on the
same contents, and removed by the next that prepares the same folder with other contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from alexnet.data import sources, store
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_text
from alexnet.runtime.owner import owned
from alexnet.runtime.paths import home

SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
FOLDER_SPLIT = "images"  # the split of a cache made from one class tree, for evaluation
CACHE_VERSION = 1  # part of the key: bump when what a cache holds changes
SOURCE_NAME = "source.txt"  # in a cache: the folder it is made of, written before the work
DATA_HELP = (
    "a prepared dataset, or a folder of images: one folder per class (or train/, val/, test/ "
    "folders of such), prepared once into $ALEXNET_HOME/datasets"
)


def add_data_argument(parser) -> None:
    """The ``--data`` option of every command that reads a dataset or a folder of images."""
    parser.add_argument("--data", type=Path, required=True, help=DATA_HELP)


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta.json").is_file()


def split_folders(root: Path) -> dict[str, Path]:
    """The split trees of a folder whose sub-folders are named as splits (``train/``,
    ``val/``, ...) and hold class folders; {} for a folder whose sub-folders are classes."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            for sub in (root / name, root / name.capitalize()):
                if sub.is_dir() and any(p.is_dir() for p in sub.iterdir()):
                    found.setdefault(split, sub)
    return found


def _stamp(items: list[sources.Item], root: Path) -> list[str]:
    """Each image as ``relative path, size, modification time`` (what the key hashes)."""
    out = []
    for item in items:
        st = os.stat(item.path)
        out.append(
            f"{os.path.relpath(item.path, root)}\t{st.st_size}\t{st.st_mtime_ns}\t{item.label}"
        )
    return out


def _key(root: Path, splits: dict[str, list[sources.Item]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps({**settings, "version": CACHE_VERSION}, sort_keys=True).encode())
    for split, items in sorted(splits.items()):
        h.update(f"\n[{split}]\n".encode())
        h.update("\n".join(_stamp(items, root)).encode())
    return h.hexdigest()


def hold_out(items: list[sources.Item], share: float, seed: int = 0):
    """``(train, val)``: ``share`` of each class's images (at least one where a class has
    two or more) drawn with ``seed``, for a tree that has no validation split of its own
    (PAPER D4 steers by validation error)."""
    rng = np.random.default_rng(seed)
    labels = np.array([it.label for it in items])
    val = set()
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(len(members) - 1, max(1, round(share * len(members)))) if len(members) > 1 else 0
        val.update(rng.choice(members, n, replace=False).tolist())
    return [it for i, it in enumerate(items) if i not in val], [items[i] for i in sorted(val)]


def _slug(root: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name)[:40] or "folder"


def prepared(
    folder: str | os.PathLike,
    *,
    size: int,
    classes: list[str] | None = None,
    holdout: float = 0.0,
    seed: int = 0,
    channels: int = 3,
) -> Path:
    """The prepared dataset of image ``folder``, made once into the cache (see the module
    docstring). ``classes``: the labels' order (a network's classes); by default the
    training tree's sorted class folders. ``holdout``: the share of a single tree's (or of
    ``train/``'s, where there is no ``val/``) images held out as ``val``, for training; 0
    makes a single tree the split ``images``. ``size``: the stored side (PAPER B1).
    ``channels``: 3 (RGB), or 1 for a network of grey images (PIL's luma, as predict)."""
    from alexnet.data.prepare import Options, prepare_items

    root = Path(folder).resolve()
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder or prepared dataset")
    splits, classes, ignored, note = _scan(root, classes, holdout, seed)
    options = Options(size=size, exif=True, channels=channels)
    settings = {"size": size, "classes": classes, "holdout": holdout, "seed": seed}
    if channels != 3:  # (keys of RGB caches made before grey ones existed stay as they were)
        settings["channels"] = channels
    key = _key(root, splits, {**settings, "storage": options.storage, "quality": options.quality})
    cache = home() / "datasets" / f"{_slug(root)}-{key[:16]}"
    count = sum(len(v) for v in splits.values())
    with owned(cache, what="dataset cache", wait=True):
        if is_prepared(cache):
            _say(f"{folder}: the cache made of it before ({cache})")
            return cache
        atomic_write_text(cache / SOURCE_NAME, str(root))
        _remove_unfinished(root, cache)
        _say(
            f"{folder}: a folder of {count} images in {len(classes)} classes: preparing it once "
            f"({size}x{size}{'' if channels == 3 else ' grey'}, PAPER B1) into {cache}; the next "
            "command on it reads that"
        )
        hint = (
            f"remove them from {folder}, or prepare it yourself with `alexnet prepare folder "
            "--skip-bad` and pass the prepared directory"
        )
        with contextlib.redirect_stdout(sys.stderr):  # the command's stdout is its result
            notes = {"source": str(root), "validation": note} if note else {"source": str(root)}
            if "train" not in splits:
                notes["folder_split"] = FOLDER_SPLIT
            if "test" in splits:  # its results are reported on test/, as a test set's are
                notes["test_split"], notes["test_is"] = "test", "the folder's test/ images"
            prepare_items(cache, "folder", splits, classes, classes, notes, options, bad_hint=hint)
    return cache


def _remove_unfinished(root: Path, keep: Path) -> None:
    """Remove the unfinished caches of ``root`` other than ``keep``: preparations of the
    folder's earlier contents that were stopped or refused (a bad file), which no command
    can finish now that the contents changed. One in use elsewhere is left alone."""
    for other in keep.parent.glob(f"{_slug(root)}-*"):
        if other == keep or is_prepared(other) or not (other / SOURCE_NAME).is_file():
            continue
        try:
            if (other / SOURCE_NAME).read_text() != str(root):
                continue
            with owned(other, what="dataset cache"):
                shutil.rmtree(other)
        except (OSError, UserError):  # in use, or gone meanwhile: not ours to remove now
            continue
        _say(f"{root}: removed an unfinished cache of its earlier contents ({other})")


def _scan(root: Path, classes: list[str] | None, holdout: float, seed: int):
    """``(splits of items, classes, ignored, a note on the validation split)``."""
    trees = split_folders(root)
    ignored: list[str] = []
    if not trees:
        found, items, ignored = sources.folder_tree(root, classes)
        classes = list(classes or found)
        if holdout <= 0:
            return {FOLDER_SPLIT: items}, classes, ignored, None
        train, val = hold_out(items, holdout, seed)
        note = f"{len(val)} of the folder's images held out ({holdout:.0%} a class, seed {seed})"
        return {"train": train, "val": val}, classes, ignored, note
    first = trees.get("train") or next(iter(trees.values()))
    found, _, _ = sources.folder_tree(first, classes)
    classes = list(classes or found)
    splits = {}
    for split, tree in trees.items():
        _, splits[split], more = sources.folder_tree(tree, classes)
        ignored += more
    note = None
    if holdout > 0 and "train" in splits and "val" not in splits:
        splits["train"], splits["val"] = hold_out(splits["train"], holdout, seed)
        note = f"{len(splits['val'])} of train/'s images held out ({holdout:.0%}, seed {seed})"
    return splits, classes, ignored, note


_SAID: set[str] = set()


def _say(line: str) -> None:
    if line not in _SAID:  # a command that opens two splits of one folder says it once
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)


def _say_left_out(folder: Path, skipped: list[str]) -> None:
    """One line on stderr for what a folder held that is not taken as an image."""
    if skipped:
        shown = "; ".join(line.replace("\t", ": ", 1).split("\t")[0] for line in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        n = len(skipped)
        _say(f"{folder}: left out {n} entr{'y' if n == 1 else 'ies'}: {shown}{more}")


def image_files(inputs: list[Path]) -> list[Path]:
    """The image files ``inputs`` name, in order: a file as it is (read or reported by the
    caller), a folder's images below it (sorted; hidden files and folders, other files and
    link loops left out, and a line on stderr says which), ``@list.txt`` the paths listed in
    it, one a line."""
    out: list[Path] = []
    for p in inputs:
        text = str(p)
        if text.startswith("@"):
            listed = Path(text[1:])
            try:
                lines = listed.read_text().splitlines()
            except OSError as e:
                raise UserError(
                    f"{listed}: cannot read the list of images ({e.strerror})"
                ) from None
            out += image_files([Path(line.strip()) for line in lines if line.strip()])
        elif p.is_dir():
            skipped: list[str] = []
            for f in sources.files_under(p, skipped):
                why = sources.skip_reason(f.name)
                if why is None:
                    out.append(f)
                else:
                    skipped.append(f"{f}\t{why}")
            _say_left_out(p, skipped)
        else:
            out.append(p)
    return out


def classes_for(data: str | os.PathLike, classes: list[str] | None) -> list[str] | None:
    """The labels a command that only shows or compares images (features, figures) reads a
    folder with: ``classes`` (a network's) where every class folder of ``data`` is one of
    them, so it shares the cache ``evaluate`` makes; else None, the folder's own classes
    (fc7 features of photos of classes the network was never trained on)."""
    root = Path(data)
    if classes is None or is_prepared(root) or not root.is_dir():
        return classes
    tree = next(iter(split_folders(root).values()), root)
    found = {p.name for p in tree.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return classes if found <= {sources.folder_name(c) for c in classes} else None


def open_split(
    data: str | os.PathLike,
    split: str | None = None,
    *,
    size: int,
    classes: list[str] | None = None,
    channels: int = 3,
    default=None,
):
    """``(dataset, what the split is)``: ``split`` of a prepared dataset, or of a folder of
    images prepared once at ``size`` and ``channels`` (``prepared``) with its labels in
    ``classes``' order. ``split`` None: ``default(meta)``, by default the split results are
    reported on (``store.report_split``)."""
    from alexnet.data.dataset import PreparedDataset

    root = Path(data)
    if not is_prepared(data):
        root = prepared(data, size=size, classes=classes, channels=channels)
    what = ""
    if split is None:
        meta = store.read_meta(root)
        split, what = (default(meta), "") if default else store.report_split(meta)
    return PreparedDataset(root, split), what


def open_images(data: str | os.PathLike, split: str | None, card, *, default=None):
    """``split`` of ``data`` for a network (its ``card``) that shows or compares images but
    scores nothing (features, figures): ``open_split`` at the network's size and channels,
    a folder labelled by the network's classes where every class folder is one of them,
    else by its own (``classes_for``)."""
    classes = classes_for(data, list(card.classes))  # the folder's own where they differ
    size, channels = card.stored_size, card.channels
    return open_split(data, split, size=size, classes=classes, channels=channels, default=default)[
        0
    ]
