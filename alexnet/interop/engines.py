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
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from alexnet.interop.runners import (
    OnnxRuntimeRunner,
    OpenVinoRunner,
    TorchRunner,
    openvino_core,
    torch_fn,
)
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_json, exclusive_lock, file_digest
from alexnet.runtime.timing import alternating_on

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("openvino", "onnxruntime")
EXTRAS = {"openvino": "alexnet[openvino]", "onnxruntime": "alexnet[onnx]"}
# How each engine is fed per-tower LRN (alexnet.interop.onnx._ExportLRN), the faster of
# the exact forms measured (docs/PERFORMANCE.md): OpenVINO's LRN kernel is fast once one op
# sees each tower as a batch item; ONNX Runtime's LRN is slow, a 1x1 convolution is not.
LRN_GRAPH = {"openvino": "reshape", "onnxruntime": "band"}
GRAPH_VERSION = 1  # part of the cache key: bump when the export changes
MIN_AGREEMENT = 0.99  # bf16 is used only where its top-1 agrees with fp32 this often
TIMING_BATCH_MAX = 128  # candidates are timed at min(batch, this): the choice must be quick


@dataclass(frozen=True)
class Choice:
    backend: str  # torch, openvino or onnxruntime
    precision: str  # fp32 or bf16
    channels_last: bool = False  # torch only

    def label(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        return f"{self.backend} {self.precision}{layout}"


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
        # torch's bf16 only in channels_last: NCHW bf16 measured 0.62x (small model, batch
        # 128) and 0.77x (paper, batch 16) of it on an AVX512-BF16 CPU
        out += [
            Choice(name, p, cl)
            for p in precisions
            for cl in layouts
            if p == "fp32" or cl or name != "torch"
        ]
    return out


# ----------------------------------------------------------------------------------- cache
def model_digest(model: nn.Module, ckpt: dict) -> str:
    """SHA-256 of the weights and of what shapes the graph (model config, input crop)."""
    h = hashlib.sha256(
        json.dumps(
            {"model_config": ckpt.get("model_config"), "augment": ckpt.get("augment")},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()))
    return h.hexdigest()


def cache_dir(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return checkpoint / "engines"
    return checkpoint.with_name(checkpoint.name + ".engines")


class EngineCache:
    """``manifest.json`` (the digest, the timed choices) and the exported graphs of one model.
    A cache holding another digest is emptied first, so it never serves another model."""

    def __init__(self, directory: Path, digest: str) -> None:
        self.dir, self.digest = Path(directory), digest
        self.manifest_path = self.dir / "manifest.json"
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("digest") != digest:
            if self.dir.is_dir():
                shutil.rmtree(self.dir)
            manifest = {"digest": digest, "choices": {}}
        self.manifest = manifest
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)

    def graph(self, model: nn.Module, ckpt: dict, backend: str, layer: str | None) -> Path:
        """The ONNX graph fed to ``backend``, exported once per model and settings."""
        from alexnet.interop.onnx import export_onnx

        settings = {
            "lrn_graph": LRN_GRAPH[backend],
            "layer": layer,
            "version": GRAPH_VERSION,
            "torch": torch.__version__,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        path = self.dir / f"{LRN_GRAPH[backend]}-{layer or 'logits'}-{key}.onnx"
        written = self.manifest.setdefault("graphs", {})  # file name -> SHA-256 as exported
        if path.exists() and written.get(path.name) != file_digest(path):
            path.unlink()  # damaged, or not recorded as ours: exported again
        if not path.exists():
            cpu = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
            export_onnx(cpu, ckpt, path, lrn_graph=LRN_GRAPH[backend], layer=layer, check=False)
            written[path.name] = file_digest(path)
            self._save()
        return path

    def choice(self, key: str) -> Choice | None:
        found = self.manifest["choices"].get(key)
        return Choice(**found["choice"]) if found else None

    def remember(self, key: str, choice: Choice, seconds: dict[str, float]) -> None:
        self.manifest["choices"][key] = {"choice": asdict(choice), "seconds": seconds}
        self._save()


def open_cache(checkpoint: Path, digest: str) -> EngineCache:
    """Beside the checkpoint; where that is read-only, under the user's cache directory."""
    try:
        return EngineCache(cache_dir(checkpoint), digest)
    except OSError:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return EngineCache(home / "alexnet" / "engines" / digest[:16], digest)


# --------------------------------------------------------------------------------- runners
def make_runner(
    model, ckpt, choice: Choice, layer: str | None, cache: EngineCache | None, *, peer: bool = False
):
    """The runner of ``choice``; ``peer``: the engine with its own defaults, as the bench's
    peers run (only ONNX Runtime's thread spinning differs)."""
    threads = torch.get_num_threads()
    if choice.backend == "torch":
        return TorchRunner(model, choice.precision, choice.channels_last, layer)
    graph = cache.graph(model, ckpt, choice.backend, layer)
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
        self, model, ckpt, choice: Choice, layer, cache, batch_size: int, *, fallback: bool = True
    ) -> None:
        super().__init__()
        self.fallback = fallback  # bf16 that agrees too little is replaced by fp32
        self.model, self.ckpt, self.choice = model, ckpt, choice
        self.layer, self.cache = layer, cache
        self.runner = make_runner(model, ckpt, choice, layer, cache)
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
            self.runner = make_runner(self.model, self.ckpt, self.choice, self.layer, self.cache)
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
    model, ckpt, cache: EngineCache, backend: str, batch: int, layer, precision: str = "auto"
) -> Choice:
    """The fastest candidate at this batch size, timed once and remembered in the cache."""
    # features have no top-1 to check bf16 against (InferenceModel), so auto keeps them fp32
    options = candidates(backend, "fp32" if layer and precision == "auto" else precision)
    if len(options) == 1:
        return options[0]
    b = max(1, min(batch, TIMING_BATCH_MAX))
    key = f"{backend}|{precision}|{layer or 'logits'}|batch={b}|threads={torch.get_num_threads()}"
    found = cache.choice(key)
    if found in options:
        return found
    size, c = model.input_size, model.conv1.in_channels
    x = torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(0)) * 50.0
    runners = {o.label(): make_runner(copy.deepcopy(model), ckpt, o, layer, cache) for o in options}
    seconds = time_runners(runners, x)
    best = min(options, key=lambda o: seconds[o.label()])
    cache.remember(key, best, seconds)
    return best


def for_inference(
    model,
    ckpt: dict,
    checkpoint: Path,
    backend: str = "auto",
    *,
    batch_size: int = 64,
    layer: str | None = None,
    precision: str = "auto",
) -> nn.Module:
    """``model`` run by ``backend`` in ``precision`` (see the module docstring);
    ``batch_size``: the number of inputs per forward pass the command will make (images times
    views). Under ``precision="auto"`` a bf16 choice that agrees too little falls back to fp32;
    asked for by name, bf16 is kept and the report says how well it agreed."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        if backend in ENGINES:  # said before whether the engine is installed: it is moot
            raise UserError(f"--backend {backend}: the engines run on the CPU, not {device}")
        if precision != "bf16":
            return model  # CUDA: torch, with the settings the model has
        choice = Choice("torch", "bf16")
        return InferenceModel(model, ckpt, choice, layer, None, batch_size, fallback=False)
    if backend in ENGINES:
        require(backend)
    # one process at a time (the ranks of one torchrun, two commands): none empties a cache
    # another is writing, and the later ones find the first's timed choice
    with exclusive_lock(checkpoint):
        cache = open_cache(checkpoint, model_digest(model, ckpt))
        choice = choose(model, ckpt, cache, backend, batch_size, layer, precision)
        return InferenceModel(
            model, ckpt, choice, layer, cache, batch_size, fallback=precision == "auto"
        )


def report(model: nn.Module) -> str | None:
    return model.report() if isinstance(model, InferenceModel) else None


def print_report(model: nn.Module, command: str) -> None:
    """``report``'s line on stderr as ``alexnet COMMAND: ...`` (nothing for a plain model)."""
    line = report(model)
    if line:
        print(f"alexnet {command}: {line}", file=sys.stderr)
