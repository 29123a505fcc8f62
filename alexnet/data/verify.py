"""``alexnet prepare verify OUT``: check a prepared directory against its index.

Checks meta.json, the record count of every split, that the records tile ``<split>.bin``
exactly (offset[i] + length[i] == offset[i+1], the last ends at the file's end), labels in
range, the statistics' shapes, and decodes every record (``--quick``: 500 chosen at random
per split) to the stored shape.
"""

from __future__ import annotations

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


def _decode_all(split: str, meta: dict, index, data, chosen: np.ndarray) -> list[str]:
    h, w = meta["image_size"]
    shape = (h, w, meta["channels"])

    def check(i: int) -> str | None:
        off, n = int(index["offset"][i]), int(index["length"][i])
        if meta["storage"] == "raw":
            return None  # layout checks above cover raw records entirely
        try:
            store.decode_jpeg_into(data[off : off + n], np.empty(shape, np.uint8))
        except Exception as e:  # any failure to decode is a finding, not a crash
            return f"{split}: record {i}: {type(e).__name__}: {e}"
        return None

    problems = []
    with Progress(len(chosen), f"verify {split}") as progress, ThreadPoolExecutor(4) as pool:
        for start in range(0, len(chosen), 512):
            block = chosen[start : start + 512]
            problems += [p for p in pool.map(check, block) if p]
            progress.update(len(block))
    return problems


def verify(root: str | Path, *, quick: bool = False, seed: int = 0) -> int:
    root = Path(root)
    meta = store.read_meta(root)
    stats = store.read_stats(root)
    c = meta["channels"]
    h, w = meta["image_size"]
    problems = []
    expect = {"mean": (c, h, w), "eigvals": (c,), "eigvecs": (c, c)}
    for key, shape in expect.items():
        if key not in stats or stats[key].shape != shape:
            problems.append(f"stats.npz: {key} missing or not {shape}")
    if len(meta["class_names"]) != len(meta["classes"]):
        problems.append("meta.json: class_names and classes differ in length")
    rng = np.random.default_rng(seed)
    for split in meta["splits"]:
        index, data = store.open_split(root, split)
        found = _check_layout(root, split, meta, index, data)
        problems += found
        if found:
            continue
        chosen = np.arange(len(index))
        if quick and len(index) > 500:
            chosen = np.sort(rng.choice(len(index), 500, replace=False))
        problems += _decode_all(split, meta, index, data, chosen)
        print(f"{root}: {split}: {len(index)} records, {len(chosen)} checked", flush=True)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"{root}: verify failed: " + "; ".join(problems[:5]) + more)
    print(f"{root}: OK")
    return 0
