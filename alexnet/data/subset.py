"""Random subsets of a split: the same images for every run that asks with the same seed."""

from __future__ import annotations

import numpy as np

from alexnet.runtime.errors import UserError


def subset_indices(labels, n: int | None, seed: int) -> np.ndarray:
    """``n`` of the records drawn at random (all when ``n`` is None or too large), sorted."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise UserError(f"a subset of {n} images: must be at least 1")
    return np.sort(np.random.default_rng(seed).choice(len(labels), n, replace=False))
