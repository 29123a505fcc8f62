"""Caffe's formats written the way Caffe writes them, for the converter and weights tests: a
narrow bvlc_alexnet's weights, a ``.caffemodel`` through caffe.proto's own messages (V1 or V2
layers), and bvlc_alexnet's deploy.prototxt forward pass written in torch ops."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from alexnet.interop import caffe_pb

# A narrow bvlc_alexnet: same layer pattern (grouped conv2/4/5, LRN before pool), small widths.
WIDTHS = (8, 16, 24, 24, 16)
FC, CLASSES = 32, 5


def caffe_weights(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(seed)
    c1, c2, c3, c4, c5 = WIDTHS
    shapes = {
        "conv1": (c1, 3, 11, 11),
        "conv2": (c2, c1 // 2, 5, 5),
        "conv3": (c3, c2, 3, 3),
        "conv4": (c4, c3 // 2, 3, 3),
        "conv5": (c5, c4 // 2, 3, 3),
        "fc6": (FC, c5 * 6 * 6),
        "fc7": (FC, FC),
        "fc8": (CLASSES, FC),
    }
    out = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        w = g.normal(0, 1.0 / np.sqrt(fan_in), shape).astype(np.float32)
        out[name] = (w, g.normal(0.1, 0.1, shape[0]).astype(np.float32))
    return out


def caffe_blob(msgs, array: np.ndarray, legacy: bool):
    blob = msgs["BlobProto"]()
    if legacy:  # V1 files: 4-D num/channels/height/width, fc weights as 1 x 1 x out x in
        shape = (1,) * (4 - array.ndim) + array.shape
        blob.num, blob.channels, blob.height, blob.width = shape
    else:
        blob.shape.dim.extend(array.shape)
    blob.data.extend(array.reshape(-1).tolist())
    return blob


def write_caffemodel(path, weights, *, v1: bool = True, pool_first: bool = False) -> None:
    """bvlc_alexnet's layer sequence: conv, relu, norm, pool (pool, norm in CaffeNet)."""
    msgs = caffe_pb.messages()
    net = msgs["NetParameter"](name="AlexNet")
    seq = ["data"]
    for i in range(1, 6):
        seq += [f"conv{i}", f"relu{i}"]
        if i <= 2:
            seq += [f"pool{i}", f"norm{i}"] if pool_first else [f"norm{i}", f"pool{i}"]
    seq += ["pool5", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8", "loss"]
    kinds = {
        "conv": "CONVOLUTION",
        "relu": "RELU",
        "norm": "LRN",
        "pool": "POOLING",
        "fc": "INNER_PRODUCT",
        "drop": "DROPOUT",
        "data": "DATA",
        "loss": "SOFTMAX_LOSS",
    }
    for name in seq:
        kind = kinds[name.rstrip("0123456789")]
        if v1:
            layer = net.layers.add(name=name, type=caffe_pb.V1_TYPES[kind])
        else:
            layer = net.layer.add(name=name, type=caffe_pb.V1_TO_V2[kind])
        if kind == "LRN":
            layer.lrn_param.local_size, layer.lrn_param.alpha = 5, 1e-4
            layer.lrn_param.beta = 0.75  # k left unset: caffe.proto's default, 1
        if name in weights:
            for array in weights[name]:
                layer.blobs.append(caffe_blob(msgs, array, legacy=v1))
    path.write_bytes(net.SerializeToString())


def caffe_reference(x_bgr: torch.Tensor, weights) -> torch.Tensor:
    """bvlc_alexnet's deploy.prototxt in torch ops: BGR input, no conv1 padding, LRN k=1 over
    all maps after the ReLU, then max pooling with Caffe's ceil rounding, float64."""
    w = {
        k: (torch.from_numpy(a).double(), torch.from_numpy(b).double())
        for k, (a, b) in weights.items()
    }
    lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    def pool(t):
        return F.max_pool2d(t, 3, 2, ceil_mode=True)

    x = pool(lrn(F.relu(F.conv2d(x_bgr.double(), *w["conv1"], stride=4))))
    x = pool(lrn(F.relu(F.conv2d(x, *w["conv2"], padding=2, groups=2))))
    x = F.relu(F.conv2d(x, *w["conv3"], padding=1))
    x = F.relu(F.conv2d(x, *w["conv4"], padding=1, groups=2))
    x = pool(F.relu(F.conv2d(x, *w["conv5"], padding=1, groups=2))).flatten(1)
    x = F.relu(F.linear(x, *w["fc6"]))
    x = F.relu(F.linear(x, *w["fc7"]))
    return F.linear(x, *w["fc8"])
