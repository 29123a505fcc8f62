"""Fine-tuning: a run that starts from trained weights instead of PAPER D2/D3's random ones.

    alexnet train --data my_photos --init IMAGENET1K_V1 --preset finetune
    alexnet train --data my_photos --init runs/earlier --freeze-below fc6

``finetune.source`` (``--init``) is a published weight set by name (``IMAGENET1K_V1``,
``bvlc_alexnet``), a checkpoint, a run directory (its best checkpoint, as everywhere) or a
``.safetensors`` export. What the run keeps of it:

- its network: the layout (``adopt`` sets the ``model.*`` settings from it) and every layer's
  weights; fc8 too where the data has the source's classes (in any order: its rows follow
  the data's), else fc8 is made anew (PAPER D2, D3) for the data's classes;
- its preprocessing contract, so the pretrained features see what they were trained on: the
  stored size and crop, its mean image and scale (torchvision's normalisation is a constant
  mean image and 1/(255 std) folded into conv1; Caffe's BGR mean image is flipped to RGB by
  the converter). The data's own statistics serve only the colour noise (B4), which the
  published weight sets carry none of;
- ``finetune.freeze_below``: the layers before the named one are not trained;
  ``finetune.pretrained_lr_mult``: the pretrained layers' rate as a multiple of
  ``optim.lr`` (a new fc8 takes ``optim.lr`` itself).

The checkpoint's card records where the run started (``init``: the source as given, its
file and SHA-256, what became of fc8, what was frozen).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexnet import config as C
from alexnet.card import ModelCard
from alexnet.model import LEARNED, layer_of
from alexnet.runtime.errors import UserError

# The model settings a source's weights fix (``dropout`` and ``init`` are the run's own:
# neither has weights).
FIXED = (
    "arch",
    "widths",
    "fc_width",
    "lrn",
    "lrn_convention",
    "lrn_per_tower",
    "pool_kernel",
    "activation",
    "towers",
    "conv1_padding",
)


@dataclass(frozen=True)
class Start:
    """Where a run starts: the source's card, its weights (None when resuming: the
    checkpoint has them) and what the run's card records of it (``init``)."""

    card: ModelCard
    weights: dict[str, torch.Tensor] | None
    init: dict[str, Any]

    @classmethod
    def of_checkpoint(cls, ck: dict) -> Start | None:
        """A resumed fine-tuning run: its own card (the source's mean image, scale, crop)."""
        if not ck.get("init"):
            return None
        return cls(ModelCard.from_dict(ck, "checkpoint"), None, dict(ck["init"]))


def _source(source: str, *, say: bool = True) -> tuple[Path, ModelCard]:
    from alexnet.checkpoint import load_card
    from alexnet.interop.weights import resolve_source

    path, note = resolve_source(source)
    if note and say:
        print(f"train: {note}", flush=True)
    return path, load_card(path)


def adopt(cfg: C.TrainConfig) -> tuple[C.TrainConfig, int]:
    """``cfg`` with what the source fixes: its layout (``model.*``), its crop and scale, its
    stored size for a folder of images, no unit-variance scaling (the source has its own);
    and the channels its images have (a folder of images is prepared with them)."""
    path, card = _source(cfg.finetune.source)
    cfg = copy.deepcopy(cfg)
    mc = card.model_config
    for name in FIXED:
        value = mc.get(name)
        setattr(cfg.model, name, tuple(value) if isinstance(value, list) else value)
    cfg.data.crop_size, cfg.data.scale = card.crop_size, card.scale
    cfg.data.unit_variance, cfg.data.image_size = False, card.stored_size
    print(
        f"train: starting from {cfg.finetune.source} ({path}): its {mc['arch']} network and "
        f"its preprocessing ({card.preprocessing})",
        flush=True,
    )
    return cfg, card.channels


def adopted_before(cfg: C.TrainConfig, saved: dict) -> C.TrainConfig:
    """``cfg`` with what a fine-tuning run adopted from its source when it began, as its
    checkpoint's config ``saved`` records it: a run resumes without its source."""
    cfg = copy.deepcopy(cfg)
    for name in FIXED:
        value = saved["model"].get(name)
        setattr(cfg.model, name, tuple(value) if isinstance(value, list) else value)
    for name in ("crop_size", "scale", "unit_variance", "image_size"):
        if name in saved["data"]:
            setattr(cfg.data, name, saved["data"][name])
    return cfg


def check_data(cfg: C.TrainConfig, card: ModelCard, meta: dict) -> None:
    """The data must be stored as the source's images were (size, channels)."""
    h, w = meta["image_size"]
    if (h, w) != (card.stored_size, card.stored_size) or meta["channels"] != card.channels:
        raise UserError(
            f"{cfg.data.root}: {h}x{w} images of {meta['channels']} channel(s), but "
            f"{cfg.finetune.source} was trained on {card.stored_size}x{card.stored_size}x"
            f"{card.channels}: prepare the data with --size {card.stored_size}, or give the "
            "folder of images itself"
        )


def load(cfg: C.TrainConfig) -> Start:
    """The source's card and weights, and the provenance the run records."""
    from alexnet.checkpoint import load_model
    from alexnet.runtime.fileio import file_digest

    path, _ = _source(cfg.finetune.source, say=False)
    network, card = load_model(path)
    init = {
        "source": cfg.finetune.source,
        "file": str(path),
        "sha256": file_digest(path),
        "classes": len(card.classes),
        "freeze_below": cfg.finetune.freeze_below,
        "pretrained_lr_mult": cfg.finetune.pretrained_lr_mult,
    }
    return Start(card, network.state_dict(), init)


def apply(model: torch.nn.Module, start: Start, classes: list[str]) -> dict[str, Any]:
    """Load ``start``'s weights into ``model`` (built for ``classes``); fc8 is kept where
    the classes are the source's (rows reordered to the data's order), else it stays as
    ``model`` made it. A class matches by name, or by the name of the folder a class is read
    from (Fashion-MNIST's 'T-shirt/top' as 'T-shirt_top/'). Returns the run's ``init``."""
    from alexnet.data.sources import folder_name

    state = dict(start.weights)
    src = [folder_name(c) for c in start.card.classes]
    ours = [folder_name(c) for c in classes]
    if sorted(src) == sorted(ours):
        order = torch.tensor([src.index(c) for c in ours])
        state["fc8.weight"], state["fc8.bias"] = (
            state["fc8.weight"][order],
            state["fc8.bias"][order],
        )
        head = "kept: the data has the source's classes"
    else:
        del state["fc8.weight"], state["fc8.bias"]
        head = f"made anew (PAPER D2, D3) for the data's {len(classes)} classes"
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc8.weight", "fc8.bias"}:
        raise UserError(f"{start.init.get('file')}: its weights do not fit the network ({missing})")
    print(f"train: {start.init.get('source', 'the source')}'s weights loaded; fc8 {head}")
    return {**start.init, "head": "kept" if "kept" in head else "new"}


def pretrained_layers(init: dict | None) -> set[str]:
    """The layers whose weights came from the source."""
    if not init:
        return set()
    return set(LEARNED) if init.get("head") == "kept" else set(LEARNED) - {"fc8"}


def freeze(model: torch.nn.Module, below: str) -> list[str]:
    """Stop training the layers before ``below`` (in the order conv1 .. fc8); returns them."""
    if not below:
        return []
    frozen = list(LEARNED[: LEARNED.index(below)])
    for name, p in model.named_parameters():
        if layer_of(name) in frozen:
            p.requires_grad_(False)
    return frozen
