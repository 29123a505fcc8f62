"""End to end: the prepared records through ``make_loader`` (CPU decoding, in worker
processes or in this one) or nvJPEG, ``DeviceAugment`` (PAPER B2-B4) and a training step,
against the same step alone on a batch already on the device, timed side by side
(``alexnet.runtime.timing``). ``alexnet bench`` (``--no-end-to-end`` leaves it out) and the
GPU check's step 4 (alexnet/bench/gpu_check.py) both measure this."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from alexnet.runtime.errors import UserError


def synthetic_dataset(root: str | Path, arch: str, n: int) -> Path:
    """A small prepared dataset of random images (stored at 256, PAPER B1; 32 for small)."""
    import numpy as np

    from alexnet.data import prepare_arrays

    side = 32 if arch == "small" else 256
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    return prepare_arrays(root, {"train": (images, labels)}, [str(i) for i in range(10)])


def _batches(ds, loader, decoder):
    """Endless uint8 batches: the loader's (CPU decoding), or the device decoder's."""
    for epoch in range(10**6):
        loader.set_epoch(epoch)
        if decoder is None:
            yield from loader
        else:
            for idx in loader.batches():
                yield decoder(ds.records(idx)), ds.labels[torch.from_numpy(idx)]


def measure(
    data: str | Path,
    settings,
    device,
    batch: int,
    *,
    arch: str = "paper",
    workers: int = 0,
    nvjpeg: bool = False,
    rounds: int = 3,
    steps: int = 10,
    warmup: int = 5,
) -> dict:
    """Images/s of the loader-fed training step (``settings``: precision, layout, optimizer;
    alexnet/bench/speed.py) and of the same step alone, and their ratio."""
    from alexnet.bench.steps import alternate, make_steps
    from alexnet.data import DeviceAugment, PreparedDataset, make_loader
    from alexnet.data.decode import DeviceDecoder
    from alexnet.model import AlexNet
    from alexnet.runtime import devices

    device = torch.device(device)
    ds = PreparedDataset(data, "train")
    if len(ds) < batch:
        raise UserError(f"{data}: {len(ds)} training images, fewer than one batch of {batch}")
    decoder = DeviceDecoder(device, ds.record_shape) if nvjpeg else None
    if decoder is not None and decoder.backend != "nvjpeg":
        return {"unavailable": decoder.reason}
    model = AlexNet(len(ds.classes), arch=arch, in_channels=ds.channels)
    crop = model.input_size
    pad = max(0, math.ceil((crop - min(ds.image_size)) / 2)) + (4 if arch == "small" else 0)
    aug = DeviceAugment(ds.stats, crop, train=True, pad=pad, channels_last=settings.channels_last)
    alone, _, train_batch, _ = make_steps(model, settings, device, batch, crop, len(ds.classes))
    loader = make_loader(
        ds,
        batch,
        shuffle=True,
        seed=0,
        drop_last=True,
        num_workers=0 if nvjpeg else workers,
        pin_memory=devices.pin_memory(device),
    )
    batches, gen = _batches(ds, loader, decoder), devices.generator(device, 0)

    def fed() -> None:
        images, labels = next(batches)
        images = devices.to_device(images, device)
        train_batch(aug(images, gen), devices.to_device(labels, device))

    try:
        for _ in range(warmup):  # cuDNN's autotuner, the workers' first batches
            alone()
            fed()
        rates = alternate({"model": alone, "e2e": fed}, rounds, steps, batch, device)
    finally:
        batches.close()
        loader.close()
    return {
        "batch": batch,
        "workers": loader.num_workers,
        "decode": decoder.backend if decoder else "cpu",
        "optimizer": settings.optimizer,
        "end_to_end_ips": rates["e2e"],
        "model_only_ips": rates["model"],
        "fraction": rates["e2e"] / rates["model"],
    }


def on_synthetic_data(arch: str, settings, device, batch: int, **kwargs) -> dict:
    """``measure`` on eight batches of random images, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="alexnet-e2e-") as tmp:
        data = synthetic_dataset(Path(tmp) / "data", arch, 8 * batch)
        return measure(data, settings, device, batch, arch=arch, **kwargs)
