"""The model card: what a trained network needs to be used, apart from its weights.

A checkpoint file is one dict (``alexnet.checkpoint``); ``ModelCard`` is the typed part of
it that every command using a network reads, as torchvision's ``Weights.meta`` /
``transforms()`` and timm's ``PretrainedCfg`` are for theirs:

    model_config  ``AlexNet(**model_config)`` rebuilds the network
    classes       the class ids, in the order of the network's outputs (WNIDs for ImageNet)
    class_names   what people call them ("tench, Tinca tinca")
    data_stats    the training split's mean image (C, H, W, 0-255 units, PAPER B2) and its
                  RGB PCA (B4): the mean image's size is the stored size images are brought
                  to (PAPER B1), and its crop the network's input
    crop_size, scale   the test views: ``crop_size`` squares minus the mean image, times
                  ``scale`` (1 in the paper; torchvision's normalisation folds to 1/(255 std))
    source        for imported weights: their format, file, address, licence, published
                  accuracy and the preprocessing their publisher used
    init          for a fine-tuned run: the weights it started from (name or path, SHA-256),
                  whether fc8 was kept or made anew, what was frozen
    data          the identity of the training data (classes, size, images)
    epoch, step   where the training stood when the weights were saved

``ModelCard.from_dict`` reads any checkpoint dict (every format this package has written),
``to_dict`` gives the keys a checkpoint file holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from alexnet.runtime.errors import UserError

# The training settings kept in a checkpoint's "augment" beside the test views' two.
TRAIN_AUGMENT = ("pad", "flip", "pca_std", "pca_scale")


@dataclass(frozen=True)
class ModelCard:
    model_config: Mapping[str, Any]
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    data_stats: Mapping[str, torch.Tensor]
    crop_size: int
    scale: float = 1.0
    train_augment: Mapping[str, Any] = field(default_factory=dict)
    source: Mapping[str, Any] | None = None
    init: Mapping[str, Any] | None = None
    data: Mapping[str, Any] | None = None
    epoch: int | None = None
    step: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.data_stats["mean"].shape[0])

    @property
    def stored_size(self) -> int:
        """The side images are brought to before the views are cut (PAPER B1: 256)."""
        return int(self.data_stats["mean"].shape[-1])

    @property
    def preprocessing(self) -> str:
        """In words: what an image goes through on its way into the network."""
        if self.source and self.source.get("preprocessing"):
            return str(self.source["preprocessing"])
        s, c = self.stored_size, self.crop_size
        scale = f", times {self.scale:.4g}" if self.scale != 1.0 else ""
        return (
            f"shorter side to {s} and the central {s}x{s} (PAPER B1); {c}x{c} views minus the "
            f"training mean image (B2){scale}"
        )

    def test_views(self):
        """The ``DeviceAugment`` of the test views: centre (or ten) crops minus the mean
        image, times the scale, exactly as training validated (PAPER B2, B5)."""
        from alexnet.data.augment import DeviceAugment

        return DeviceAugment(self.data_stats, self.crop_size, train=False, scale=self.scale)

    def to_dict(self) -> dict[str, Any]:
        """The keys of a checkpoint file that hold the card (plain data and tensors only, so
        ``torch.load(weights_only=True)`` reads them)."""
        return {
            "model_config": dict(self.model_config),
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "data_stats": dict(self.data_stats),
            "augment": {"crop_size": self.crop_size, "scale": self.scale, **self.train_augment},
            "source": dict(self.source) if self.source else None,
            "init": dict(self.init) if self.init else None,
            "data": dict(self.data) if self.data else None,
            "epoch": self.epoch,
            "step": self.step,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "checkpoint") -> ModelCard:
        """The card of a checkpoint dict; a ``UserError`` naming ``where`` if it has none."""
        config = d.get("model_config")
        stats = d.get("data_stats") or {}
        if not isinstance(config, Mapping) or "num_classes" not in config:
            raise UserError(f"{where}: no model_config: not a checkpoint of this package")
        if "mean" not in stats:
            raise UserError(f"{where}: no mean image (data_stats): cannot preprocess inputs")
        k = int(config["num_classes"])
        classes = [str(c) for c in d.get("classes") or range(k)]
        names = [str(n) for n in d.get("class_names") or classes]
        if len(classes) != k or len(names) != k:
            raise UserError(f"{where}: {len(classes)} classes listed for {k} network outputs")
        stats = {key: torch.as_tensor(v) for key, v in stats.items()}
        augment = dict(d.get("augment") or {})
        return cls(
            model_config=dict(config),
            classes=tuple(classes),
            class_names=tuple(names),
            data_stats=stats,
            crop_size=int(augment.get("crop_size") or stats["mean"].shape[-1]),
            scale=float(augment.get("scale", 1.0)),
            train_augment={key: augment[key] for key in TRAIN_AUGMENT if key in augment},
            source=d.get("source") or None,
            init=d.get("init") or None,
            data=d.get("data") or None,
            epoch=d.get("epoch"),
            step=d.get("step"),
        )
