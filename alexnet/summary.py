"""``alexnet summary``: for each learned layer its output shape, neurons, parameters and
multiply-accumulates, then totals (PAPER A10, A11)."""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from alexnet.model import LEARNED, AlexNet


def layer_table(model: AlexNet) -> list[dict]:
    """One row per learned layer, measured with forward hooks on a one-image forward.

    A conv layer's neurons are its output maps before pooling (55x55x96 for conv1), as the
    paper counts them; MACs count the weights' multiply-adds only (no bias, ReLU, LRN, pool).
    """
    rows: dict[str, dict] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            out = tuple(output.shape[1:])
            neurons = output[0].numel()
            if isinstance(module, nn.Conv2d):
                fan_in = (
                    module.in_channels
                    // module.groups
                    * module.kernel_size[0]
                    * module.kernel_size[1]
                )
                macs = neurons * fan_in
            else:
                macs = module.in_features * module.out_features
            params = sum(p.numel() for p in module.parameters())
            rows[name] = dict(
                name=name, output_shape=list(out), neurons=neurons, params=params, macs=macs
            )

        return record

    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in LEARNED]
    try:
        size, channels = model.input_size, model.conv1.in_channels
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, size, size))
    finally:
        for h in handles:
            h.remove()
    return [rows[n] for n in LEARNED]


def summarize(arch: str = "paper", **options) -> dict:
    model = AlexNet(arch=arch, init="none", **options)
    layers = layer_table(model)
    return {
        "model": arch,
        "input_shape": [model.conv1.in_channels, model.input_size, model.input_size],
        "layers": layers,
        "total_params": sum(p.numel() for p in model.parameters()),
        "total_macs": sum(r["macs"] for r in layers),
    }


def format_table(summary: dict) -> str:
    c, h, w = summary["input_shape"]
    lines = [
        f"AlexNet ({summary['model']}), input {h}x{w}x{c}",
        f"{'layer':<7}{'output (CxHxW)':>18}{'neurons':>12}{'params':>14}{'MACs':>16}",
    ]
    for r in summary["layers"]:
        shape = "x".join(str(d) for d in r["output_shape"])
        lines.append(
            f"{r['name']:<7}{shape:>18}{r['neurons']:>12,}{r['params']:>14,}{r['macs']:>16,}"
        )
    lines.append(
        f"{'total':<7}{'':>18}{sum(r['neurons'] for r in summary['layers']):>12,}"
        f"{summary['total_params']:>14,}{summary['total_macs']:>16,}"
    )
    if summary["model"] == "paper":
        lines.append(
            "Note: the paper prints 253,440 neurons for conv1; 55x55x96 = 290,400 "
            "(a known misprint, PAPER A10). The paper's '60 million parameters' is 60,965,224 "
            "with groups=2 in conv2, conv4, conv5 (PAPER A11)."
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=("paper", "owt", "small"),
        default="paper",
        help="paper: the paper's network (A1-A12); owt: torchvision's layout (H2); small: the "
        "same pattern for 28-32 px images (default paper)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="fc8 outputs (default 1000; 10 for small)"
    )
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (default 3)")
    parser.add_argument("--image-size", type=int, default=None, help="input height and width")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    num_classes = args.num_classes or (10 if args.model == "small" else 1000)
    options = {"num_classes": num_classes}
    if args.in_channels:
        options["in_channels"] = args.in_channels
    if args.image_size:
        options["image_size"] = args.image_size
    try:
        summary = summarize(args.model, **options)
    except ValueError as e:
        from alexnet.runtime.errors import UserError

        raise UserError(str(e)) from e
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0
