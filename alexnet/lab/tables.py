"""What the experiments report: mean and standard deviation over seeds, and the table (Markdown
and JSON) each experiment writes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from alexnet.runtime.fileio import atomic_write_json, atomic_write_text


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def fmt_ms(values, scale: float = 1.0, digits: int = 2) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_outputs(out: Path, name: str, results: dict, table: list[str]) -> None:
    """``out/<name>.json`` and ``out/<name>.md`` (the table, also printed); the figure
    ``out/<name>.png`` is the experiment's own."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", results)
    atomic_write_text(out / f"{name}.md", "\n".join(table) + "\n")
    print("\n".join(table))
    print(f"\nwrote {out / (name + '.md')}, {out / (name + '.json')}, {out / (name + '.png')}")
