"""``alexnet convert``: other people's weights in, portable formats out.

    alexnet convert caffe bvlc_alexnet.caffemodel --mean imagenet_mean.binaryproto \\
        --synsets synset_words.txt --out bvlc_alexnet.pt
    alexnet convert torchvision alexnet-owt-7be5be79.pth --synsets synset_words.txt --out owt.pt
    alexnet convert onnx --checkpoint runs/x --out model.onnx [--preprocessing]
    alexnet convert safetensors --weights IMAGENET1K_V1 --out owt.safetensors

The imports (``alexnet.interop.convert``) write ordinary checkpoints that every command runs;
the exports take any network (``--checkpoint``: a checkpoint, a run directory, meaning its
best checkpoint as everywhere, or a .safetensors file; ``--weights``: a published set by
name) and write it with its card (classes, preprocessing, provenance) as metadata.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alexnet.runtime.args import output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from alexnet.inference import add_model_arguments

    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = sub.add_parser(
        "caffe",
        help="a BVLC .caffemodel (bvlc_alexnet) -> paper-model checkpoint",
        description="Caffe's bvlc_alexnet (or a net of its layout) as a checkpoint of the "
        "paper's model: BGR folded into conv1, Caffe's LRN k=1 into the weights, 227 px views.",
    )
    p.add_argument("caffemodel", type=Path, help="the .caffemodel file")
    p.add_argument(
        "--mean",
        type=Path,
        help="imagenet_mean.binaryproto or a (3,H,W) BGR .npy (default: Caffe's mean pixel)",
    )
    p.add_argument("--synsets", type=Path, help="synset_words.txt: class ids and names")
    p.add_argument("--out", type=output_file, required=True, help="the checkpoint to write")
    p = sub.add_parser(
        "torchvision",
        help="torchvision alexnet weights -> owt checkpoint",
        description="torchvision's alexnet state dict (alexnet-owt-7be5be79.pth) as a "
        "checkpoint of the owt layout: its normalisation folded into conv1 and a mean image.",
    )
    p.add_argument("weights", type=Path, help="the .pth state dict")
    p.add_argument("--synsets", type=Path, help="synset_words.txt: class ids and names")
    p.add_argument("--out", type=output_file, required=True, help="the checkpoint to write")
    p = sub.add_parser(
        "onnx",
        help="a network -> ONNX, checked with onnxruntime when installed",
        description="A network as an ONNX graph (LRN as ONNX's LRN op), its card as metadata.",
    )
    add_model_arguments(p, running=False)
    p.add_argument("--out", type=output_file, required=True, help="the .onnx to write")
    p.add_argument(
        "--preprocessing",
        action="store_true",
        help="input uint8 crops (N,C,crop,crop); the graph subtracts the mean and "
        "returns probabilities",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p = sub.add_parser(
        "safetensors",
        help="a network -> safetensors (weights, stats, metadata)",
        description="Weights only, for sharing: the tensors, the mean image and PCA, the card "
        "as metadata; every command reads it back.",
    )
    add_model_arguments(p, running=False)
    p.add_argument("--out", type=output_file, required=True, help="the .safetensors to write")


def run(args: argparse.Namespace) -> int:
    from alexnet.interop.convert import import_caffe, import_torchvision
    from alexnet.runtime.fileio import atomic_torch_save

    if args.what in ("onnx", "safetensors"):
        return _export(args)
    if args.what == "caffe":
        ckpt = import_caffe(args.caffemodel, args.mean, args.synsets)
    else:
        ckpt = import_torchvision(args.weights, args.synsets)
    atomic_torch_save(args.out, ckpt)
    cfg = ckpt["model_config"]
    print(
        f"wrote {args.out}: arch={cfg['arch']} classes={cfg['num_classes']} "
        f"input={ckpt['augment']['crop_size']}px ({ckpt['source']['preprocessing']})"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import sys

    from alexnet.checkpoint import export_safetensors, load_model
    from alexnet.inference import single_source
    from alexnet.interop.weights import resolve_source

    path, note = resolve_source(single_source(args))
    if note:
        print(note, file=sys.stderr)
    if args.what == "safetensors":
        export_safetensors(path, args.out)  # load_model reads the result back
        print(f"wrote {args.out}")
        return 0
    from alexnet.interop.onnx import export_onnx

    model, card = load_model(path, map_location="cpu")
    diff = export_onnx(
        model,
        card,
        args.out,
        preprocessing=args.preprocessing,
        opset=args.opset,
        check=not args.no_check,
    )
    if diff is not None:
        print(f"onnxruntime vs torch: max abs difference {diff:.3g}")
    print(f"wrote {args.out}")
    return 0
