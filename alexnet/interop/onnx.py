"""ONNX export: the network, optionally with its preprocessing, as a graph the engines run
well (``alexnet convert onnx``; the inference engines of ``alexnet.interop.engines`` are fed
it). Per-tower LRN (PAPER A8, A12) is written as one LRN op over the towers folded into the
batch axis, or as a 1x1 convolution of the squared maps, or split per tower."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alexnet.card import ModelCard
from alexnet.lrn import LocalResponseNorm
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_bytes


class _LRNAsOnnxOp(torch.autograd.Function):
    """Traced as ONNX's own LRN op. ONNX LRN divides by (bias + alpha/size * sum)**beta over
    the window [i - (n-1)//2, i + ceil((n-1)/2)], our window for odd n (PAPER A8)."""

    @staticmethod
    def forward(ctx, x, size: int, c: float, beta: float, k: float):
        from alexnet.lrn import lrn_formula

        return lrn_formula(x, size, c * size, beta, k, "code")

    @staticmethod
    def symbolic(g, x, size: int, c: float, beta: float, k: float):
        return g.op("LRN", x, size_i=size, alpha_f=c * size, beta_f=beta, bias_f=k)


class _ExportLRN(torch.nn.Module):
    """Our LRN as a graph the engines run well. One ONNX LRN op where the window spans all
    channels; per-tower LRN (PAPER A12) as ``lrn_graph``: "reshape" folds the towers into
    the batch axis, (N, C, H, W) -> (N*G, C/G, H, W), so one LRN op normalises each tower on
    its own (exact: NCHW keeps each tower's maps contiguous); "band" writes the formula with a
    1x1 convolution of the squared maps by the (C, C) window matrix; "split" is one LRN op
    per tower between Slice and Concat."""

    def __init__(self, lrn: torch.nn.Module, lrn_graph: str = "reshape") -> None:
        super().__init__()
        self.lrn, self.graph = lrn, lrn_graph
        self.c = lrn.alpha / lrn.size if lrn.convention == "code" else lrn.alpha
        self.groups = getattr(lrn, "groups", 1)

    def _op(self, t: torch.Tensor) -> torch.Tensor:
        return _LRNAsOnnxOp.apply(t, self.lrn.size, self.c, self.lrn.beta, self.lrn.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from alexnet.lrn import band_matrix, lrn_formula

        lrn, g = self.lrn, self.groups
        if lrn.size % 2 == 0:  # ONNX's even window is mirrored: export plain ops
            return lrn_formula(x, lrn.size, lrn.alpha, lrn.beta, lrn.k, lrn.convention, g)
        if self.graph == "band":
            band = band_matrix(x.shape[1], lrn.size // 2, (lrn.size - 1) // 2, g, dtype=x.dtype)
            summed = F.conv2d(x * x, (band.T * self.c)[:, :, None, None])  # N, C, H, W
            return x * (lrn.k + summed) ** -lrn.beta
        if g == 1:
            return self._op(x)
        if self.graph == "reshape":  # N, C, H, W -> N*G, C/G, H, W -> back
            return (
                self._op(x.unflatten(1, (g, -1)).flatten(0, 1)).unflatten(0, (-1, g)).flatten(1, 2)
            )
        return torch.cat([self._op(t) for t in x.chunk(g, dim=1)], dim=1)


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x, self.layer).flatten(1)


class _Preprocessed(torch.nn.Module):
    """uint8 centre crops in, class probabilities out: the centre view of B2/B5 in the graph."""

    def __init__(self, model: torch.nn.Module, mean_crop: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale
        self.register_buffer("mean", mean_crop[None].float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.scale
        return torch.softmax(self.model(x), dim=1)


def export_onnx(
    model,
    card: ModelCard,
    out: Path,
    *,
    preprocessing: bool = False,
    opset: int = 17,
    check: bool = True,
    lrn_graph: str = "reshape",
    layer: str | None = None,
) -> float | None:
    """Writes ``out``; with ``check`` returns onnxruntime's max abs difference from torch on a
    random batch (a UserError if it is not within float32 rounding). ``lrn_graph``: how
    per-tower LRN is written (see ``_ExportLRN``); ``layer``: the graph returns that layer's
    activations (``forward_features``) instead of the logits."""
    net = _exported_net(model, lrn_graph, layer, preprocessing)
    net, example, names = _with_inputs(net, card, model.conv1.in_channels, preprocessing, layer)
    out = Path(out)
    graph = _trace(net, example, names, opset)
    # one write of the whole file, metadata included: a kill leaves the old file or none
    atomic_write_bytes(out, _with_metadata(graph, card))
    if not check:
        return None
    return _compare_onnxruntime(net, out, example)


def _exported_net(model, lrn_graph: str, layer: str | None, preprocessing: bool):
    """A copy of ``model`` in eval mode with its LRN written as ``lrn_graph`` says, returning
    ``layer``'s activations where a layer is given."""
    import copy

    net = copy.deepcopy(model).eval()
    for name in ("lrn1", "lrn2"):
        if isinstance(getattr(net, name, None), LocalResponseNorm):
            setattr(net, name, _ExportLRN(getattr(net, name), lrn_graph))
    if layer is not None:
        if preprocessing:
            raise ValueError("a feature graph takes preprocessed crops")
        net = _Features(net, layer).eval()
    return net


def _with_inputs(net, card: ModelCard, c: int, preprocessing: bool, layer: str | None):
    """``net`` (with the preprocessing in front where asked), an example batch of its inputs
    and the graph's (input, output) names."""
    crop = card.crop_size
    gen = torch.Generator().manual_seed(0)
    if preprocessing:
        mean = card.data_stats["mean"].float()
        top, left = (mean.shape[1] - crop) // 2, (mean.shape[2] - crop) // 2
        net = _Preprocessed(
            net,
            mean[:, top : top + crop, left : left + crop],
            card.scale,
        ).eval()
        example = torch.randint(0, 256, (2, c, crop, crop), generator=gen, dtype=torch.uint8)
        names = (["images_uint8"], ["probabilities"])
    else:
        example = torch.randn(2, c, crop, crop, generator=gen) * 50.0  # mean-subtracted scale
        names = (["images"], ["logits" if layer is None else layer])
    return net, example, names


def _trace(net, example: torch.Tensor, names: tuple[list[str], list[str]], opset: int) -> bytes:
    """The ONNX graph of ``net`` traced on ``example``, its batch axis dynamic."""
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it honours the symbolic that maps our LRN
        # to ONNX's LRN op, and the dynamo exporter needs onnxscript (not a dependency).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # tracer / constant-folding notes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks, traced once
        torch.onnx.export(
            net,
            (example,),
            graph,
            dynamo=False,
            opset_version=opset,
            input_names=names[0],
            output_names=names[1],
            dynamic_axes={names[0][0]: {0: "batch"}, names[1][0]: {0: "batch"}},
        )
    return graph.getvalue()


def _with_metadata(graph: bytes, card: ModelCard) -> bytes:
    """The graph with the card in it: model config, classes, the test views' settings,
    provenance (the mean image is in the graph itself with ``--preprocessing``)."""
    import onnx

    proto = onnx.load_from_string(graph)
    for key, value in card.to_dict().items():
        if key != "data_stats":
            proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _compare_onnxruntime(net, path: Path, example: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.cat([example, example.flip(0)[:1]])  # batch 3: the batch axis really is dynamic
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4 * max(1.0, float(np.abs(want).max())):
        raise UserError(f"{path}: onnxruntime differs from torch by {diff:.3g}")
    return diff
