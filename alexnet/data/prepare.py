"""``alexnet prepare``: turn a source into a prepared dataset directory, once (PAPER B1, B2,
B4, G1, G2). See docs/DATA.md.

    alexnet prepare imagenet --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz OUT
    alexnet prepare folder --train DIR [--val DIR] OUT
    alexnet prepare fashion-mnist OUT [--source DIR | --download]
    alexnet prepare cifar10 --source cifar-10-batches-py OUT
    alexnet prepare verify OUT [--quick]
"""

from __future__ import annotations

import argparse
import io
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from alexnet.data import pipeline, small, sources, store
from alexnet.data.prepare_flags import add_arguments  # noqa: F401 - the command's
from alexnet.data.verify import verify
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_text, remove_stale_temps
from alexnet.runtime.owner import owned


@dataclass(frozen=True)
class Options:
    """How images are stored: ``alexnet prepare``'s options, as the library takes them."""

    size: int = 256  # PAPER B1: the shorter side to 256, the central square; 0: native size
    storage: str = "jpeg"  # JPEG records, or "raw" uint8 pixels
    quality: int = 90
    workers: int = field(default_factory=pipeline.default_workers)
    chunk: int = 1000  # images per resumable chunk
    skip_bad: bool = False  # leave unreadable files out (listed and counted) instead of failing
    exif: bool = False  # turn images upright by their EXIF orientation (a user's photos)
    channels: int = 3  # RGB (G2), or 1: grey, for a network of grey images (folders.py)

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, exif: bool) -> Options:
        return cls(
            args.size, args.storage, args.quality, args.workers, args.chunk, args.skip_bad, exif
        )

    def check(self) -> None:
        """Before the sources are scanned (minutes for ImageNet), not after."""
        if self.storage == "jpeg" and not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality}: must be 1..100")
        for name, low in (("size", 0), ("chunk", 1), ("workers", 1)):
            if getattr(self, name) < low:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least {low}")


def _clean_leftovers(out: Path) -> None:
    """Remove what a killed run left: temp files of an unfinished write (as large as a record
    file), and ``.parts`` once ``meta.json`` exists (a second copy of every record)."""
    stale = remove_stale_temps(out)
    if stale:
        print(f"{out}: removed {len(stale)} temp file(s) of an interrupted run", flush=True)
    if (out / "meta.json").is_file() and (out / ".parts").exists():
        shutil.rmtree(out / ".parts")
        print(f"{out}: removed the finished chunks an interrupted run left in .parts", flush=True)


def _already_done(out: Path) -> bool:
    _clean_leftovers(out)
    if (out / "meta.json").is_file():
        meta = store.read_meta(out)
        counts = ", ".join(f"{k} {v['count']}" for k, v in meta["splits"].items())
        print(f"{out}: already prepared ({counts}); nothing to do (delete it to redo)")
        return True
    return False


def _native_size(item: sources.Item) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(item.read())) as img:
            return img.size
    except Exception as e:
        raise UserError(f"{item.name}: cannot read the first image for --size 0 ({e})") from None


def _report_bad(out: Path, bad: list[str], options: Options, bad_hint: str) -> None:
    """The files that could not be read, listed in ``bad_files.txt``: left out with
    ``--skip-bad``, else refused."""
    report = out / "bad_files.txt"
    if bad:
        atomic_write_text(report, "".join(b + "\n" for b in bad))
        if not options.skip_bad:
            first = "; ".join(b.replace("\t", " (", 1) + ")" for b in bad[:3])
            raise UserError(
                f"{len(bad)} unreadable file(s), listed in {report}: {first}; {bad_hint} "
                "(finished work is kept)"
            )
        print(f"skipped {len(bad)} unreadable file(s), listed in {report}")


def _meta(
    dataset: str,
    classes: list[str],
    names: list[str],
    split_meta: dict,
    notes: dict,
    options: Options,
    native: tuple[int, int] | None,
) -> dict:
    """``meta.json`` (alexnet/data/store.py describes it)."""
    size = list(native[::-1]) if native else [options.size, options.size]
    resize = "central min(w,h) square, bicubic to size x size (PAPER B1)"
    return {
        "dataset": dataset,
        "storage": options.storage,
        "image_size": size,
        "channels": options.channels,
        "classes": classes,
        "class_names": names,
        "splits": split_meta,
        "jpeg_quality": options.quality if options.storage == "jpeg" else None,
        "resize": resize if options.size else "native size",
        "exif_orientation": "applied" if options.exif else "ignored (as stored)",
        **notes,
    }


def prepare_items(
    out: Path,
    dataset: str,
    splits: dict,
    classes: list[str],
    names: list[str],
    notes: dict,
    options: Options,
    *,
    after_chunk=None,
    bad_hint: str = "rerun with --skip-bad to leave them out",
) -> dict:
    """Prepare the ``splits`` (``{split: [Item, ...]}``) into ``out``, which the caller owns:
    chunks, bad-file report, the finished splits and ``meta.json`` (returned)."""
    native = _native_size(splits["train"][0]) if options.size == 0 and "train" in splits else None
    settings = pipeline.RecordFormat(
        options.size, options.storage, options.quality, native, options.exif, options.channels
    )
    parts = {}
    for split, items in splits.items():
        parts[split] = pipeline.run_chunks(
            out,
            split,
            items,
            settings,
            workers=options.workers,
            chunk=options.chunk,
            want_stats=split == "train",
            after_chunk=after_chunk,
        )
    bad = [b for split in splits for b in pipeline.collect_bad(parts[split])]
    _report_bad(out, bad, options, bad_hint)
    split_meta = {s: pipeline.finish_split(out, s, parts[s], s == "train") for s in splits}
    store.write_meta(out, _meta(dataset, classes, names, split_meta, notes, options, native))
    shutil.rmtree(out / ".parts", ignore_errors=True)
    to = "RGB" if options.channels == 3 else "grey"
    for split, m in split_meta.items():
        print(
            f"{out}: {split} {m['count']} images, {m['skipped']} skipped, converted to {to}: "
            f"{m['converted'] or 'none'}"
        )
    return store.read_meta(out)


# Why a file was not taken -> (its count's key in meta.json, how the report line says it).
_IGNORED = {
    sources.NOT_IMAGE: ("ignored_non_images", "non-image file(s)"),
    sources.HIDDEN: ("ignored_hidden", "hidden file(s) or folder(s) (names starting with '.')"),
    sources.OUTSIDE: ("ignored_outside_class_folders", "file(s) outside the class folders"),
    sources.LOOP: ("ignored_repeated_folders", "linked folder(s) already read (loops)"),
    sources.CANNOT_READ: ("ignored_unreadable", "unreadable file(s) or folder(s)"),
    sources.EMPTY: ("empty_class_folders", "empty class folder(s) of this split"),
}


def _report_ignored(out: Path, ignored: list[str], excluded: list[str]) -> dict:
    notes = {}
    if ignored:
        atomic_write_text(out / "ignored_files.txt", "".join(n + "\n" for n in ignored))
        reasons = Counter(line.split("\t")[1] for line in ignored)
        notes.update({_IGNORED[why][0]: n for why, n in reasons.items()})
        what = ", ".join(f"{n} {_IGNORED[why][1]}" for why, n in reasons.items())
        print(f"ignored {what}, listed in {out / 'ignored_files.txt'}")
    if excluded:
        atomic_write_text(out / "excluded_val.txt", "".join(n + "\n" for n in excluded))
        print(
            f"left out {len(excluded)} validation image(s) of classes not in the training "
            f"set, listed in {out / 'excluded_val.txt'}"
        )
        notes["val_excluded_other_classes"] = len(excluded)
    return notes


def prepare_imagenet(
    train: Path,
    out: Path,
    *,
    val: Path | None = None,
    devkit: Path | None = None,
    options: Options | None = None,
    after_chunk=None,
) -> Path:
    """ILSVRC-2012 as users have it (PAPER G1) into ``out``; see ``alexnet prepare imagenet``.
    EXIF orientation is not applied: the paper's pixels are the JPEGs as stored."""
    options = options or Options()
    options.check()
    if _finished(out):
        return out
    kit = sources.read_devkit(devkit) if devkit else None
    wnids, items, ignored = sources.imagenet_train(train)
    if kit is not None:
        known = set(kit.wnid_of_id.values())
        unknown = [w for w in wnids if w not in known]
        if unknown:
            raise UserError(f"{train}: class(es) {unknown[:5]} are not devkit classes")
    splits, excluded = {"train": items}, []
    if val is not None:
        splits["val"], ignored_val, excluded = sources.imagenet_val(val, wnids, kit)
        ignored += ignored_val
    names = [kit.words.get(w, w) for w in wnids] if kit else list(wnids)
    with _own(out):
        if not _already_done(out):
            notes = _report_ignored(out, ignored, excluded)
            prepare_items(
                out, "imagenet", splits, wnids, names, notes, options, after_chunk=after_chunk
            )
    return out


def prepare_folder(
    train: Path,
    out: Path,
    *,
    val: Path | None = None,
    options: Options | None = None,
    after_chunk=None,
) -> Path:
    """A folder-per-class tree (``<class>/<images>``, classes sorted as ImageFolder) into
    ``out``, with ``val`` the same classes' validation tree; see ``alexnet prepare folder``.
    Images are turned upright by their EXIF orientation (``Options(exif=True)``)."""
    options = options or Options(exif=True)
    options.check()
    if _finished(out):
        return out
    classes, items, ignored = sources.folder_tree(train)
    splits = {"train": items}
    if val is not None:
        _, splits["val"], ignored_val = sources.folder_tree(val, classes)
        ignored += ignored_val
    with _own(out):
        if not _already_done(out):
            notes = _report_ignored(out, ignored, [])
            prepare_items(
                out,
                "folder",
                splits,
                classes,
                list(classes),
                notes,
                options,
                after_chunk=after_chunk,
            )
    return out


def run_imagenet(args, after_chunk=None) -> int:
    prepare_imagenet(
        args.train,
        args.out,
        val=args.val,
        devkit=args.devkit,
        options=Options.from_args(args, exif=False),
        after_chunk=after_chunk,
    )
    return 0


def run_folder(args, after_chunk=None) -> int:
    prepare_folder(
        args.train,
        args.out,
        val=args.val,
        options=Options.from_args(args, exif=True),
        after_chunk=after_chunk,
    )
    return 0


def _finished(out: Path) -> bool:
    """Already prepared (checked before the sources are scanned: minutes for ImageNet)."""
    return (out / "meta.json").is_file() and _already_done(out)


def _write_small(
    args: argparse.Namespace, dataset: str, splits, classes: list[str], source: str
) -> int:
    small.prepare_small(
        args.out, dataset, splits, classes, source, val_size=args.val_size, val_seed=args.val_seed
    )
    return 0


def _own(out: Path):
    """``out`` for this process alone, for the whole preparation (runtime/owner.py)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (the prepared dataset's folder)")
    hint = "one process prepares a directory at a time: wait for it to end, or use another"
    return owned(out, what="prepared dataset", hint=hint)


def run_small(args: argparse.Namespace) -> int:
    with _own(args.out):
        if _already_done(args.out):
            return 0
        if args.kind == "fashion-mnist":
            source = args.source
            if args.download:
                source = small.download_fashion_mnist(source or args.out / "source")
            source = source or Path(small.FASHION_MNIST_DIR)
            splits = small.load_fashion_mnist(source)
            classes = small.FASHION_MNIST_CLASSES
            return _write_small(args, "fashion-mnist", splits, classes, str(source))
        splits, names = small.load_cifar10(args.source)
        return _write_small(args, "cifar10", splits, names, str(args.source))


def run(args: argparse.Namespace) -> int:
    if args.kind == "verify":
        return verify(args.out, quick=args.quick)
    if args.kind == "imagenet":
        return run_imagenet(args)
    if args.kind == "folder":
        return run_folder(args)
    return run_small(args)
