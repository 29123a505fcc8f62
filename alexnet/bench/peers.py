"""The peers of ``alexnet bench``: what a user would otherwise run, timed beside ours.

- ``usual``: ``reference_network`` (nn.Sequential, torch's LRN, fp32, NCHW, eager).
- ``compiled_bf16``: the same network with channels_last, bf16 autocast and torch.compile
  (``compiled_fp32`` on a CPU without native bf16, where emulated bf16 runs matrix products
  tens of times slower than fp32: ``matmul_peak`` shows it).
- ``openvino_fp32``, ``onnxruntime_fp32`` (and ``openvino_bf16`` where the CPU has native
  bf16): each installed engine running the ONNX export of our model, inference only.
- ``ours`` infers as our commands do (``alexnet.interop.engines.for_inference`` with
  ``--backend auto``, chosen per batch size) and trains with our training step.

All contenders hold the same weights (ours copied into the reference, layer by layer), run in
one process under the same allocator, and alternate rounds; figures are medians. Agreement is
top-1 against our model in fp32 eager torch on the timed batch. ``matmul_peak`` measures this
CPU's matrix-multiply rate, against which every figure is also given as a fraction.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from alexnet.runtime.timing import alternating_on

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def copy_weights(ours: nn.Module, ref: nn.Sequential) -> None:
    layers = [m for m in ref if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer, name in zip(layers, LAYERS, strict=True):
            layer.weight.copy_(getattr(ours, name).weight)
            layer.bias.copy_(getattr(ours, name).bias)


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` product in ``dtype`` on this process's threads: the
    best timed product after one warm-up (2 n^3 FLOPs each), over two ways torch computes it,
    ``torch.mm`` (its BLAS) and a 1x1 convolution of n channels over n pixels (oneDNN). Both:
    on an AMD CPU with AVX-512 MKL's fp32 GEMM runs at about half of what oneDNN reaches (so
    ``torch.mm`` alone would put engines above "100%" of the peak); elsewhere they are close."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    image = a.view(1, 1, n, n).permute(0, 3, 1, 2)  # channels_last: n maps of 1 x n pixels
    kernel = b.T.contiguous()[:, :, None, None]
    products = (lambda: torch.mm(a, b, out=out), lambda: torch.nn.functional.conv2d(image, kernel))
    best = 0.0
    for product in products:
        product()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / len(products):
            t0 = time.perf_counter()
            product()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_size(args) -> tuple[int, float]:
    return (256, 0.1) if args.quick else (1024, 1.0)


def peaks(n: int, seconds: float) -> dict[str, float]:
    """``matmul_peak`` in fp32 and in bf16."""
    return {
        k: matmul_peak(dt, n, seconds)
        for k, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }


def forward_flops(model: nn.Module) -> float:
    """2 x the multiply-adds of the weights per image (``alexnet summary``'s MACs)."""
    from alexnet.summary import layer_table

    return 2.0 * sum(r["macs"] for r in layer_table(model))


def _eager(net: nn.Module, precision: str, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).eval()
    cast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), cast:
            return net(x.contiguous(memory_format=fmt)).float()

    return fn


def inference_fns(ours, ref, compiled_ref, engine_choices, checkpoint: Path, batch: int):
    """name -> callable(x) -> logits, for batch size ``batch``; ``ours`` via our commands."""
    from alexnet.card import ModelCard
    from alexnet.interop import engines

    size, channels = ours.input_size, ours.conv1.in_channels
    card = ModelCard.from_dict(
        {
            "model_config": ours.config,
            "data_stats": {"mean": torch.zeros(channels, size, size)},
            "augment": {"crop_size": size},
        }
    )
    fns = {"usual": _eager(ref, "fp32", False)}
    if compiled_ref is not None:
        precision = compiled_precision(torch.device("cpu"))
        fns[f"compiled_{precision}"] = _eager(compiled_ref, precision, True)
    cache = engines.open_cache(checkpoint, engines.model_digest(ours, card))
    for choice in engine_choices:
        runner = engines.make_runner(ours, card, choice, None, cache, peer=True)
        fns[f"{choice.backend}_{choice.precision}"] = runner
    wrapped = engines.for_inference(ours, card, checkpoint, "auto", batch_size=batch)
    fns["ours"] = wrapped
    return fns, wrapped


def measure_inference(
    ours,
    ref,
    compiled_ref,
    *,
    batch: int,
    rounds: int,
    steps: int,
    engines_too: bool = True,
    stretch: float = 0.25,
) -> dict:
    """Images/s at ``batch`` and latency at batch 1 of each contender, and top-1 agreement."""
    from alexnet.interop import engines

    ours = ours.eval()
    choices = [c for c in engines.candidates("auto") if c.backend != "torch" and engines_too]
    size, c = ours.input_size, ours.conv1.in_channels
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, size, size, generator=gen) * 50.0
    with torch.inference_mode():
        want = ours(x).float().argmax(1)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = Path(tmp) / "bench.pt"
        fns, wrapped = inference_fns(ours, ref, compiled_ref, choices, ckpt_path, batch)
        for name, fn in fns.items():
            agree = float((fn(x).float().argmax(1) == want).double().mean())
            out[name] = {"top1_agreement": agree}
        seconds, batch_calls = alternating_on(fns, x, rounds, stretch, steps)
        for name, s in seconds.items():
            out[name]["infer_ips"] = batch / s
        best = wrapped.choice.label()
        fns1, wrapped1 = inference_fns(ours, ref, compiled_ref, choices, ckpt_path, 1)
        seconds, latency_calls = alternating_on(fns1, x[:1], rounds, stretch, steps)
        for name, s in seconds.items():
            out[name]["latency_ms"] = 1000.0 * s
    return {
        "peers": out,
        "best_infer_backend": best,
        "latency_backend": wrapped1.choice.label(),
        "infer_calls_per_round": batch_calls,
        "latency_calls_per_round": latency_calls,
    }


def compiled_precision(device: torch.device) -> str:
    from alexnet.runtime.devices import precision_dtype

    return "fp32" if precision_dtype("auto", device) is None else "bf16"


def ratios(peers: dict, ours: dict) -> dict:
    """ours / peer for train and infer rates, peer / ours for latency (above 1: ours wins)."""
    out = {}
    for name, p in peers.items():
        if name == "ours":
            continue
        r = {}
        for key in ("train_ips", "infer_ips"):
            if p.get(key) and ours.get(key):
                r[key.removesuffix("_ips")] = ours[key] / p[key]
        if p.get("latency_ms") and ours.get("latency_ms"):
            r["latency"] = p["latency_ms"] / ours["latency_ms"]
        out[name] = r
    return out


def allocator_effect(fns: dict, rounds: int, steps: int) -> dict:
    """Seconds per call of each zero-argument fn with glibc's default large-block behaviour
    and with freed memory kept (``alexnet.runtime.memory``), alternating within each round,
    the mode that goes first alternating between rounds."""
    from alexnet.runtime import memory

    times: dict[str, dict[str, list[float]]] = {k: {"default": [], "kept": []} for k in fns}
    try:
        for r in range(rounds):
            for mode in ("default", "kept") if r % 2 == 0 else ("kept", "default"):
                if not memory.keep_freed_memory(mode == "kept"):
                    return {}
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    times[name][mode].append((time.perf_counter() - t0) / steps)
    finally:
        memory.tune_at_start()
    return {
        name: {
            "default_s": statistics.median(t["default"]),
            "kept_s": statistics.median(t["kept"]),
            "speedup": statistics.median(t["default"]) / statistics.median(t["kept"]),
        }
        for name, t in times.items()
    }


def _peak_fractions(peers: dict, flops: float, peak: dict, our_train: str, our_infer: str):
    """Each figure against the peak of the precision it was computed in (training: 3x the
    forward FLOPs), as ``peers[name]["peak_fraction"]``."""
    for name, p in peers.items():
        precision = {k: "bf16" if "bf16" in name else "fp32" for k in ("train", "infer")}
        if name == "ours":
            precision = {"train": our_train, "infer": our_infer}
        p["peak_fraction"] = {
            k: p[f"{k}_ips"] * flops * (3 if k == "train" else 1) / peak[precision[k]]
            for k in ("train", "infer")
            if p.get(f"{k}_ips")
        }


def _train_and_infer(args, device, batch: int, kept: dict) -> tuple[dict, dict]:
    """Each peer's training figure (timed in speed.model_only) and ``measure_inference``'s
    rounds, our weights copied into the peers first."""
    import copy

    names = set(args.peers.split(",")) if args.peers else set()
    ours, ref = kept["ours"], kept["ref"]
    train = {"usual": kept["reference_train_ips"], "ours": kept["train_ips"]}
    compiled_ref = None
    if "compiled" in names:  # its training was timed with ours in speed.model_only
        train[f"compiled_{compiled_precision(device)}"] = kept["compiled_train_ips"]
        compiled_ref = torch.compile(copy.deepcopy(ref))
    copy_weights(ours, ref)
    if compiled_ref is not None:
        copy_weights(ours, compiled_ref._orig_mod)
    inf = measure_inference(
        ours,
        ref,
        compiled_ref,
        batch=batch,
        rounds=args.rounds,
        steps=args.steps,
        engines_too="engines" in names,
        stretch=0.02 if args.quick else 0.25,
    )
    return train, inf


def _allocator(args, batch: int, kept: dict) -> dict:
    """``allocator_effect`` on the usual and our training and inference steps."""
    ours, ref = kept["ours"], kept["ref"]
    x = torch.randn(batch, ours.conv1.in_channels, ours.input_size, ours.input_size)
    usual = _eager(ref, "fp32", False)
    return allocator_effect(
        {
            "usual_train": kept["reference_train"],
            "ours_train": kept["our_train"],
            "usual_infer": lambda: usual(x),
            "ours_infer": lambda: kept["our_infer"](),
        },
        args.rounds,
        args.steps,
    )


def peer_figures(args, device, batch: int, kept: dict) -> dict:
    """The ``peers`` block of ``alexnet bench``: ``kept`` holds speed.model_only's networks,
    training steps and figures."""
    ours = kept["ours"]
    train, inf = _train_and_infer(args, device, batch, kept)
    peers = inf["peers"]
    for name, ips in train.items():
        peers.setdefault(name, {})["train_ips"] = ips
    n, seconds = peak_size(args)
    late = peaks(n, seconds)
    early = kept.get("early_peak", late)  # measured before the training rounds
    # The best of both: a peak caught while the machine ran slow would flatter every fraction.
    peak = {k: max(early[k], late[k]) for k in late}
    flops = forward_flops(ours)
    _peak_fractions(
        peers,
        flops,
        peak,
        kept.get("our_train_precision", "fp32"),
        "bf16" if "bf16" in inf["best_infer_backend"] else "fp32",
    )
    out = {
        "peers": peers,
        "best_infer_backend": inf["best_infer_backend"],
        "latency_backend": inf["latency_backend"],
        "infer_calls_per_round": inf["infer_calls_per_round"],
        "latency_calls_per_round": inf["latency_calls_per_round"],
        "infer_ips": peers["ours"]["infer_ips"],
        "latency_ms": peers["ours"]["latency_ms"],
        "ratios": ratios(peers, peers["ours"]),
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "matmul_peak_runs_gflops": [{k: v / 1e9 for k, v in r.items()} for r in (early, late)],
        "matmul_peak_method": f"{n}x{n} by {n}x{n} products, torch.mm and as a 1x1 convolution "
        f"(oneDNN), the fastest of those run in {seconds:g} s, {torch.get_num_threads()} threads, "
        "before the training rounds and after the inference rounds",
        "forward_gflop_per_image": flops / 1e9,
    }
    if args.allocator:
        out["allocator"] = _allocator(args, batch, kept)
    return out


def format_peers(r: dict) -> str:
    """The peers table of ``alexnet bench``'s text output."""
    lines = [
        f"peers (same weights, alternating rounds; ours infers as the commands do: "
        f"{r['best_infer_backend']} at batch {r['batch_size']}, {r['latency_backend']} at 1)",
        f"{'':16} {'train/s':>9} {'infer/s':>9} {'latency ms':>11} {'top-1 agr':>9} "
        f"{'ours/peer train':>15} {'infer':>6} {'latency':>8}",
    ]
    for name, p in r["peers"].items():
        q = r["ratios"].get(name, {})

        def f(v, spec: str) -> str:
            return format(v, spec) if v is not None else "-"

        lines.append(
            f"{name:16} {f(p.get('train_ips'), '9.1f'):>9} {f(p.get('infer_ips'), '9.1f'):>9} "
            f"{f(p.get('latency_ms'), '11.2f'):>11} {f(p.get('top1_agreement'), '9.3f'):>9} "
            f"{f(q.get('train'), '14.2f'):>14}x {f(q.get('infer'), '5.2f'):>5}x "
            f"{f(q.get('latency'), '7.2f'):>7}x"
        )
    peak = r["matmul_peak_gflops"]
    lines.append(
        f"matmul peak ({r['matmul_peak_method']}): fp32 {peak['fp32']:.1f} GFLOP/s, bf16 "
        f"{peak['bf16']:.1f} GFLOP/s; forward {r['forward_gflop_per_image']:.3f} GFLOP/image"
    )
    for name, p in r["peers"].items():
        frac = ", ".join(f"{k} {100 * v:.1f}%" for k, v in p["peak_fraction"].items())
        lines.append(f"  {name}: {frac} of peak")
    for name, a in (r.get("allocator") or {}).items():
        lines.append(
            f"allocator {name}: {1000 * a['default_s']:.1f} ms default, "
            f"{1000 * a['kept_s']:.1f} ms kept, {a['speedup']:.2f}x"
        )
    return "\n".join(lines)
