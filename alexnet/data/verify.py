"""``alexnet prepare verify OUT``: check a prepared directory against its index.

Checks meta.json, the record count of every split, that the records tile ``<split>.bin``
exactly (offset[i] + length[i] == offset[i+1], the last ends at the file's end), labels in
range, the statistics' shapes, the CRC-32 of every record (format version 2; a directory
prepared before has none, and verify says so), and decodes every JPEG record (``--quick``:
500 chosen at random per split) to the stored shape. Leftovers of an interrupted prepare
(temp files, ``.parts``) are findings too: they are on disk and not part of the dataset.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alexnet.data import store
from alexnet.runtime.errors import UserError
from alexnet.runtime.progress import Progress


def _check_layout(root: Path, split: str, meta: dict, index, data) -> list[str]:
    problems = []
    count = meta["splits"][split]["count"]
    if len(index) != count:
        problems.append(f"{split}: {len(index)} records in the index, meta.json says {count}")
    if len(index):
        off, n = np.asarray(index["offset"]), np.asarray(index["length"])
        ends = off + n
        if off[0] != 0 or np.any(off[1:] != ends[:-1]):
            problems.append(f"{split}: records do not tile {split}.bin (gaps or overlaps)")
        if int(ends[-1]) != len(data):
            problems.append(f"{split}.bin: {len(data)} bytes, the index ends at {int(ends[-1])}")
        lab = np.asarray(index["label"])
        if lab.min() < 0 or lab.max() >= len(meta["classes"]):
            problems.append(f"{split}: labels outside 0..{len(meta['classes']) - 1}")
        h, w = meta["image_size"]
        if meta["storage"] == "raw" and np.any(n != h * w * meta["channels"]):
            problems.append(f"{split}: raw records of the wrong length")
    return problems


def _check_records(split: str, meta: dict, index, data, decode: np.ndarray):
    """(record, finding) for every record whose checksum is wrong or (if in ``decode``) that
    does not decode to the stored shape; and the seconds spent on checksums and decoding
    (summed over threads: what the load-time check costs against decoding)."""
    h, w = meta["image_size"]
    shape = (h, w, meta["channels"])
    crcs = np.asarray(index["crc32"]) if store.has_checksums(index) else None
    todo = np.arange(len(index)) if crcs is not None else decode
    wanted = np.zeros(len(index), bool)
    wanted[decode] = meta["storage"] == "jpeg"  # raw records: the layout checks cover them
    spent = []

    def check(i: int) -> tuple | None:
        off, n = int(index["offset"][i]), int(index["length"][i])
        record = data[off : off + n]
        t0 = time.perf_counter()
        got = store.record_crc(record) if crcs is not None else None
        t1 = time.perf_counter()
        spent.append((t1 - t0, 0.0))
        if got is not None and got != int(crcs[i]):
            return i, f"checksum mismatch (CRC-32 {got:08x}, the index says {int(crcs[i]):08x})"
        if wanted[i]:
            try:
                store.decode_jpeg_into(record, np.empty(shape, np.uint8))
            except Exception as e:  # any failure to decode is a finding, not a crash
                return i, f"does not decode ({type(e).__name__}: {e})"
            spent.append((0.0, time.perf_counter() - t1))
        return None

    found = []
    with Progress(len(todo), f"verify {split}") as progress, ThreadPoolExecutor(4) as pool:
        for start in range(0, len(todo), 512):
            block = todo[start : start + 512]
            found += [p for p in pool.map(check, block) if p]
            progress.update(len(block))
    return found, np.sum(spent, axis=0) if spent else np.zeros(2)


def _leftovers(root: Path) -> list[str]:
    stale = sorted(root.glob(".*.tmp"))
    found = [f"{p.name} ({p.stat().st_size} bytes)" for p in stale if p.is_file()]
    if (root / ".parts").exists():
        found.append(".parts/")
    if not found:
        return []
    return [
        f"leftovers of an interrupted prepare: {', '.join(found[:3])}; run the same prepare "
        "command again to remove them"
    ]


def verify(root: str | Path, *, quick: bool = False, seed: int = 0) -> int:
    root = Path(root)
    meta = store.read_meta(root)
    c = meta["channels"]
    h, w = meta["image_size"]
    problems = _leftovers(root)
    for name, want in meta.get("file_crc32", {}).items():  # absent before format version 2
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif f"{store.file_crc(path):08x}" != want:
            problems.append(f"{path}: checksum mismatch (damaged or changed since prepare)")
    if "train" in meta["splits"]:  # a folder of images prepared only to be evaluated has none
        stats = store.read_stats(root)  # the training split's (B2, B4)
        expect = {"mean": (c, h, w), "eigvals": (c,), "eigvecs": (c, c)}
        for key, shape in expect.items():
            if key not in stats or stats[key].shape != shape:
                problems.append(f"stats.npz: {key} missing or not {shape}")
    if len(meta["class_names"]) != len(meta["classes"]):
        problems.append("meta.json: class_names and classes differ in length")
    rng = np.random.default_rng(seed)
    for split in meta["splits"]:
        try:
            index, data = store.open_split(root, split)
        except UserError as e:  # truncated or unreadable: a finding; the other splits go on
            problems.append(str(e))
            continue
        found = _check_layout(root, split, meta, index, data)
        problems += found
        if found:
            continue
        chosen = np.arange(len(index))
        if quick and len(index) > 500:
            chosen = np.sort(rng.choice(len(index), 500, replace=False))
        bad, (t_crc, t_decode) = _check_records(split, meta, index, data, chosen)
        problems += [f"{store.record_label(root, split, i)}: {why}" for i, why in bad[:5]]
        problems += [f"{split}.bin: record {i}: {why}" for i, why in bad[5:]]  # counted
        if store.has_checksums(index):
            sums = f"all {len(index)} checksums checked ({t_crc:.2f} s)"
        else:
            sums = "no checksums (prepared before format version 2: prepare again to store them)"
        decoded = f"{len(chosen)} decoded ({t_decode:.2f} s), " if meta["storage"] == "jpeg" else ""
        print(f"{root}: {split}: {len(index)} records, {decoded}{sums}", flush=True)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"{root}: verify failed: " + "; ".join(problems[:5]) + more)
    print(f"{root}: OK")
    return 0
