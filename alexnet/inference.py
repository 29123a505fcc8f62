"""One inference path: ``Predictor`` loads a trained network from any source and serves
predict, evaluate, features and figures (and Python):

    from alexnet import Predictor

    p = Predictor.load("IMAGENET1K_V1")   # or bvlc_alexnet, a checkpoint, a run directory
    p.predict(["cat.jpg", pil_image])     # per image: its top 5 (class id, name, probability)
    p.probabilities(["cat.jpg"], views=10) # (N, K): the softmax averaged over B5's ten views
    p.features(["cat.jpg"], "fc7")         # (N, 4096): the vectors of PAPER F3

A source is a published weight set by name (downloaded once, verified, converted:
``alexnet.interop.weights``), a checkpoint file, a run directory (its best checkpoint, as in
every command: ``alexnet.checkpoint.weights_of``) or a ``.safetensors`` export. Its card
(``alexnet.card.ModelCard``) says how images go in: each image is brought to the stored
size as ``alexnet prepare`` stores it (PAPER B1, EXIF orientation applied), then the centre
view or the ten views of B5 minus the mean image (B2). The network runs on ``device``
through the engine ``alexnet.interop.engines`` finds fastest for the job. Outputs that are
not finite (a diverged or damaged network) are refused, never returned.

``add_model_arguments`` gives every command the same options with the same defaults.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.card import ModelCard
from alexnet.data import pipeline
from alexnet.runtime.args import positive_int
from alexnet.runtime.errors import UserError

DEFAULT_BATCH = 64


class NonFiniteOutput(UserError):
    """The network gave NaN or infinite outputs: its weights are damaged or diverged."""


def view_probs(model, aug, images: torch.Tensor, views: int, max_batch: int | None = None):
    """One model's softmax averaged over the views of each image (PAPER B5): (B, K).

    ``max_batch``: forward at most this many views at a time (default: all B*views at once).
    On the CPU ten views of a 100-image batch as one 1,000-image forward ran at less than
    half the images/s of ten 100-view forwards (the activations fall out of cache)."""
    x = aug.views(images, views)  # (B*views, C, crop, crop), image-major
    chunks = x.split(max_batch) if max_batch else (x,)
    probs = torch.softmax(torch.cat([model(c).float() for c in chunks]), dim=1)
    return probs.view(images.shape[0], views, -1).mean(dim=1)


@dataclass
class Unreadable:
    """An input that could not be read as an image (the ``index``-th given), and why."""

    index: int
    item: Any
    reason: str


class Predictor:
    """A trained network ready to use; see the module docstring. ``model``: what runs (the
    engine's wrapper, or the network); ``network``: the ``AlexNet`` itself; ``card``;
    ``path``: the checkpoint file; ``note``: for a run directory, which checkpoint it took."""

    def __init__(
        self, network, model, card: ModelCard, path: Path, *, views=1, batch_size=64, note=None
    ):
        self.network, self.model, self.card, self.path = network, model, card, Path(path)
        self.views, self.batch_size, self.note = views, batch_size, note
        self.device = next(network.parameters()).device
        self.test_views = card.test_views()

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str = "auto",
        backend: str = "auto",
        precision: str = "auto",
        batch_size: int = DEFAULT_BATCH,
        views: int = 1,
        layer: str | None = None,
        inputs: int | None = None,
        local_rank: int = 0,
    ) -> Predictor:
        """``source`` ready on ``device`` (``auto``: CUDA if present; GPU ``local_rank``
        under torchrun). ``batch_size``: images per forward pass (times ``views``);
        ``layer``: serve that layer's activations instead of probabilities; ``inputs``: how
        many images the job holds, if known (a few are served by torch at once, without
        timing the engines: ``engines.choose``)."""
        from alexnet.checkpoint import load_model
        from alexnet.interop import engines
        from alexnet.interop.weights import resolve_source
        from alexnet.runtime.devices import pick_device
        from alexnet.runtime.memory import tune_at_start

        tune_at_start()  # as the CLI does: freed tensors are reused, not given back
        where = pick_device(device, local_rank)  # a missing device is said before any loading
        path, note = resolve_source(source)
        network, card = load_model(path, map_location=where)
        model = engines.for_inference(
            network,
            card,
            path,
            backend,
            batch_size=batch_size * views,
            layer=layer,
            precision=precision,
            inputs=None if inputs is None else inputs * views,
        )
        return cls(network, model, card, path, views=views, batch_size=batch_size, note=note)

    @classmethod
    def of_network(
        cls,
        source: str | Path,
        *,
        device="cpu",
        channels_last: bool = False,
        views: int = 1,
        batch_size: int = DEFAULT_BATCH,
    ) -> Predictor:
        """The network itself, in fp32 and in torch (no engine, no timing): what the lab's
        experiments compare is networks, not engines. ``channels_last``: NHWC activations
        (faster oneDNN convolutions on a CPU)."""
        from alexnet.checkpoint import load_model
        from alexnet.interop.weights import resolve_source

        path, note = resolve_source(source)
        network, card = load_model(path, map_location=device)
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        return cls(network, network, card, path, views=views, batch_size=batch_size, note=note)

    # -------------------------------------------------------------------------- images
    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.classes

    def read(self, images: list) -> tuple[torch.Tensor, list[int], list[Unreadable]]:
        """``images`` (paths, PIL images, (H, W, C) uint8 arrays) as stored images:
        ``(uint8 (N, C, S, S), the index of each one read, what could not be read)``."""
        size, channels = self.card.stored_size, self.card.channels
        out, good, bad = [], [], []
        for i, item in enumerate(images):
            try:
                out.append(pipeline.stored_image(item, size, channels))
                good.append(i)
            except Exception as e:  # noqa: BLE001 - any decoder failure is this input's problem
                bad.append(Unreadable(i, item, pipeline.describe_failure(e)))
        stacked = np.stack(out) if out else np.zeros((0, channels, size, size), np.uint8)
        return torch.from_numpy(stacked), good, bad

    def _batch(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        batch, _, bad = self.read(list(images))
        if bad:
            raise UserError(f"{bad[0].item}: cannot read image ({bad[0].reason})")
        return batch

    # ---------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def probabilities(self, images, views: int | None = None) -> torch.Tensor:
        """(N, K) class probabilities on the CPU, the softmax averaged over the views (PAPER
        B5); ``images``: stored uint8 (N, C, S, S) (``read``) or anything ``read`` takes."""
        batch, views = self._batch(images), views or self.views
        most = getattr(self.model, "max_batch", self.batch_size * views)
        out = []
        for i in range(0, batch.shape[0], self.batch_size):
            x = batch[i : i + self.batch_size].to(self.device)
            out.append(view_probs(self.model, self.test_views, x, views, most).cpu())
        probs = torch.cat(out) if out else torch.zeros(0, self.card.num_classes)
        self.refuse_non_finite(probs, "class probabilities")
        return probs

    @torch.no_grad()
    def features(self, images, layer: str = "fc7", views: int | None = None) -> torch.Tensor:
        """(N, D) activations of ``layer`` (after its ReLU), averaged over the views."""
        batch, views = self._batch(images), views or self.views
        model = self.model if getattr(self.model, "layer", layer) == layer else self.network
        out = []
        for i in range(0, batch.shape[0], self.batch_size):
            x = self.test_views.views(batch[i : i + self.batch_size].to(self.device), views)
            f = model.forward_features(x, layer).flatten(1).float()
            out.append(f.view(-1, views, f.shape[1]).mean(1).cpu())
        feats = torch.cat(out) if out else torch.zeros(0, 0)
        self.refuse_non_finite(feats, f"{layer} activations")
        return feats

    def predict(self, images, top: int = 5, views: int | None = None) -> list[list[dict]]:
        """Per image its ``top`` classes, most probable first: ``class_index``,
        ``class_id``, ``name``, ``probability``."""
        return self.top_k(self.probabilities(images, views), top)

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[dict]]:
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [
                {
                    "class_index": int(i),
                    "class_id": self.card.classes[i],
                    "name": self.card.class_names[i],
                    "probability": float(p),
                }
                for p, i in zip(vs.tolist(), ix.tolist(), strict=True)
            ]
            for vs, ix in zip(values, indices, strict=True)
        ]

    def refuse_non_finite(self, values: torch.Tensor, what: str) -> None:
        if not bool(torch.isfinite(values).all()):
            raise NonFiniteOutput(
                f"{self.path}: the network's {what} are not finite (NaN or infinite): its "
                "weights are damaged or training diverged; use an earlier checkpoint"
            )

    def report(self) -> str | None:
        from alexnet.interop import engines

        return engines.report(self.model)

    def check_data(self, ds, labels: bool = True) -> None:
        """``ds`` must hold images of this network's stored size and channels, and (where
        ``labels``) be labelled with its classes, in its order."""
        card, where = self.card, ds.root
        if labels:
            self.check_labels(ds)
        if ds.channels != card.channels:
            raise UserError(
                f"{where}: {ds.channels}-channel images, {self.path} takes {card.channels}; "
                "give the folder of images itself (it is prepared for the network)"
            )
        if tuple(ds.image_size) != (card.stored_size, card.stored_size):
            raise UserError(
                f"{where}: images stored at {ds.image_size[0]}x{ds.image_size[1]}, {self.path} "
                f"was trained on {card.stored_size}x{card.stored_size} (its mean image); prepare "
                f"the data with --size {card.stored_size}, or give the folder of images itself"
            )

    def check_labels(self, ds) -> None:
        """``ds``'s labels must be this network's classes, in its order."""
        ours, theirs = list(self.card.classes), list(ds.classes)
        if len(ours) != len(theirs):
            raise UserError(f"{ds.root}: {len(theirs)} classes, {self.path} predicts {len(ours)}")
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            raise UserError(
                f"{ds.root}: class {first} is {theirs[first]!r}, but {self.path} calls it "
                f"{ours[first]!r} (give the converter --synsets, or use matching data)"
            )


def card_of(source: str | Path) -> ModelCard:
    """The card of a network as users name it, without loading its weights."""
    from alexnet.checkpoint import load_card
    from alexnet.interop.weights import resolve_source

    return load_card(resolve_source(source)[0])


# ------------------------------------------------------------------------------- commands
def add_model_arguments(
    parser: argparse.ArgumentParser, *, ensemble: bool = False, running: bool = True
) -> None:
    """The options every command that uses a trained network has, with one set of
    defaults: the network (``--checkpoint`` or ``--weights``; repeatable for an ensemble)
    and, where the command runs it (``running``), ``--device``, ``--batch-size``,
    ``--backend`` and ``--precision``."""
    from alexnet.interop.weights import BUILTIN_NAMES

    source = parser.add_argument_group("the network")
    source.add_argument(
        "--checkpoint",
        type=Path,
        action="append" if ensemble else "store",
        help="a checkpoint (.pt), a run directory (its best checkpoint) or a .safetensors "
        "export" + ("; repeat for an ensemble (softmax averaged, PAPER F4)" if ensemble else ""),
    )
    source.add_argument(
        "--weights",
        metavar="NAME",
        action="append" if ensemble else "store",
        help=f"published weights by name ({BUILTIN_NAMES}; docs/WEIGHTS.md): downloaded "
        "once into $ALEXNET_HOME (default ~/.cache/alexnet), verified and converted",
    )
    if not running:
        return
    run = parser.add_argument_group("how it runs")
    run.add_argument(
        "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N"
    )
    run.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH,
        help=f"images per forward pass (default {DEFAULT_BATCH}; times --views)",
    )
    from alexnet.interop.engines import add_backend_argument

    add_backend_argument(run)


def add_views_argument(parser: argparse.ArgumentParser, default: int = 1) -> None:
    parser.add_argument(
        "--views",
        type=int,
        choices=(1, 10),
        default=default,
        help="1: the centre crop; 10: the four corners, the centre and their reflections, "
        f"softmax averaged (PAPER B5) (default {default})",
    )


def sources_of(args: argparse.Namespace) -> list[str | Path]:
    """The networks ``--checkpoint`` and ``--weights`` name (one, or an ensemble's)."""

    def listed(value) -> list:
        return [] if value is None else list(value) if isinstance(value, list) else [value]

    found = listed(args.checkpoint) + listed(args.weights)
    if not found:
        raise UserError("give the network: --checkpoint PATH or --weights NAME")
    return found


def single_source(args: argparse.Namespace) -> str | Path:
    found = sources_of(args)
    if len(found) > 1:
        raise UserError("give one network: --checkpoint PATH or --weights NAME, not both")
    return found[0]


def load_from_args(args: argparse.Namespace, source, **kwargs: Any) -> Predictor:
    """``Predictor.load`` of ``source`` with the command's options; says on stderr which
    checkpoint a run directory meant."""
    p = Predictor.load(
        source,
        device=getattr(args, "device", "cpu"),
        backend=getattr(args, "backend", "torch"),
        precision=getattr(args, "precision", "auto"),
        batch_size=getattr(args, "batch_size", DEFAULT_BATCH),
        views=getattr(args, "views", 1),
        **kwargs,
    )
    if p.note:
        print(p.note, file=sys.stderr, flush=True)
    return p
