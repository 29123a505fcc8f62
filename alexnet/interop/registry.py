"""The published AlexNet weight sets, with what each publisher says about them.

Every fact here has a source named beside it. A checksum that no one publishes is ``None``,
never a guess: such a file is checked by its size (when known), by being readable in its
format, and by a SHA-256 computed on its first download and pinned in the cache
(``alexnet.interop.weights``). See docs/WEIGHTS.md for the table.

Not listed: CaffeNet (``bvlc_reference_caffenet``, 57.4 / 80.4 % centre crop per its readme)
pools before it normalises, which is not the paper's network (PAPER A8, A9); the converter
refuses that order rather than run a different model under the paper's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from alexnet.runtime.errors import UserError


@dataclass(frozen=True)
class Download:
    """One published file. ``sha256`` / ``sha1``: the full hex digest, or None if unpublished."""

    url: str
    sha256: str | None = None
    sha1: str | None = None
    size: int | None = None  # bytes

    @property
    def filename(self) -> str:
        return Path(urlsplit(self.url).path).name


@dataclass(frozen=True)
class WeightSet:
    name: str
    format: str  # "torchvision" or "caffe": the importer in alexnet.interop.convert
    weights: Download
    layout: str
    preprocessing: str  # the contract the publisher trained and evaluated with
    classes: str  # where the class ids and names come from
    license: str
    top1: float  # accuracy in percent, as the publisher reports it
    top5: float
    protocol: str  # how those figures were measured
    accuracy_source: str
    # An archive beside the weights (Caffe's ILSVRC-12 aux data), the members used from it
    # and their SHA-1 where known; ``mean`` and ``synsets`` name members of it. ``synsets``
    # None: the bundled ILSVRC-2012 list (ilsvrc2012_synset_words.txt).
    aux: Download | None = None
    members: dict[str, str | None] = field(default_factory=dict)
    mean: str | None = None
    synsets: str | None = None
    aliases: tuple[str, ...] = ()


CAFFE_AUX = Download(
    # Caffe's data/ilsvrc12/get_ilsvrc_aux.sh; no checksum or size is published for it.
    url="http://dl.caffe.berkeleyvision.org/caffe_ilsvrc12.tar.gz",
)

BUILTIN: tuple[WeightSet, ...] = (
    WeightSet(
        name="IMAGENET1K_V1",
        aliases=("DEFAULT", "AlexNet_Weights.IMAGENET1K_V1", "torchvision"),
        format="torchvision",
        weights=Download(
            url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            # torchvision publishes the first 8 hex digits in the name (torch.hub's
            # check_hash convention); the full digest and size are those recorded by several
            # independent users of this file, and agree with that prefix and with
            # torchvision's "_file_size": 233.087 (MiB).
            sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
            size=244408911,
        ),
        layout="owt: torchvision's alexnet, the 'one weird trick' variant (64-192-384-256-256 "
        "kernels, no LRN, no groups, dropout before fc6 and fc7; PAPER H2)",
        preprocessing="RGB; resize shorter side to 256, centre crop 224; pixels scaled to "
        "[0, 1], minus mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225)",
        classes="ILSVRC-2012's 1000 synsets in sorted WordNet-id order (bundled list; "
        "torchvision's categories are in the same order)",
        license="BSD-3-Clause (torchvision); trained on ImageNet, whose terms of access "
        "allow non-commercial research and educational use",
        top1=56.522,
        top5=79.066,
        protocol="ILSVRC-2012 val, one centre crop: resize 256 (bilinear), crop 224",
        accuracy_source="torchvision AlexNet_Weights.IMAGENET1K_V1 meta['_metrics']",
    ),
    WeightSet(
        name="bvlc_alexnet",
        aliases=("caffe", "BVLC_ALEXNET"),
        format="caffe",
        weights=Download(
            url="http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel",
            # the model zoo readme (Caffe's models/bvlc_alexnet/readme.md); no size published
            sha1="9116a64c0fbe4459d18f4bb6b56d647b63920377",
        ),
        layout="paper: grouped conv2/4/5, LRN before pooling (k=1 across all maps), 227 px "
        "crops with unpadded conv1 (PAPER H2)",
        preprocessing="BGR, 0-255; images warped to 256x256, centre crop 227, minus the "
        "ILSVRC-12 mean image (imagenet_mean.binaryproto)",
        classes="synset_words.txt from Caffe's ILSVRC-12 aux data (sorted WordNet ids)",
        license="unrestricted use (the model zoo readme; earlier versions of it said "
        "non-commercial, after ImageNet's terms of access)",
        top1=57.1,
        top5=80.2,
        protocol="ILSVRC-2012 val, 'using just the center crop' (227 of the 256x256 image)",
        accuracy_source="Caffe models/bvlc_alexnet/readme.md (PAPER H2)",
        aux=CAFFE_AUX,
        # The mean file's SHA-1 as recorded by MXNet's Caffe model list and other users of
        # the aux data; the word list has no published checksum.
        members={
            "imagenet_mean.binaryproto": "63e4652e656abc1e87b7a8339a7e02fca63a2c0c",
            "synset_words.txt": None,
        },
        mean="imagenet_mean.binaryproto",
        synsets="synset_words.txt",
    ),
)

ENV_REGISTRY = "ALEXNET_WEIGHTS_REGISTRY"


def _from_json(d: dict, where: str) -> WeightSet:
    known = {f.name for f in fields(WeightSet)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{where}: unknown weight-set field(s) {', '.join(unknown)}")
    try:
        d = dict(d)
        d["weights"] = Download(**d["weights"])
        if d.get("aux"):
            d["aux"] = Download(**d["aux"])
        d["aliases"] = tuple(d.get("aliases", ()))
        return WeightSet(**d)
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: not a weight-set entry ({e})") from None


def extra_entries(path: str | None) -> list[WeightSet]:
    """Entries from a JSON list (``$ALEXNET_WEIGHTS_REGISTRY``): other weight sets, or small
    stand-ins for tests. They may not reuse a built-in name, so they never replace one."""
    if not path:
        return []
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} (${ENV_REGISTRY}): cannot read a JSON list ({e})") from None
    if not isinstance(items, list):
        raise UserError(f"{path} (${ENV_REGISTRY}): expected a JSON list of entries")
    return [_from_json(item, f"{path} entry {i}") for i, item in enumerate(items)]
