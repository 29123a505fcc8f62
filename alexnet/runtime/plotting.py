"""matplotlib for files only: figures drawn without a display and written atomically as PNG
(alexnet/figures.py, the experiments' charts in alexnet/lab)."""

from __future__ import annotations

from pathlib import Path

from alexnet.runtime.fileio import atomic_open


def pyplot():
    """matplotlib's pyplot, drawing into files only (no display needed, no window opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: Path, *, tight: bool = True) -> None:
    """Write ``fig`` to ``out`` as PNG atomically (``tight``: cropped to what is drawn) and
    close it."""
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=fig.dpi, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
