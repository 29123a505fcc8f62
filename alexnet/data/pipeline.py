"""Preparing a list of source images: decode, make RGB, resize (B1), encode, in parallel and
resumable.

Work is cut into fixed chunks of the (deterministic) item list. A worker writes a chunk's
records to ``OUT/.parts/<split>/chunk_NNNNNN.bin`` and then its index, skipped files and
partial statistics to ``chunk_NNNNNN.npz``, each atomically; a chunk is done exactly when its
``.npz`` exists. A killed run therefore resumes at the first unfinished chunk and never
trusts a half-written file. When every chunk is done the chunks are concatenated into
``<split>.bin`` and the index, ``stats.npz`` and finally ``meta.json`` are written.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from alexnet.data import store
from alexnet.data.sources import Item
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_open, atomic_write_json, remove_stale_temps
from alexnet.runtime.progress import Progress


@dataclass(frozen=True)
class RecordFormat:
    """How prepare stores each image (and how predict reads a file as prepare would)."""

    size: int = 256  # PAPER B1: shorter side to 256, central 256x256; 0 keeps the native size
    storage: str = "jpeg"  # "jpeg" or "raw"
    quality: int = 90  # JPEG quality of the stored records
    native: tuple[int, int] | None = None  # (width, height) all images must have when size == 0
    # Turn the image as its EXIF orientation says (a phone photo taken upright is stored on its
    # side with orientation 6): your own photos, predict. ImageNet's preparation keeps the
    # paper's pixels as they are stored (False): ILSVRC's JPEGs were used that way.
    exif: bool = False
    # 3: RGB (G2); 1: grey by PIL's luma, for a network of grey images (a folder of photos
    # read for the Fashion-MNIST demo's network, as predict reads a photo for it)
    channels: int = 3


def load_rgb(data: bytes, settings: RecordFormat) -> tuple[np.ndarray, str]:
    """Decode any image PIL reads into RGB uint8 (H, W, 3) at the stored size.

    PAPER G2: CMYK and greyscale JPEGs, palette/alpha PNGs (also when named .JPEG) all become
    RGB. PAPER B1: the stored image is the central min(w, h) square resized to ``size``,
    which is "shorter side to ``size``, then the central ``size`` x ``size`` crop" computed
    in one resampling step (sub-pixel exact, and no work on pixels that are cropped away).
    Returns the image and a note of what was converted ("JPEG/CMYK", "PNG/P", ...).
    """
    with Image.open(io.BytesIO(data)) as img:
        kind = f"{img.format}/{img.mode}"
        if settings.size:
            # DCT-domain downscaling keeps at least 2x the target resolution, so the
            # antialiased resize below still sees enough pixels (PIL picks a 1/2..1/8 scale).
            img.draft("RGB", (2 * settings.size, 2 * settings.size))
        img.load()
        return as_stored(img, settings), kind


def as_stored(img: Image.Image, settings: RecordFormat) -> np.ndarray:
    """A loaded PIL image as ``prepare`` stores it: turned upright (``settings.exif``), RGB
    (G2), the central square at ``settings.size`` (B1). (H, W, 3) uint8."""
    if settings.exif:
        img = ImageOps.exif_transpose(img)
    rgb = to_rgb8(img)
    w, h = rgb.size
    if settings.size:
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        rgb = rgb.resize((settings.size, settings.size), Image.Resampling.BICUBIC, box=box)
    elif settings.native is not None and (w, h) != tuple(settings.native):
        raise ValueError(f"{w}x{h}, but --size 0 needs every image at {settings.native}")
    return np.asarray(rgb)


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (G2), scaling deep samples instead of clipping them.

    PIL's ``convert("RGB")`` clips 16-bit and float pixels to 0..255, which turns most of
    such an image white. Here: 16-bit samples (modes ``I;16``, ``I;16B``, ...; ``I`` when its
    values fit 16 bits) are divided by 257, mapping 0..65535 onto 0..255 with both ends
    exact; ``I`` beyond 16 bits is read as 32-bit (divided by (2**32 - 1) / 255). Float
    (``F``): a maximum <= 1 is read as the range [0, 1] (times 255), anything else as 0..255
    already; then clipped, NaN as 0. Transparent images (``LA``, ``RGBA``, ``PA``, ``P``/``L``/
    ``RGB`` with a transparent colour) are composited over white, as a page shows them,
    instead of keeping whatever colour the transparent pixels happen to hold. The rest (``1``,
    ``L``, ``P``, ``CMYK``, ``YCbCr``) is PIL's conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I"):
        a = np.asarray(img).astype(np.float64)
        scale = 257.0 if mode != "I" or a.max(initial=0) <= 65535 else (2**32 - 1) / 255
        img = Image.fromarray(np.clip(np.round(a / scale), 0, 255).astype(np.uint8))
    elif mode == "F":
        a = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0)
        a = a * 255 if a.max(initial=0) <= 1 else a
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    elif "A" in mode or "a" in mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 3) RGB as (H, W, ``channels``): itself, or grey by PIL's luma (ITU-R 601-2:
    L = R * 299/1000 + G * 587/1000 + B * 114/1000), which keeps a grey image's pixels."""
    if channels == 3:
        return rgb
    if channels != 1:
        raise ValueError(f"{channels} channels: images are stored with 3 (RGB) or 1 (grey)")
    return np.asarray(Image.fromarray(rgb).convert("L"))[..., None]


def stored_image(item, size: int, channels: int) -> np.ndarray:
    """(C, size, size) uint8 of a path, a PIL image or an (H, W[, C]) uint8 array, exactly as
    ``alexnet prepare folder`` stores an image (PAPER B1, G2; EXIF orientation applied)."""
    fmt = RecordFormat(size=size, exif=True)
    if isinstance(item, Image.Image):
        rgb = as_stored(item, fmt)
    elif isinstance(item, np.ndarray):
        rgb = as_stored(Image.fromarray(item), fmt)
    else:
        rgb, _ = load_rgb(Path(item).read_bytes(), fmt)
    return np.ascontiguousarray(to_channels(rgb, channels).transpose(2, 0, 1))


def describe_failure(e: Exception) -> str:
    """Why an image could not be read, in a few words."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    if isinstance(e, IsADirectoryError):
        return "a folder"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _reason(e: Exception, item: Item) -> str:
    if item.size == 0:
        return "empty file"
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    return f"{type(e).__name__}: {e}"


def _process_chunk(task) -> tuple[int, int, int]:
    parts, chunk_id, items, settings, want_stats = task
    records, lengths, labels, names, bad, kinds = [], [], [], [], [], Counter()
    acc, crcs = None, []
    for item in items:
        try:
            image, kind = load_rgb(item.read(), settings)
        except Exception as e:  # PIL raises many types for broken files; all are reported
            bad.append(f"{item.name}\t{_reason(e, item)}")
            continue
        image = to_channels(image, settings.channels)
        if settings.storage == "jpeg":
            rec = store.encode_jpeg(image, settings.quality)
            image = np.empty_like(image)
            store.decode_jpeg_into(rec, image)  # stats over what training will read
        else:
            rec = image.tobytes()
        if want_stats:
            acc = acc or store.StatsAccumulator(*image.shape)
            acc.add_batch(image[None])
        records.append(rec)
        lengths.append(len(rec))
        crcs.append(store.record_crc(rec))
        labels.append(item.label)
        names.append(item.name)
        if kind != ("JPEG/RGB" if settings.channels == 3 else "JPEG/L"):
            kinds[kind] += 1
    stem = parts / f"chunk_{chunk_id:06d}"
    with atomic_open(stem.with_suffix(".bin"), "wb") as f:
        for rec in records:
            f.write(rec)
    arrays = {
        "lengths": np.array(lengths, np.int64),
        "crc32": np.array(crcs, np.uint32),
        "labels": np.array(labels, np.int64),
        "names": np.array(names, dtype=str),
        "bad": np.array(bad, dtype=str),
        "kinds": np.array(json.dumps(kinds)),
    }
    if acc is not None:
        arrays.update({f"stats_{k}": v for k, v in acc.to_dict().items()})
    with atomic_open(stem.with_suffix(".npz"), "wb") as f:  # the chunk's "done" marker
        np.savez(f, **arrays)
    return chunk_id, len(items), len(bad)


def _plan(parts: Path, items: list[Item], settings: RecordFormat, chunk: int) -> None:
    """Record what the chunks are of; a rerun with other inputs or settings is refused."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.name}\0{it.size}\0{it.label}\n".encode())
    plan = {
        "settings": asdict(settings),
        "chunk": chunk,
        "items": len(items),
        "items_sha256": h.hexdigest(),
    }
    plan["settings"]["native"] = list(settings.native) if settings.native else None
    path = parts / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        defaults = {f.name: f.default for f in fields(RecordFormat)}
        old["settings"] = {**defaults, **old.get("settings", {})}  # settings added since
        if old != plan:
            was = old.get("settings", {})
            changed = [
                f"{k} {was.get(k)} -> {v}" for k, v in plan["settings"].items() if was.get(k) != v
            ]
            if old.get("chunk") != chunk:
                changed.append(f"chunk {old.get('chunk')} -> {chunk}")
            if not changed:
                changed = [f"the images differ ({old.get('items')} then, {len(items)} now)"]
            raise UserError(
                f"{path}: an unfinished prepare with other inputs or settings is here "
                f"({'; '.join(changed)}); use the same ones to resume, or delete "
                f"{parts.parent} to start again"
            )
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan)


def run_chunks(
    out: Path,
    split: str,
    items: list[Item],
    settings: RecordFormat,
    *,
    workers: int,
    chunk: int,
    want_stats: bool,
    after_chunk=None,
) -> Path:
    """Process every unfinished chunk of ``split``; returns the chunk folder."""
    parts = out / ".parts" / split
    _plan(parts, items, settings, chunk)
    remove_stale_temps(parts)  # a killed run's unfinished chunk files
    n_chunks = (len(items) + chunk - 1) // chunk
    todo = [c for c in range(n_chunks) if not (parts / f"chunk_{c:06d}.npz").is_file()]
    done_items = len(items) - sum(len(items[c * chunk : (c + 1) * chunk]) for c in todo)
    tasks = [(parts, c, items[c * chunk : (c + 1) * chunk], settings, want_stats) for c in todo]
    bad = 0
    with Progress(len(items), f"prepare {split}", initial=done_items) as progress:
        if done_items:
            print(
                f"prepare {split}: resuming, {done_items} of {len(items)} images already done",
                flush=True,
            )
        results = _results(tasks, workers, split)
        try:
            for n, n_bad in results:
                bad += n_bad
                progress.update(n, unreadable=bad)
                if after_chunk is not None:
                    after_chunk()
        finally:
            results.close()  # stops the workers now, also when after_chunk raises
    return parts


def _results(tasks: list, workers: int, split: str):
    """(images, unreadable) of each chunk as it finishes, in worker processes.

    A pool of processes from concurrent.futures rather than multiprocessing.Pool: when a worker
    dies (the kernel's OOM killer, a crash in a decoder) multiprocessing.Pool waits forever for
    its chunk, while this pool says it is broken, which becomes one error line here.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from (r[1:] for r in map(_process_chunk, tasks))
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        for future in as_completed([pool.submit(_process_chunk, t) for t in tasks]):
            yield future.result()[1:]
    except BrokenProcessPool:
        raise UserError(
            f"prepare {split}: a worker process died (killed, or out of memory?); the finished "
            "chunks are kept: run the same command again to resume (fewer --workers need "
            "less memory)"
        ) from None
    finally:
        # Stop at once on an error or ^C, as Pool.terminate did: a chunk takes minutes.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def collect_bad(parts: Path) -> list[str]:
    out = []
    for npz in sorted(parts.glob("chunk_*.npz")):
        with np.load(npz) as z:
            out.extend(str(s) for s in z["bad"])
    return out


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _read_chunk(npz: Path) -> tuple[dict, bytes]:
    """A finished chunk's arrays and record bytes, checked against each other."""
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    data = npz.with_suffix(".bin").read_bytes()
    lengths = arrays["lengths"]
    damaged = len(data) != int(lengths.sum())
    starts, view = np.cumsum(lengths) - lengths, memoryview(data)
    crc = [store.record_crc(view[a : a + n]) for a, n in zip(starts, lengths, strict=True)]
    if "crc32" in arrays and not damaged:  # chunks of an older version have none
        damaged = not np.array_equal(arrays["crc32"], np.array(crc, np.uint32))
    if damaged:  # removed, so that the rerun does this chunk again
        npz.unlink()
        npz.with_suffix(".bin").unlink()
        raise UserError(
            f"{npz.with_suffix('.bin')}: did not match its index {npz.name} (damaged on "
            "disk?); both removed: run the same command again to redo that chunk"
        )
    arrays["crc32"] = np.array(crc, np.uint32)
    return arrays, data


def finish_split(out: Path, split: str, parts: Path, want_stats: bool) -> dict:
    """Concatenate the chunks into ``<split>.bin`` + index + files list; returns split meta."""
    offsets, lengths, crcs, labels, names, bad, kinds = [], [], [], [], [], [], Counter()
    acc = None
    pos = 0
    with atomic_open(out / f"{split}.bin", "wb") as f:
        for npz in sorted(parts.glob("chunk_*.npz")):
            z, data = _read_chunk(npz)
            f.write(data)
            n = z["lengths"]
            offsets.append(pos + np.cumsum(n) - n)
            pos += len(data)
            lengths.append(n)
            crcs.append(z["crc32"])
            labels.append(z["labels"])
            names.extend(str(s) for s in z["names"])
            bad.extend(str(s) for s in z["bad"])
            kinds.update(json.loads(str(z["kinds"])))
            if want_stats and "stats_images" in z:
                part = store.StatsAccumulator.from_dict(
                    {k[len("stats_") :]: v for k, v in z.items() if k.startswith("stats_")}
                )
                if acc is None:
                    acc = part
                else:
                    acc.merge(part)
    index = [_cat(offsets), _cat(lengths), _cat(labels), _cat(crcs)]
    store.write_index(out / f"{split}.index.npy", *index)
    with atomic_open(out / f"{split}.files.txt", "w") as f:
        f.write("".join(n + "\n" for n in names))
    if want_stats:
        if acc is None:
            raise UserError(f"{split}: no readable training images")
        store.write_stats(out, acc.finish())
    return {
        "count": len(names),
        "skipped": len(bad),
        "skipped_files": [b.split("\t")[0] for b in bad],
        "converted": dict(kinds),
    }


def default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
