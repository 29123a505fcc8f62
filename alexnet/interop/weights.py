"""Published weights by name: downloaded once, verified, converted once, cached.

    model = load_pretrained("IMAGENET1K_V1")                 # or "bvlc_alexnet"
    probs = model(model.transforms(rgb)).softmax(1)           # RGB tensors in
    alexnet predict cat.jpg --weights bvlc_alexnet
    alexnet evaluate --weights IMAGENET1K_V1 --data data/imagenet --views 1

The cache is ``$ALEXNET_HOME`` (default ``~/.cache/alexnet``): ``downloads/`` holds the
publishers' files as published, ``converted/`` our checkpoints made from them by
``alexnet.interop.convert`` (each with a ``.json`` recording its SHA-256 and its sources).
A download goes to a temporary name (torch.hub's helper, with its progress bar), is checked
against the published size and checksum, and only then takes its real name: a killed, cut or
corrupt download leaves nothing that looks complete, and the temporary files of a dead process
are removed on the next run. A file without a published checksum is checked by its format and
pinned by the SHA-256 of its first download (``<file>.sha256``). ``$ALEXNET_WEIGHTS_MIRROR``
replaces the scheme and host of every URL (a local mirror, or a test server).
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

import torch

from alexnet.interop.registry import BUILTIN, ENV_REGISTRY, Download, WeightSet, extra_entries
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    exclusive_lock,
    file_digest,
)
from alexnet.runtime.paths import home

ENV_MIRROR = "ALEXNET_WEIGHTS_MIRROR"
BUNDLED_SYNSETS = Path(__file__).with_name("ilsvrc2012_synset_words.txt")
_REGISTERED: dict[str, WeightSet] = {}


# -------------------------------------------------------------------------------- registry
def register(entry: WeightSet) -> None:
    """Add a weight set for this process (tests, private weights). A built-in name or alias
    cannot be taken, so a registered entry never changes what a published name means."""
    taken = {n.lower() for e in BUILTIN for n in (e.name, *e.aliases)}
    if {n.lower() for n in (entry.name, *entry.aliases)} & taken:
        raise UserError(f"weights {entry.name!r}: a built-in name cannot be registered again")
    _REGISTERED[entry.name] = entry


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def entries() -> list[WeightSet]:
    extra = extra_entries(os.environ.get(ENV_REGISTRY))
    for entry in extra:
        if any(entry.name.lower() == b.name.lower() for b in BUILTIN):
            raise UserError(f"${ENV_REGISTRY}: {entry.name!r} is a built-in weight set")
    return [*BUILTIN, *extra, *_REGISTERED.values()]


def lookup(name: str) -> WeightSet:
    """The weight set called ``name`` or one of its aliases (case-insensitive)."""
    names = {}
    for entry in entries():
        for n in (entry.name, *entry.aliases):
            names.setdefault(n.lower(), entry)
    if str(name).lower() in names:
        return names[str(name).lower()]
    known = [e.name for e in entries()]
    close = difflib.get_close_matches(str(name), known + [n for n in names], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown weights {name!r}: choose one of {', '.join(known)}{hint}")


# ---------------------------------------------------------------------------------- cache
def mirrored(url: str) -> str:
    """``url`` with its scheme and host replaced by ``$ALEXNET_WEIGHTS_MIRROR`` when set."""
    base = os.environ.get(ENV_MIRROR)
    if not base:
        return url
    return base.rstrip("/") + urlsplit(url).path


def _clean_stale(directory: Path, filename: str) -> None:
    """Remove temporary files of downloads whose process has ended (killed runs)."""
    for tmp in directory.glob(f".{filename}.*.download*"):
        pid = tmp.name[len(filename) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(d: Download, path: Path, label: str) -> None:
    """Size and published checksums of ``path``; else the SHA-256 pinned on first download.
    Every mismatch is named, in one line: a wrong size alone could be a cut download, a wrong
    hash alone a damaged byte."""
    problems = []
    size = path.stat().st_size
    if d.size is not None and size != d.size:
        problems.append(f"{size} bytes, expected {d.size}")
    for algorithm, want in (("sha256", d.sha256), ("sha1", d.sha1)):
        if want and (got := file_digest(path, algorithm)) != want.lower():
            problems.append(f"{algorithm.upper()} {got}, expected {want}")
    pin = path.with_name(path.name + ".sha256")
    if not (d.sha256 or d.sha1) and pin.is_file():
        if (got := file_digest(path)) != (want := pin.read_text().strip()):
            problems.append(f"SHA-256 {got}, expected {want} (pinned at first download)")
    if problems:
        raise UserError(f"{label}: {'; '.join(problems)}")


def fetch(
    d: Download,
    directory: Path,
    *,
    validate: Callable[[Path, str], None] | None = None,
    progress: bool = True,
) -> Path:
    """``directory/<filename>``, downloaded if absent, checked before it is returned."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / d.filename
    pin = path.with_name(path.name + ".sha256")
    _clean_stale(directory, d.filename)
    if path.is_file():
        check(d, path, f"{path} (remove it to download it again)")
        return path
    pin.unlink(missing_ok=True)  # a pin left by a run killed before its file took its name
    url = mirrored(d.url)
    tmp = directory / f".{d.filename}.{os.getpid()}.download"
    label = f"{url} (downloaded for {path}; nothing was kept)"
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=progress)
        except (URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(e, HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            raise UserError(
                f"cannot download {url} ({reason}); without a network, fetch that file "
                f"another way and put it at {path}"
            ) from None
        check(d, tmp, label)
        if validate is not None:
            validate(tmp, label)
        if not (d.sha256 or d.sha1):
            atomic_write_bytes(pin, (file_digest(tmp) + "\n").encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _archive_check(members: dict[str, str | None]) -> Callable[[Path, str], None]:
    """A validator: the tar archive reads to its end and holds ``members`` with their SHA-1."""

    def validate(path: Path, label: str) -> None:
        found = _read_members(path, list(members), label)
        for name, want in members.items():
            if want and (got := hashlib.sha1(found[name]).hexdigest()) != want:
                raise UserError(f"{label}: member {name} SHA-1 {got}, expected {want}")

    return validate


def _read_members(path: Path, names: list[str], label: str) -> dict[str, bytes]:
    out = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar:  # reads the whole archive: a cut-off one fails here
                base = Path(info.name).name
                if info.isfile() and base in names and base not in out:
                    out[base] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{label}: not a readable tar archive ({e})") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise UserError(f"{label}: the archive holds no {', '.join(missing)}")
    return out


def _aux_files(entry: WeightSet, directory: Path, progress: bool) -> dict[str, Path]:
    """The members ``entry`` uses from its archive, extracted once beside it."""
    archive = fetch(entry.aux, directory, validate=_archive_check(entry.members), progress=progress)
    out_dir = archive.with_name(archive.name + ".d")
    files = {name: out_dir / name for name in entry.members}
    todo = [n for n, p in files.items() if not p.is_file()]
    if todo:
        for name, data in _read_members(archive, todo, str(archive)).items():
            atomic_write_bytes(files[name], data)
    for name, want in entry.members.items():
        if want and (got := file_digest(files[name], "sha1")) != want:
            raise UserError(f"{files[name]}: SHA-1 {got}, expected {want}")
    return files


# ----------------------------------------------------------------------------- conversion
def _sources(entry: WeightSet) -> dict:
    files = [entry.weights, *([entry.aux] if entry.aux else [])]
    return {
        "weights": entry.name,
        "files": [
            {"url": d.url, "sha256": d.sha256, "sha1": d.sha1, "size": d.size} for d in files
        ],
        "members": entry.members,
    }


def checkpoint_path(name: str, *, progress: bool = True) -> Path:
    """Our checkpoint of the weight set ``name``, converted once and cached; downloads and
    verifies the publisher's files the first time."""
    entry = lookup(name)
    out = home() / "converted" / f"{entry.name}.pt"
    record = out.with_suffix(".json")
    # one process at a time fills the cache for a weight set (torchrun ranks, say)
    with exclusive_lock(home() / f".{entry.name}.lock", create=True):
        if out.is_file() and record.is_file():
            try:
                meta = json.loads(record.read_text())
            except ValueError:  # a damaged record: convert again
                meta = {}
            if meta.get("sources") == _sources(entry) and meta.get("sha256") == file_digest(out):
                return out
        ckpt = _convert(entry, home() / "downloads", progress)
        atomic_torch_save(out, ckpt)
        atomic_write_json(record, {"sources": _sources(entry), "sha256": file_digest(out)})
    return out


def _convert(entry: WeightSet, directory: Path, progress: bool) -> dict:
    from alexnet.interop.convert import import_caffe, import_torchvision

    weights = fetch(entry.weights, directory, progress=progress)
    files = _aux_files(entry, directory, progress) if entry.aux else {}
    synsets = files[entry.synsets] if entry.synsets else BUNDLED_SYNSETS
    if entry.format == "caffe":
        ckpt = import_caffe(weights, files.get(entry.mean), synsets)
    elif entry.format == "torchvision":
        ckpt = import_torchvision(weights, synsets)
    else:
        raise UserError(f"weights {entry.name!r}: unknown format {entry.format!r}")
    ckpt["source"].update(
        weights=entry.name,
        url=entry.weights.url,
        license=entry.license,
        published_accuracy={"top1": entry.top1, "top5": entry.top5, "protocol": entry.protocol},
    )
    return ckpt


# ------------------------------------------------------------------------ use from Python
BUILTIN_NAMES = ", ".join(e.name for e in BUILTIN)


def resolve_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """A network as users name it: an existing checkpoint, run directory (its best
    checkpoint: ``alexnet.checkpoint.weights_of``) or ``.safetensors`` file, else a published
    weight set by name (downloaded, verified and converted once). Returns the checkpoint file
    and, for a run directory, the line saying which checkpoint was taken."""
    from alexnet.checkpoint import weights_of

    path = Path(source)
    if path.exists():
        return weights_of(path)
    try:
        entry = lookup(str(source))
    except UserError as e:
        raise UserError(
            f"{source}: no such checkpoint, run directory or .safetensors file, nor a "
            f"published weight set ({e})"
        ) from None
    return checkpoint_path(entry.name), None


class Preprocess:
    """Images in, the weight set's own inputs out: PIL images, or RGB tensors (C,H,W) or
    (N,C,H,W), uint8 0-255 or float 0-1 (as torchvision's ``ToTensor`` gives), any size. As
    ``alexnet predict`` does with files: shorter side to the stored size and the central
    square (PAPER B1; a PIL image is first turned upright by its EXIF orientation), then the
    centre crop (or the ten views of B5) minus the weight set's mean image, times its scale.
    The colour order and scale of the publisher's contract are folded into conv1 by the
    converter, so RGB in is right for Caffe's BGR weights too."""

    def __init__(self, card) -> None:
        self.card = card
        self.aug = card.test_views()
        self.size = card.stored_size

    def __call__(self, images, views: int = 1) -> torch.Tensor:
        import torch.nn.functional as F
        from PIL import Image

        if isinstance(images, Image.Image):
            from alexnet.data.pipeline import stored_image

            stored = stored_image(images, self.size, self.card.channels)
            return self.aug.views(torch.from_numpy(stored)[None].float(), views)
        x = images[None] if images.ndim == 3 else images
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        if s != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False
            ).clamp(0, 255)
        return self.aug.views(x, views)  # on the input's device


def load_pretrained(name: str, *, map_location="cpu", progress: bool = True):
    """The ``AlexNet`` of weight set ``name`` in eval mode, with ``.transforms``
    (``Preprocess``) and ``.meta`` (classes, class names, where the weights came from), as
    torchvision's models come with their weights' ``transforms`` and ``meta``."""
    from alexnet.checkpoint import load_model

    model, card = load_model(checkpoint_path(name, progress=progress), map_location)
    model.transforms = Preprocess(card)
    model.meta = {
        "classes": list(card.classes),
        "class_names": list(card.class_names),
        "source": card.source,
    }
    return model
