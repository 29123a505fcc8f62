"""Argument types shared by the commands: a bad value is one clear argparse error line
(``alexnet predict: error: argument --batch-size: ...``) and exit status 2, not a traceback
later."""

from __future__ import annotations

import argparse


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
