"""Other people's weights in (``alexnet convert caffe|torchvision``, ``alexnet.convert``).

The imports write ordinary checkpoints (the dict of docs/ARCHITECTURE.md), so ``evaluate``,
``predict``, ``features`` and ``figures`` run them unchanged. Each carries the preprocessing
its weights were trained with, expressed in our pipeline (uint8 RGB, minus a mean image,
times a scale), and folds the rest into conv1 or the LRN layers exactly:

- Caffe's ``bvlc_alexnet`` (PAPER H2) takes BGR 227x227 crops minus the BGR mean image, with
  conv1 unpadded and LRN k=1 across all 96 maps. We flip conv1's input channels to RGB, flip
  the mean image, build the paper model with ``conv1_padding=0, image_size=227,
  lrn_per_tower=False``, and rescale conv1/conv2 (and conv2/conv3) so our k=2 LRN computes
  Caffe's k=1 one (see ``_fold_lrn_k``).
- torchvision's ``alexnet`` (the owt variant, PAPER H2) takes RGB 224 crops of images scaled to
  0-1 and normalised with per-channel mean and std. The mean becomes a constant mean image in
  0-255 units and 1/(255 std) is folded into conv1's input channels (exact, padding included,
  because zero padding of the normalised input is zero padding of the mean-subtracted one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alexnet.model import LEARNED
from alexnet.runtime.errors import UserError

CAFFE_LAYERS = LEARNED  # bvlc_alexnet names its layers as the paper does (PAPER A1)
# Caffe's ILSVRC-2012 mean pixel in BGR order (the mean of imagenet_mean.binaryproto).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------- Caffe
def read_caffe_layers(path: Path) -> list[tuple[str, str, list[np.ndarray], object]]:
    """``[(name, type, blobs, layer message), ...]`` in file order, V1 or V2 format."""
    from google.protobuf.message import DecodeError

    from alexnet.interop import caffe_pb

    net = caffe_pb.messages()["NetParameter"]()
    try:
        net.ParseFromString(Path(path).read_bytes())
    except (DecodeError, RuntimeError) as e:
        raise UserError(f"{path}: not a Caffe NetParameter protobuf ({e})") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from e
    layers = list(net.layer) or list(net.layers)
    if not layers:
        raise UserError(f"{path}: holds no layers; is it a .caffemodel?")
    out = []
    for layer in layers:
        blobs = []
        for blob in layer.blobs:
            data = np.asarray(blob.data or blob.double_data, dtype=np.float32)
            shape = caffe_pb.blob_shape(blob)
            if int(np.prod(shape)) != data.size:
                raise UserError(
                    f"{path}: layer {layer.name} blob of shape {shape} holds {data.size} values"
                )
            blobs.append(data.reshape(shape))
        out.append((layer.name, caffe_pb.layer_type(layer), blobs, layer))
    return out


def _caffe_param(blob: np.ndarray, like: torch.Tensor, where: str) -> torch.Tensor:
    """A Caffe blob as a tensor shaped like ``like`` (V1 files store fc weights as 1x1xOxI)."""
    if blob.size != like.numel():
        raise UserError(
            f"{where}: {blob.shape} has {blob.size} values, the model expects {tuple(like.shape)}"
        )
    return torch.from_numpy(blob.reshape(tuple(like.shape)).copy())


def _check_caffe_lrn(layers: list, path: Path) -> float | None:
    """Checks LRN placement and settings; returns Caffe's k, or None when the net has no LRN."""
    order = [t for _, t, _, _ in layers if t in ("LRN", "Pooling", "Convolution")]
    lrns = [layer for _, t, _, layer in layers if t == "LRN"]
    if not lrns:
        return None
    for i, t in enumerate(order):
        if t == "LRN" and (i == 0 or order[i - 1] != "Convolution"):
            raise UserError(
                f"{path}: LRN after pooling (CaffeNet's order) is not the paper's "
                "network, which normalises before pooling (PAPER A8, A9)"
            )
    ks = set()
    for layer in lrns:
        p = layer.lrn_param
        size = p.local_size if p.HasField("local_size") else 5
        alpha = p.alpha if p.HasField("alpha") else 1.0
        beta = p.beta if p.HasField("beta") else 0.75
        if size != 5 or abs(alpha - 1e-4) > 1e-9 or abs(beta - 0.75) > 1e-7:
            raise UserError(
                f"{path}: LRN {layer.name} has size={size} alpha={alpha} "
                f"beta={beta}; only the paper's 5 / 1e-4 / 0.75 is supported"
            )
        ks.add(round(float(p.k if p.HasField("k") else 1.0), 6))  # caffe.proto default k = 1
    if len(ks) != 1:
        raise UserError(f"{path}: LRN layers disagree on k ({sorted(ks)})")
    return ks.pop()


def _fold_lrn_k(model: torch.nn.Module, k_from: float, k_to: float, beta: float = 0.75) -> None:
    """Make our LRN with ``k_to`` compute the LRN with ``k_from`` by rescaling weights.

    With l = sqrt(k_to / k_from): LRN_kfrom(a) = l**(2 beta - 1) * LRN_kto(l * a). ReLU and
    max pooling commute with positive scales, so l goes into the conv before each LRN
    (weight and bias) and l**(2 beta - 1) into the next conv's weights (not its bias)."""
    lam = (k_to / k_from) ** 0.5
    out_factor = lam ** (2 * beta - 1)
    with torch.no_grad():
        for before, after in (("conv1", "conv2"), ("conv2", "conv3")):
            getattr(model, before).weight.mul_(lam)
            getattr(model, before).bias.mul_(lam)
            getattr(model, after).weight.mul_(out_factor)


def _read_mean(path: Path | None, size: int) -> np.ndarray:
    """A BGR mean as (3, size, size) float32: a .binaryproto or .npy mean image, or the pixel."""
    if path is None:
        return np.broadcast_to(np.float32(CAFFE_MEAN_BGR)[:, None, None], (3, size, size)).copy()
    if Path(path).suffix == ".npy":
        try:
            mean = np.load(path).astype(np.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the mean image ({e})") from e
    else:
        from alexnet.interop import caffe_pb

        blob = caffe_pb.messages()["BlobProto"]()
        try:
            blob.ParseFromString(Path(path).read_bytes())
        except Exception as e:  # protobuf raises DecodeError or RuntimeError
            raise UserError(f"{path}: not a Caffe BlobProto mean file ({e})") from e
        mean = np.asarray(blob.data, np.float32).reshape(caffe_pb.blob_shape(blob))
    mean = mean.reshape(mean.shape[-3:]) if mean.ndim == 4 else mean
    if mean.ndim != 3 or mean.shape[0] != 3:
        raise UserError(f"{path}: expected a 3xHxW mean image, got shape {mean.shape}")
    return mean


def _class_lists(synsets: Path | None, n: int) -> tuple[list[str], list[str]]:
    """Class ids and names from Caffe's synset_words.txt ("n01440764 tench, Tinca tinca")."""
    if synsets is None:
        return [str(i) for i in range(n)], [str(i) for i in range(n)]
    try:
        lines = [ln.strip() for ln in Path(synsets).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise UserError(f"{synsets}: cannot read ({e.strerror})") from e
    if len(lines) != n:
        raise UserError(f"{synsets}: {len(lines)} classes listed, the weights have {n}")
    ids = [ln.split(maxsplit=1)[0] for ln in lines]
    names = [ln.split(maxsplit=1)[1] if " " in ln else ln for ln in lines]
    return ids, names


def _stats(mean: np.ndarray) -> dict[str, torch.Tensor]:
    # No colour PCA comes with foreign weights: zero eigenvalues switch colour noise off (B4).
    return {
        "mean": torch.from_numpy(np.ascontiguousarray(mean, np.float32)),
        "eigvals": torch.zeros(3),
        "eigvecs": torch.eye(3),
    }


def _checkpoint(model, classes, names, mean, crop, source: dict) -> dict:
    return {
        "model": model.state_dict(),
        "model_config": dict(model.config),
        "classes": classes,
        "class_names": names,
        "data_stats": _stats(mean),
        "augment": {"crop_size": crop, "scale": 1.0},
        "config": {},
        "source": source,
        "epoch": None,
        "step": None,
        "metrics": {},
    }


def _caffe_blobs(layers, path: Path) -> dict:
    """The weight and bias of each of ``CAFFE_LAYERS``, fc weights as (out, in) matrices."""
    blobs = {name: b for name, _, b, _ in layers if name in CAFFE_LAYERS}
    missing = [n for n in CAFFE_LAYERS if len(blobs.get(n, ())) != 2]
    if missing:
        raise UserError(f"{path}: no weight and bias blobs for layer(s) {', '.join(missing)}")
    # V1 files pad every blob to 4-D: fc weights are 1 x 1 x out x in, biases 1 x 1 x 1 x out.
    return {
        n: (wb[0].reshape(wb[0].shape[-2:]) if n.startswith("fc") else wb[0], wb[1].reshape(-1))
        for n, wb in blobs.items()
    }


def _load_caffe_blobs(model, blobs: dict, path: Path) -> None:
    """Copy ``blobs`` into ``model``, conv1 turned to take RGB where Caffe's took BGR."""
    state = model.state_dict()
    with torch.no_grad():
        for n in CAFFE_LAYERS:
            for blob, param in zip(blobs[n], ("weight", "bias"), strict=True):
                state[f"{n}.{param}"].copy_(
                    _caffe_param(blob, state[f"{n}.{param}"], f"{path}: {n}.{param}")
                )
        if model.conv1.in_channels == 3:
            model.conv1.weight.copy_(model.conv1.weight.flip(1))  # BGR -> RGB input


def import_caffe(path: Path, mean_path: Path | None = None, synsets: Path | None = None) -> dict:
    """A bvlc_alexnet-style .caffemodel as a checkpoint of the paper model (227 px, RGB)."""
    from alexnet.model import AlexNet

    layers = read_caffe_layers(path)
    blobs = _caffe_blobs(layers, path)
    k = _check_caffe_lrn(layers, path)
    w = {n: blobs[n][0] for n in CAFFE_LAYERS}
    c1 = w["conv1"].shape[0]
    grouped = {
        n: w[n].shape[1] * 2 == w[p].shape[0]
        for n, p in (("conv2", "conv1"), ("conv4", "conv3"), ("conv5", "conv4"))
    }
    if len(set(grouped.values())) != 1:
        raise UserError(f"{path}: conv2/conv4/conv5 are not all grouped alike ({grouped})")
    size = 227  # Caffe's crop: (227 - 11) / 4 + 1 = 55 with no padding (PAPER A3)
    model = AlexNet(
        w["fc8"].shape[0],
        arch="paper",
        in_channels=w["conv1"].shape[1],
        image_size=size,
        widths=(c1, *(w[f"conv{i}"].shape[0] for i in range(2, 6))),
        fc_width=w["fc6"].shape[0],
        lrn=k is not None,
        lrn_per_tower=False,
        towers=grouped["conv2"],
        conv1_padding=0,
        dropout=0.5,
        init="none",
    )
    _load_caffe_blobs(model, blobs, path)
    if k is not None:
        _fold_lrn_k(model, k_from=k, k_to=model.lrn1.k)
    mean = _read_mean(mean_path, 256)
    if model.conv1.in_channels == 3:
        mean = mean[::-1]  # BGR -> RGB
    classes, names = _class_lists(synsets, model.fc8.out_features)
    source = {
        "format": "caffe",
        "file": Path(path).name,
        "lrn_k": k,
        "preprocessing": "RGB (converted from BGR), 227x227 crops of the 256 image, "
        "minus the mean image, 0-255 units",
    }
    return _checkpoint(model, classes, names, mean, size, source)


# ----------------------------------------------------------------------------- torchvision
def import_torchvision(path: Path, synsets: Path | None = None) -> dict:
    """torchvision's ``alexnet`` weights (``features.0.weight``...) as an owt checkpoint."""
    from alexnet.model import AlexNet

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and format errors all mean the same to the user
        raise UserError(f"{path}: not a torch state dict ({e})") from e
    if not isinstance(sd, dict) or "classifier.6.weight" not in sd:
        raise UserError(f"{path}: no 'classifier.6.weight': not a torchvision alexnet state dict")
    try:  # the owt layout at the file's widths (torchvision's own: 64-192-384-256-256, 4096)
        widths = tuple(sd[f"features.{i}.weight"].shape[0] for i in (0, 3, 6, 8, 10))
        fc_width = sd["classifier.4.weight"].shape[0]
    except (KeyError, AttributeError) as e:
        raise UserError(f"{path}: not a torchvision alexnet state dict (no {e})") from None
    model = AlexNet(
        sd["classifier.6.weight"].shape[0],
        arch="owt",
        widths=widths,
        fc_width=fc_width,
        init="none",
    )
    try:
        model.load_torchvision_state_dict(sd)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path}: does not fit torchvision's alexnet ({e})") from e
    std = torch.tensor(TORCHVISION_STD)
    with torch.no_grad():
        model.conv1.weight.div_((255.0 * std).view(1, 3, 1, 1))  # fold (x/255 - m)/s
    mean = np.broadcast_to((255.0 * np.float32(TORCHVISION_MEAN))[:, None, None], (3, 256, 256))
    classes, names = _class_lists(synsets, model.fc8.out_features)
    source = {
        "format": "torchvision",
        "file": Path(path).name,
        "preprocessing": "RGB, shorter side 256, centre 224 crop, (x/255 - mean)/std; "
        "1/(255 std) folded into conv1",
    }
    return _checkpoint(model, classes, names, mean, 224, source)
