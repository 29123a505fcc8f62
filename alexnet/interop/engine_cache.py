"""What the inference engines keep between runs (``alexnet.interop.engines``).

- Per checkpoint, ``<checkpoint>.engines/``: ``manifest.json`` (the SHA-256 of the weights
  and model settings, the timed choices) and the exported ONNX graphs and compiled models.
  A cache holding another digest is emptied first, so it never serves another model.
- Per machine, ``$ALEXNET_HOME/engines/machine.json``: what each timing found for a kind of
  job (the architecture, crop, batch size, layer, precision asked, threads) with this
  processor and these library versions, and what each engine's first export and compile
  took. A checkpoint of the same architecture then needs no timing of its own to decide
  that a few images are served fastest by torch, or which engine a large job should use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from alexnet.card import ModelCard
from alexnet.runtime.fileio import atomic_write_json, exclusive_lock, file_digest
from alexnet.runtime.paths import home

GRAPH_VERSION = 1  # part of the cache key: bump when the export changes
# How each engine is fed per-tower LRN (alexnet.interop.onnx._ExportLRN), the faster of
# the exact forms measured (docs/SPEED.md): OpenVINO's LRN kernel is fast once one op sees
# each tower as a batch item; ONNX Runtime's LRN is slow, a 1x1 convolution is not.
LRN_GRAPH = {"openvino": "reshape", "onnxruntime": "band"}


@dataclass(frozen=True)
class Choice:
    backend: str  # torch, openvino or onnxruntime
    precision: str  # fp32 or bf16
    channels_last: bool = False  # torch only

    def label(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        return f"{self.backend} {self.precision}{layout}"


def model_digest(model: nn.Module, card: ModelCard) -> str:
    """SHA-256 of the weights and of what shapes the graph (model config, input crop)."""
    shape = {"model_config": dict(card.model_config), "crop": card.crop_size, "scale": card.scale}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode())
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
    """``manifest.json`` and the exported graphs of one model (see the module docstring)."""

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

    def graph_path(self, backend: str, layer: str | None) -> Path:
        settings = {
            "lrn_graph": LRN_GRAPH[backend],
            "layer": layer,
            "version": GRAPH_VERSION,
            "torch": torch.__version__,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        return self.dir / f"{LRN_GRAPH[backend]}-{layer or 'logits'}-{key}.onnx"

    def has_graph(self, backend: str, layer: str | None) -> bool:
        path = self.graph_path(backend, layer)
        return path.exists() and path.name in self.manifest.get("graphs", {})

    def graph(self, model: nn.Module, card: ModelCard, backend: str, layer: str | None) -> Path:
        """The ONNX graph fed to ``backend``, exported once per model and settings."""
        from alexnet.interop.onnx import export_onnx

        path = self.graph_path(backend, layer)
        written = self.manifest.setdefault("graphs", {})  # file name -> SHA-256 as exported
        if path.exists() and written.get(path.name) != file_digest(path):
            path.unlink()  # damaged, or not recorded as ours: exported again
        if not path.exists():
            cpu = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
            export_onnx(cpu, card, path, lrn_graph=LRN_GRAPH[backend], layer=layer, check=False)
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
    """Beside the checkpoint; where that is read-only, under ``$ALEXNET_HOME/engines``."""
    try:
        return EngineCache(cache_dir(checkpoint), digest)
    except OSError:
        return EngineCache(home() / "engines" / digest[:16], digest)


# ------------------------------------------------------------------------------ machine
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for name in ("openvino", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        text = "".join(sorted(set(lines)))
    except OSError:
        text = platform.processor() or platform.machine()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_key(card: ModelCard, key: str) -> str:
    """A kind of job on this machine: the architecture without its classes, the input, and
    the choice's own key (backend asked, precision, layer, batch, threads)."""
    arch = {k: v for k, v in card.model_config.items() if k not in ("num_classes", "init")}
    shape = json.dumps({"arch": arch, "crop": card.crop_size}, sort_keys=True, default=str)
    versions = json.dumps(_versions(), sort_keys=True)
    return hashlib.sha256(f"{_processor()}|{versions}|{shape}|{key}".encode()).hexdigest()[:24]


class MachineRecord:
    """``$ALEXNET_HOME/engines/machine.json``: per kind of job, the seconds per call of each
    candidate and the seconds its first export and compile took."""

    def __init__(self) -> None:
        self.path = home() / "engines" / "machine.json"

    def _read(self) -> dict:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def get(self, job: str) -> dict | None:
        found = self._read().get(job)
        ok = isinstance(found, dict) and {"seconds", "setup"} <= set(found)
        return found if ok else None

    def put(self, job: str, seconds: dict[str, float], setup: dict[str, float]) -> None:
        try:
            with exclusive_lock(self.path.with_name(".machine.lock"), create=True):
                record = self._read()
                record[job] = {"seconds": seconds, "setup": setup}
                atomic_write_json(self.path, record)
        except OSError:
            pass  # a read-only home: the next run times again, nothing is wrong
