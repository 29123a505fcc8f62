"""Inference through the engines: ``--backend auto|torch|openvino|onnxruntime``.

``predict``, ``evaluate`` and ``features extract`` wrap their model with ``for_inference``.
The engines run the ONNX export of ``alexnet.interop.convert`` (LRN, towers, the layer asked
for), written with the LRN graph each runs fastest (``LRN_GRAPH``); the test-time views and
the mean subtraction (PAPER B2, B5) stay in ``DeviceAugment``, so every backend sees the same
float crops. ``auto`` times each installed candidate (torch fp32 NCHW / channels_last, the
engines in fp32, and bf16 where the CPU has it natively) at the run's batch size and keeps
the fastest; the choice and the exported graphs are cached beside the checkpoint in
``<checkpoint>.engines/`` (``<run>/engines/`` for a run directory), keyed by the SHA-256 of
the weights and model settings, and the cache is emptied when that digest changes. The
first batch of every run is also computed by torch in fp32: ``report`` gives the top-1
agreement and the largest relative error of the probabilities, and a bf16 choice whose top-1
agrees on fewer than ``MIN_AGREEMENT`` of that batch is replaced by fp32 for the run.
``--precision fp32`` keeps bf16 out (the reference numbers on any CPU); ``--precision bf16``
times only bf16 candidates and keeps the choice, saying in the report when it agreed less.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from alexnet.card import ModelCard
from alexnet.interop.engine_cache import (
    Choice,
    EngineCache,
    MachineRecord,
    job_key,
    model_digest,
    open_cache,
)
from alexnet.interop.runners import (
    OnnxRuntimeRunner,
    OpenVinoRunner,
    TorchRunner,
    openvino_core,
    torch_fn,
)
from alexnet.runtime import devices
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import exclusive_lock
from alexnet.runtime.timing import alternating_on

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("openvino", "onnxruntime")
EXTRAS = {"openvino": "alexnet[openvino]", "onnxruntime": "alexnet[onnx]"}
MIN_AGREEMENT = 0.99  # bf16 is used only where its top-1 agrees with fp32 this often
TIMING_BATCH_MAX = 128  # candidates are timed at min(batch, this): the choice must be quick
# A job of at most this many forward passes is not worth timing the engines for: an engine's
# first export and compile take seconds for the paper model (each machine's own times are kept
# in its machine record, docs/ENGINES.md) and its later loads hundreds of ms, more than it gains
# over torch on a batch or two.
FEW_BATCHES = 2


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="inference engine; auto: the fastest installed at this batch size, by measurement",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 where the CPU computes it natively, the backend is faster in it and "
        "its top-1 agrees with fp32 on the first batch, else fp32; fp32: the reference numbers",
    )


def installed(backend: str) -> bool:
    if backend == "torch":
        return True
    return all(importlib.util.find_spec(m) is not None for m in (backend, "onnx"))


def require(backend: str) -> None:
    """One clear line naming the extra to install when an engine is missing."""
    if not installed(backend):
        missing = backend if importlib.util.find_spec(backend) is None else "onnx"
        raise UserError(
            f"--backend {backend}: {missing} is not installed; pip install '{EXTRAS[backend]}'"
        )


def native_bf16(backend: str) -> bool:
    """bf16 only where the hardware computes it (emulated bf16 is slower than fp32)."""
    if backend == "torch":
        from alexnet.runtime.devices import cpu_has_native_bf16

        return cpu_has_native_bf16()
    if backend == "openvino":
        return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return False  # ONNX Runtime's CPU provider has no bf16 convolutions


def candidates(backend: str, precision: str = "auto") -> list[Choice]:
    """What ``auto`` times: each installed backend (or the one asked for) in fp32, NCHW and
    (torch) channels_last, and in bf16 where ``precision`` allows it and the hardware has it.
    ``--precision bf16`` asked of a backend that cannot honour it is an error, not fp32."""
    names = [b for b in ("torch", *ENGINES) if installed(b)] if backend == "auto" else [backend]
    if precision == "bf16":
        names = [n for n in names if n == "torch" or native_bf16(n)]
        if not names:
            why = (
                "ONNX Runtime's CPU provider has no bf16 convolutions"
                if backend == "onnxruntime"
                else "this CPU has no native bf16 for OpenVINO (it would run fp32)"
            )
            raise UserError(f"--precision bf16 --backend {backend}: {why}; use --precision fp32")
    out = []
    for name in names:
        layouts = (False, True) if name == "torch" else (False,)
        if precision == "auto":
            precisions = ("fp32", "bf16") if native_bf16(name) else ("fp32",)
        else:
            precisions = (precision,)
        # torch's bf16 only in channels_last: NCHW bf16 ran at 0.68x of it (the demo's
        # model, batch 128) and 0.78x (paper-sized, batch 16) on an AVX512-BF16 CPU
        # (docs/RESULTS.md, inference engines, 2026-12-07)
        out += [
            Choice(name, p, cl)
            for p in precisions
            for cl in layouts
            if p == "fp32" or cl or name != "torch"
        ]
    return out


# --------------------------------------------------------------------------------- runners
def make_runner(
    model,
    card: ModelCard,
    choice: Choice,
    layer: str | None,
    cache: EngineCache | None,
    *,
    peer: bool = False,
):
    """The runner of ``choice``; ``peer``: the engine with its own defaults, as the bench's
    peers run (only ONNX Runtime's thread spinning differs)."""
    threads = torch.get_num_threads()
    if choice.backend == "torch":
        return TorchRunner(model, choice.precision, choice.channels_last, layer)
    graph = cache.graph(model, card, choice.backend, layer)
    if choice.backend == "onnxruntime":
        return OnnxRuntimeRunner(graph, threads, spin=peer)
    return OpenVinoRunner(graph, choice.precision, threads, cache.dir / "openvino")


def time_runners(runners: dict[str, object], x: torch.Tensor, rounds: int = 3) -> dict:
    """Median seconds per call of each runner on ``x``, side by side after a warm-up, in
    stretches of at least 0.1 s for the fastest, over three rounds (at batch 1 single calls
    chose ONNX Runtime at 1.6 ms over OpenVINO at 0.9; at 128, two rounds once chose torch
    bf16 at 328 images/s over OpenVINO bf16 at 393)."""
    return alternating_on(runners, x, rounds, stretch=0.1)[0]


# ------------------------------------------------------------------------------- agreement
def agreement(got: torch.Tensor, want: torch.Tensor, probabilities: bool = True) -> dict:
    """Top-1 agreement and the largest relative error against ``want`` (torch fp32): per
    image, the largest absolute difference over its outputs divided by its largest output
    (the probabilities' softmax of logits; for features, the activations themselves)."""
    p, q = got.double(), want.double()
    if probabilities:
        p, q = torch.softmax(p, 1), torch.softmax(q, 1)
    rel = (p - q).abs().amax(1) / q.abs().amax(1).clamp_min(1e-30)
    top1 = float((p.argmax(1) == q.argmax(1)).double().mean()) if probabilities else None
    return {"images": int(q.shape[0]), "top1_agreement": top1, "max_rel_error": float(rel.max())}


# ----------------------------------------------------------------------------- the wrapper
class InferenceModel(nn.Module):
    """The model as the commands use it (``model(x)``, ``forward_features(x, layer)``,
    ``fc8``, ``conv1``), run by the chosen backend. ``max_batch`` tells ``view_probs`` how many
    views to forward at once: all of them for an engine (large batches are where they gain)."""

    def __init__(
        self, model, card, choice: Choice, layer, cache, batch_size: int, *, fallback: bool = True
    ) -> None:
        super().__init__()
        self.fallback = fallback  # bf16 that agrees too little is replaced by fp32
        self.model, self.card, self.choice = model, card, choice
        self.layer, self.cache = layer, cache
        self.runner = make_runner(model, card, choice, layer, cache)
        self.max_batch = batch_size if choice.backend == "torch" else None
        self.check: dict | None = None
        self.note = ""

    @property
    def fc8(self) -> nn.Module:
        return self.model.fc8

    @property
    def conv1(self) -> nn.Module:
        return self.model.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.check is not None:
            return self.runner(x)
        got = self.runner(x)
        exact = self.choice == Choice("torch", "fp32")
        with torch.inference_mode():
            want = got if exact else torch_fn(self.model, self.layer)(x.float()).float()
        self.check = agreement(got, want, probabilities=self.layer is None)
        top1 = self.check["top1_agreement"]
        if self.choice.precision != "bf16" or top1 is None or top1 >= MIN_AGREEMENT:
            return got
        if not self.fallback:
            self.note = f"; below the {100 * MIN_AGREEMENT:.0f}% that --precision auto asks"
        else:
            self.note = f"; {self.choice.label()} agreed on too few (fp32 used instead)"
            self.choice = Choice(self.choice.backend, "fp32", self.choice.channels_last)
            self.runner = make_runner(self.model, self.card, self.choice, self.layer, self.cache)
            got = self.runner(x)
            self.check = agreement(got, want, probabilities=self.layer is None)
        return got

    def forward_features(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        if layer != self.layer:
            raise ValueError(f"built for layer {self.layer}, asked for {layer}")
        return self.forward(x)

    def report(self) -> str:
        """One line: the backend and its agreement with torch fp32 on the first batch."""
        line = f"backend {self.choice.label()}"
        c = self.check
        if c is None:
            return line + " (nothing run)"
        if self.choice == Choice("torch", "fp32"):
            return line + " (the torch fp32 reference itself)" + self.note
        what = "probabilities" if self.layer is None else f"{self.layer} activations"
        top1 = (
            ""
            if c["top1_agreement"] is None
            else (f"top-1 agreement {100 * c['top1_agreement']:.2f}%, ")
        )
        return (
            f"{line}: against torch fp32 on {c['images']} inputs, {top1}largest relative "
            f"error of the {what} {c['max_rel_error']:.2g}{self.note}"
        )


def choose(
    model,
    card: ModelCard,
    cache: EngineCache,
    backend: str,
    batch: int,
    layer,
    precision: str = "auto",
    inputs: int | None = None,
) -> Choice:
    """The candidate that serves this job fastest. ``inputs``: how many inputs the job will
    forward in all (None: many). A job of at most ``FEW_BATCHES`` passes takes what costs
    least with its engine's first export and compile counted, as this machine measured them
    for any checkpoint of this architecture, and plain torch where nothing was measured yet;
    a larger one the fastest per call, timed once per checkpoint (and per machine)."""
    # features have no top-1 to check bf16 against (InferenceModel), so auto keeps them fp32
    options = candidates(backend, "fp32" if layer and precision == "auto" else precision)
    if len(options) == 1:
        return options[0]
    b = max(1, min(batch, TIMING_BATCH_MAX))
    key = f"{backend}|{precision}|{layer or 'logits'}|batch={b}|threads={torch.get_num_threads()}"
    job, machine = job_key(card, key), MachineRecord()
    known = machine.get(job)
    if known is not None and not all(o.label() in known["seconds"] for o in options):
        known = None
    if inputs is not None and math.ceil(inputs / max(batch, 1)) <= FEW_BATCHES:
        if known is None:
            return next((o for o in options if o.backend == "torch"), options[0])
        passes = math.ceil(inputs / max(batch, 1))

        def cost(o: Choice) -> float:
            setup = 0.0 if o.backend == "torch" else known["setup"].get(o.label(), math.inf)
            return setup + passes * known["seconds"][o.label()]

        return min(options, key=cost)
    found = cache.choice(key)
    if found in options:
        return found
    if known is not None:
        best = min(options, key=lambda o: known["seconds"][o.label()])
        cache.remember(key, best, known["seconds"])
        return best
    size, c = model.input_size, model.conv1.in_channels
    x = torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(0)) * 50.0
    runners, setup = {}, {}
    for o in options:
        t0 = time.perf_counter()
        runners[o.label()] = make_runner(copy.deepcopy(model), card, o, layer, cache)
        setup[o.label()] = time.perf_counter() - t0
    seconds = time_runners(runners, x)
    best = min(options, key=lambda o: seconds[o.label()])
    cache.remember(key, best, seconds)
    machine.put(job, seconds, setup)
    return best


def for_inference(
    model,
    card: ModelCard,
    checkpoint: Path,
    backend: str = "auto",
    *,
    batch_size: int = 64,
    layer: str | None = None,
    precision: str = "auto",
    inputs: int | None = None,
) -> nn.Module:
    """``model`` run by ``backend`` in ``precision`` (see the module docstring);
    ``batch_size``: the number of inputs per forward pass the command will make (images times
    views); ``inputs``: how many it will make in all (see ``choose``). ``precision`` means
    what it means for training (``devices.resolve_precision``): ``auto`` is bf16 where the
    device computes it natively, and then only where its top-1 agrees with fp32 on the first
    batch (else fp32 for the run); asked for by name, bf16 is kept and the report says how
    well it agreed."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        if backend in ENGINES:  # said before whether the engine is installed: it is moot
            raise UserError(f"--backend {backend}: the engines run on the CPU, not {device}")
        # features have no top-1 to check bf16 against, so auto keeps them fp32 (as on CPU)
        asked = "fp32" if layer and precision == "auto" else precision
        if devices.resolve_precision(asked, device) == "fp32":
            return model
        choice = Choice("torch", "bf16")
        fallback = precision == "auto"
        return InferenceModel(model, card, choice, layer, None, batch_size, fallback=fallback)
    if backend in ENGINES:
        require(backend)
    # one process at a time (the ranks of one torchrun, two commands): none empties a cache
    # another is writing, and the later ones find the first's timed choice
    with exclusive_lock(checkpoint):
        cache = open_cache(checkpoint, model_digest(model, card))
        choice = choose(model, card, cache, backend, batch_size, layer, precision, inputs)
        return InferenceModel(
            model, card, choice, layer, cache, batch_size, fallback=precision == "auto"
        )


def report(model: nn.Module) -> str | None:
    return model.report() if isinstance(model, InferenceModel) else None


def print_report(model: nn.Module, command: str) -> None:
    """``report``'s line on stderr as ``alexnet COMMAND: ...`` (nothing for a plain model)."""
    line = report(model)
    if line:
        print(f"alexnet {command}: {line}", file=sys.stderr)
