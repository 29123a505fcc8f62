"""Argument types shared by the commands: a bad value is one clear argparse error line
(``alexnet predict: error: argument --batch-size: ...``) and exit status 2, not a traceback
later."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def natural_int(text: str) -> int:
    """An integer >= 0 (worker counts, where 0 means in this process)."""
    value = positive_int(text) if text.strip() != "0" else 0
    return value


def output_file(text: str) -> Path:
    """A file a command will write, checked when the arguments are read (not after the work,
    whose result would then be lost): not an existing folder, under a folder (made if
    missing) that is not a file and may be written to."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the name of a file in it")
    existing = next((p for p in path.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, so {text} cannot be made")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing}: no permission to write there")
    return path
