"""Shared material for the evaluation tests: a generated prepared dataset whose classes differ
visibly (each class its own colour and stripe direction), a tiny checkpoint trained on it by
``alexnet.train.train``, and a checkpoint whose fc8 is set so every prediction is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_CLASSES = 8
CLASSES = [f"n{i:08d}" for i in range(N_CLASSES)]
NAMES = ["red", "orange", "yellow", "green", "teal", "blue", "purple", "grey"]
COLOURS = np.array(
    [
        [200, 40, 40],
        [230, 140, 30],
        [220, 210, 40],
        [40, 180, 60],
        [40, 170, 170],
        [50, 60, 210],
        [150, 50, 190],
        [128, 128, 128],
    ],
    np.float32,
)


def class_images(rng: np.random.Generator, labels: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, size, size, 3) uint8: the class colour, shaded by stripes at a class-specific angle
    (so flips and crops change the image but not its class)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        angle = np.pi * c / N_CLASSES
        stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) / 2.0 + rng.uniform(0, 6.3))
        img = COLOURS[c] * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_dataset(root: Path, n_train: int = 64, n_val: int = 21, seed: int = 0) -> Path:
    from alexnet.data import prepare_arrays

    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % len(CLASSES)
        rng.shuffle(labels)
        splits[split] = (class_images(rng, labels), labels)
    return prepare_arrays(root, splits, CLASSES, NAMES, dataset="evalkit")


def train_tiny(data: Path, out_dir: Path, steps: int = 8) -> Path:
    """A small-arch network trained for a few steps by the real training code; returns the
    run directory (checkpoints/best.pt, metrics.jsonl)."""
    from alexnet import config as C
    from alexnet.train import train

    cfg = C.preset(
        "quick",
        **{
            "data.root": str(data),
            "model.widths": (8, 16, 16, 16, 8),
            "model.fc_width": 32,
            "model.init": "none",  # torch's: quick's He init diverges on raw 0-255 pixels here
            "optim.batch_size": 16,
            "optim.lr": 0.05,
            "schedule.epochs": 2,
            "schedule.milestones": (1,),
            "run.out_dir": str(out_dir),
            "run.name": "tiny",
            "run.device": "cpu",
            "run.precision": "fp32",
            "run.max_steps": steps,
            "run.progress_interval_s": 1e9,
        },
    )
    result = train(cfg)
    return Path(result["run_dir"])


def known_checkpoint(path: Path, bias: list[float], seed: int = 0) -> Path:
    """A small-arch checkpoint whose output ignores the image: fc8's weights are zero, so the
    logits are ``bias`` for every input and every view."""
    from alexnet.model import AlexNet
    from alexnet.runtime.fileio import atomic_torch_save

    torch.manual_seed(seed)
    model = AlexNet(len(bias), arch="small", widths=(8, 16, 16, 16, 8), fc_width=16)
    with torch.no_grad():
        model.fc8.weight.zero_()
        model.fc8.bias.copy_(torch.tensor(bias))
    stats = {
        "mean": torch.full((3, 32, 32), 120.0),
        "eigvals": torch.zeros(3),
        "eigvecs": torch.eye(3),
    }
    ckpt = {
        "model": model.state_dict(),
        "model_config": model.config,
        "classes": CLASSES[: len(bias)],
        "class_names": NAMES[: len(bias)],
        "data_stats": stats,
        "augment": {"crop_size": 32, "scale": 1.0},
        "config": {},
    }
    atomic_torch_save(path, ckpt)
    return path


_RUNS: dict[str, Path] = {}


def tiny_run() -> tuple[Path, Path]:
    """(dataset, run directory), made once per test process and removed at exit: the tiny
    training run costs a few seconds, and several test modules read it."""
    if not _RUNS:
        import atexit
        import shutil
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="alexnet-evalkit-"))
        atexit.register(shutil.rmtree, base, True)
        _RUNS["data"] = make_dataset(base / "data")
        _RUNS["run"] = train_tiny(_RUNS["data"], base / "runs")
    return _RUNS["data"], _RUNS["run"]
