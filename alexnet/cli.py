"""``alexnet <command>``: a thin dispatcher. The only module that reads ``sys.argv``.

Each command lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``alexnet --help``
stays fast and importing the library has no side effects.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from alexnet.runtime.errors import UserError, os_error_line

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "summary": ("alexnet.summary", "layer table: output shapes, neurons, parameters, MACs"),
    "prepare": (
        "alexnet.data.prepare",
        "turn ImageNet / a folder tree / Fashion-MNIST / CIFAR-10 "
        "into a prepared dataset directory",
    ),
    "train": ("alexnet.train", "train with the paper's recipe (or another preset)"),
    "evaluate": ("alexnet.evaluate", "top-1/top-5 error, 1 or 10 views, ensembles"),
    "predict": ("alexnet.predict", "top-5 classes for image files"),
    "features": (
        "alexnet.features",
        "fc7 (or any layer) features, nearest neighbours, binary codes",
    ),
    "figures": ("alexnet.figures", "the paper's figures: filters, predictions, neighbours, curves"),
    "convert": (
        "alexnet.convert",
        "import Caffe / torchvision weights; export ONNX / safetensors",
    ),
    "bench": (
        "alexnet.bench.speed",
        "training and inference speed against the usual implementation",
    ),
    "bench-loader": ("alexnet.bench.loader", "data loading speed against per-image PIL loading"),
    "experiment": ("alexnet.lab.experiment", "the paper's experiments at small scale"),
    "demo": ("alexnet.lab.demo", "the whole system end to end on Fashion-MNIST"),
    "completion": ("alexnet.completion", 'shell completion: eval "$(alexnet completion bash)"'),
}


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="AlexNet as in Krizhevsky, Sutskever & Hinton (NeurIPS 2012).",
    )
    from alexnet import __version__

    parser.add_argument("--version", action="version", version=f"alexnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, _ = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help / an error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    from alexnet.runtime.memory import tune_at_start

    tune_at_start()  # before the command imports torch and allocates its first tensors
    module = importlib.import_module(module_name)
    cmd_parser = argparse.ArgumentParser(prog=f"alexnet {name}", description=help_text)
    module.add_arguments(cmd_parser)
    try:
        args = cmd_parser.parse_args(rest)
    except SystemExit as e:  # --help (0), or a bad argument, already printed in one line (2)
        return int(e.code or 0)
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"alexnet {name}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except OSError as e:  # a full disk, a read-only or missing folder: the file named
        line = os_error_line(e)
        if line is None:
            raise
        print(f"alexnet {name}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alexnet {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
