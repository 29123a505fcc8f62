"""Helpers for the tests that train: a tiny learnable dataset and a config that trains on it
in seconds (used by test_train, test_train_kill, test_checkpoint, test_distributed,
test_devices)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alexnet import config as C


def tiny_data(root: Path, n_train: int = 64, n_val: int = 32, size: int = 16) -> Path:
    """Four classes told apart by a bright band and a colour: learnable in a few steps."""
    if (root / "meta.json").exists():
        return root
    from alexnet.data import prepare_arrays

    rng = np.random.default_rng(0)

    def split(n: int):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 60, (n, size, size, 3))
        band = size // 4
        for c in range(4):
            x[y == c, :, :, c % 3] += 90
            x[y == c, c * band : (c + 1) * band, :, :] += 100
        return x.clip(0, 255).astype(np.uint8), y

    return prepare_arrays(root, {"train": split(n_train), "val": split(n_val)}, list("abcd"))


def tiny_config(data: Path, out: Path, **overrides) -> C.TrainConfig:
    """The small arch at 16 px with a handful of kernels; 4 steps per epoch, fp32."""
    settings = {
        "data.root": str(data),
        "run.out_dir": str(out),
        "run.name": "run",
        "optim.batch_size": 16,
        "optim.lr": 0.02,
        "model.widths": (8, 16, 16, 16, 16),
        "model.fc_width": 32,
        "model.init": "none",
        "data.unit_variance": False,  # raw 0-255 inputs, as these tests were made on
        "schedule.kind": "steps",
        "schedule.epochs": 2,
        "schedule.milestones": (1,),
        "run.precision": "fp32",
        "run.deterministic": True,
        "run.log_every": 1,
        "run.export": False,
        **overrides,
    }
    return C.preset("quick", **settings)
