"""``alexnet bench``: our AlexNet against the same network written the usual way.

The reference is ``reference_network``: an ``nn.Sequential`` with ``torch.nn.LocalResponseNorm``,
built from our model's layer sizes, run in float32, contiguous, eager, with ``torch.optim.SGD``.
Ours is ``alexnet.model.AlexNet`` with its best settings (see ``best_settings``) and the
optimizer ``alexnet train`` runs, ``PaperSGD``. Both train and infer on the same synthetic
batch already on the device; timing rounds alternate between the two after warm-up, and the
figures are medians over rounds. The compiled peer (``alexnet.bench.peers``) trains with
torch's fused SGD. The end-to-end figure runs a
prepared dataset through ``make_loader`` + ``DeviceAugment`` + our training step.
``--precision-check`` trains the small model on Fashion-MNIST in float32 and in bfloat16 from
the same seed and prints both loss curves. Method: docs/SPEED.md; figures: docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict

import torch
from torch import nn

from alexnet.bench.memory import saved_activation_bytes
from alexnet.bench.steps import (
    REFERENCE,
    RunSettings,
    alternate,
    make_steps,
    peak_memory,
)
from alexnet.model import AlexNet, count_parameters
from alexnet.runtime import devices
from alexnet.runtime.errors import UserError


def best_settings(device: torch.device, args: argparse.Namespace) -> RunSettings:
    # The same rule as training's run.precision (auto: bf16 where the hardware has it).
    precision = "fp32" if devices.precision_dtype(args.precision, device) is None else "bf16"
    return RunSettings(
        precision, channels_last=not args.no_channels_last, compile=args.compile, optimizer="paper"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--model",
        choices=("paper", "small"),
        default="paper",
        help="the paper's network at 224 px, or the small one at 32 px (default paper)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (D1)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per network per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per network")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="ours: bf16 autocast where the hardware has native bf16 (auto)",
    )
    parser.add_argument("--no-channels-last", action="store_true", help="ours: NCHW")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the model")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--data", default=None, help="prepared dataset for the end-to-end run")
    parser.add_argument("--e2e-steps", type=int, default=None, help="end-to-end steps timed")
    parser.add_argument(
        "--no-end-to-end",
        action="store_true",
        help="time the network on batches already in memory only (no data loading)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument(
        "--peers",
        default=None,
        help="comma list of usual, compiled (the reference with torch.compile, bf16, "
        "channels_last), engines (each installed inference engine); '' for none; "
        "default all (--quick: usual,engines)",
    )
    parser.add_argument(
        "--allocator",
        action="store_true",
        help="also time glibc's default large-block behaviour against freed memory kept",
    )
    parser.add_argument(
        "--precision-check",
        action="store_true",
        help="train the small model on Fashion-MNIST in fp32 and bf16 instead",
    )
    parser.add_argument(
        "--fashion-mnist",
        default="/usr/share/datasets/fashion-mnist",
        help="raw Fashion-MNIST IDX folder for --precision-check",
    )
    parser.add_argument(
        "--check-steps", type=int, default=300, help="training steps of --precision-check"
    )


def reference_network(model: AlexNet) -> nn.Sequential:
    """The same layers written the usual way: nn.Sequential, torch's LRN across all maps
    (as Caffe's bvlc_alexnet), its default initialisation. Sizes come from ``model``."""
    cfg = model.config
    if cfg["lrn"] is False or cfg["activation"] != "relu" or model.avgpool is not None:
        raise ValueError("the reference is the paper-pattern network: ReLU, LRN, no avgpool")

    def conv(c: nn.Conv2d) -> nn.Conv2d:
        return nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups
        )

    def lrn() -> nn.Module:
        alpha = 1e-4 if cfg["lrn_convention"] == "code" else 1e-4 * 5  # torch divides by n
        return nn.LocalResponseNorm(5, alpha, 0.75, 2.0)

    pool, p = model.pool.kernel_size, cfg["dropout"]
    m = model
    return nn.Sequential(
        conv(m.conv1),
        nn.ReLU(inplace=True),
        lrn(),
        nn.MaxPool2d(pool, 2),
        conv(m.conv2),
        nn.ReLU(inplace=True),
        lrn(),
        nn.MaxPool2d(pool, 2),
        conv(m.conv3),
        nn.ReLU(inplace=True),
        conv(m.conv4),
        nn.ReLU(inplace=True),
        conv(m.conv5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(pool, 2),
        nn.Flatten(),
        nn.Linear(m.fc6.in_features, m.fc6.out_features),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
        nn.Linear(m.fc7.in_features, m.fc7.out_features),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
        nn.Linear(m.fc8.in_features, m.fc8.out_features),
    )


def build_pair(arch: str, num_classes: int, in_channels: int = 3, image_size: int | None = None):
    """(ours, reference) with the same layer sizes; parameter counts are checked equal."""
    ours = AlexNet(num_classes, arch=arch, in_channels=in_channels, image_size=image_size)
    ref = reference_network(ours)
    if count_parameters(ref) != count_parameters(ours):
        raise RuntimeError("reference and ours differ in parameter count")
    return ours, ref


def model_only(args, device, settings: RunSettings, batch: int, kept: dict | None = None) -> dict:
    """Ours against the usual way; ``kept`` receives the networks and steps for the peers."""
    classes = 10 if args.model == "small" else 1000
    ours, ref = build_pair(args.model, classes)
    size = ours.input_size
    ref_train, ref_infer, _, ref_fwd = make_steps(ref, REFERENCE, device, batch, size, classes)
    our_train, our_infer, _, our_fwd = make_steps(ours, settings, device, batch, size, classes)
    saved = {
        "reference_saved_mb": saved_activation_bytes(ref_fwd, ref.parameters()) / 2**20,
        "saved_mb": saved_activation_bytes(our_fwd, ours.parameters()) / 2**20,
    }
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        ref_train(), our_train(), ref_infer(), our_infer()
    warm = time.perf_counter() - t0
    trains = {"reference": ref_train, "ours": our_train}
    if kept is not None:
        kept.update(
            ours=ours,
            ref=ref,
            our_train=our_train,
            reference_train=ref_train,
            our_infer=our_infer,
            our_train_precision=settings.precision,
        )
        if kept.get("compiled"):  # the compiled reference peer (alexnet.bench.peers)
            trains["compiled"] = _compiled_reference_train(ref, device, batch, size, classes)
    if kept is not None and device.type == "cpu":  # the peers' matmul peak (again later)
        from alexnet.bench.peers import peak_size, peaks

        kept["early_peak"] = peaks(*peak_size(args))
    tr = alternate(trains, args.rounds, args.steps, batch, device)
    mem = peak_memory(trains, device)
    if "compiled" in tr:
        kept["compiled_train_ips"] = tr["compiled"]
    inf = alternate(
        {"reference": ref_infer, "ours": our_infer}, args.rounds, args.steps, batch, device
    )
    return {
        "reference_train_ips": tr["reference"],
        "train_ips": tr["ours"],
        "train_speedup": tr["ours"] / tr["reference"],
        "reference_infer_ips": inf["reference"],
        "infer_ips": inf["ours"],
        "infer_speedup": inf["ours"] / inf["reference"],
        "reference_train_peak_mb": mem["reference"],
        "train_peak_mb": mem["ours"],
        **saved,
        "parameters": count_parameters(ours),
        "warmup_seconds": warm,
    }


def _compiled_reference_train(ref, device, batch: int, size: int, classes: int):
    """The reference's training step with torch.compile, channels_last, the precision
    ``auto`` picks here (bf16 where native) and torch's fused SGD (the fastest optimizer
    step a user could pick), compiled by one untimed step."""
    import copy

    precision = "fp32" if devices.precision_dtype("auto", device) is None else "bf16"
    settings = RunSettings(precision, channels_last=True, compile=True, optimizer="sgd_fused")
    train, _, _, _ = make_steps(copy.deepcopy(ref), settings, device, batch, size, classes)
    train()
    return train


def _environment(device: torch.device) -> dict[str, object]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": devices.cpu_has_native_bf16(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run(args: argparse.Namespace) -> int:
    if args.precision_check:
        from alexnet.bench.precision import precision_check

        return precision_check(args)
    device = devices.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup = min(args.rounds, 2), 1, 1
    batch = args.batch_size or (4 if args.quick else 128)  # PAPER D1: batch 128
    if batch < 1 or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        raise UserError("--batch-size, --rounds and --steps must be positive")
    settings = best_settings(device, args)
    out: dict[str, object] = {
        "device": str(device),
        "model": args.model,
        "batch_size": batch,
        "settings": asdict(settings),
        "rounds": args.rounds,
        "steps": args.steps,
        **_environment(device),
    }
    if args.peers is None:
        args.peers = "usual,engines" if args.quick else "usual,compiled,engines"
    kept: dict = {"compiled": "compiled" in args.peers.split(",") and device.type == "cpu"}
    out.update(model_only(args, device, settings, batch, kept))
    if device.type == "cpu":
        from alexnet.bench.peers import peer_figures
        from alexnet.runtime.memory import tune_at_start

        out["allocator_setting"] = tune_at_start()
        out["torch_infer_ips"] = out["infer_ips"]
        kept.update(out)
        out.update(peer_figures(args, device, batch, kept))
        out["infer_speedup"] = out["infer_ips"] / out["reference_infer_ips"]
    if not args.no_end_to_end:
        from alexnet.bench import end_to_end

        timing = dict(rounds=args.rounds, steps=args.e2e_steps or args.steps, warmup=args.warmup)
        if args.data:
            r = end_to_end.measure(args.data, settings, device, batch, arch=args.model, **timing)
        else:
            r = end_to_end.on_synthetic_data(args.model, settings, device, batch, **timing)
        out["end_to_end_data"] = args.data or "synthetic (random uint8 images)"
        out["end_to_end_ips"] = r["end_to_end_ips"]
        out["end_to_end_model_only_ips"] = r["model_only_ips"]
        out["end_to_end_fraction"] = r["fraction"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_table(out)
    return 0


def _print_table(r: dict) -> None:
    print(
        f"alexnet bench: {r['model']} model, batch {r['batch_size']}, {r['device']}, "
        f"torch {r['torch']}, {r['threads']} threads; ours: {r['settings']}"
    )
    print(f"{'':10} {'reference':>12} {'ours':>12} {'ours/ref':>9}  (images/s, median)")
    for kind in ("train", "infer"):
        print(
            f"{kind:10} {r[f'reference_{kind}_ips']:12.1f} {r[f'{kind}_ips']:12.1f} "
            f"{r[f'{kind}_speedup']:8.2f}x"
        )
    print(
        f"peak memory in training: reference {r['reference_train_peak_mb']:.0f} MB, "
        f"ours {r['train_peak_mb']:.0f} MB (process RSS); saved for backward: reference "
        f"{r['reference_saved_mb']:.0f} MB, ours {r['saved_mb']:.0f} MB"
    )
    if "peers" in r:
        from alexnet.bench.peers import format_peers

        print(format_peers(r))
    if "end_to_end_fraction" in r:
        print(
            f"end to end ({r['end_to_end_data']}): {r['end_to_end_ips']:.1f} images/s = "
            f"{r['end_to_end_fraction']:.2f} of the same model alone "
            f"({r['end_to_end_model_only_ips']:.1f})"
        )
