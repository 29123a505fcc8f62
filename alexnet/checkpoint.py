"""Complete, atomic checkpoints; ``load_model`` for everything that runs a trained network.

A checkpoint is one ``torch.save``d dict (see docs/ARCHITECTURE.md, "Checkpoints"):

    model         the unwrapped state dict (no ``module.`` / ``_orig_mod.`` prefixes)
    the card      model_config, classes, class_names, data_stats, augment, source, init, data:
                  all inference needs, without the dataset (``alexnet.card.ModelCard``)
    config        the resolved training config (``alexnet.config.TrainConfig.to_dict()``)
    optimizer, schedule, epoch, step, rng, sampler, metrics: all resuming needs

Every value is a tensor or plain Python data, so ``torch.load(..., weights_only=True)`` reads it.
Writes go through ``alexnet.runtime.fileio.atomic_torch_save``: a crash or a full disk while saving
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alexnet.card import ModelCard
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_open, atomic_torch_save, temp_prefix

FORMAT = "alexnet-checkpoint/1"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and ``torch.compile`` wrappers (in any order)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes from keys saved by code that did not unwrap first."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random state a training step reads: python, numpy, torch CPU and CUDA, and the
    given generators (the augmentation generator), as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    """Restore ``rng_state``'s output (CUDA states only when the same devices are there)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    """Atomically write ``checkpoint`` to ``path`` (the old file survives any failure)."""
    path = Path(path)
    atomic_torch_save(path, {"format": FORMAT, **checkpoint})
    return path


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically: a hard link when the filesystem allows
    (no second write of a large file), else a copy through a temporary file."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(temp_prefix(dst) + "link.tmp")  # whose it is: remove_stale_temps
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)


def resolve(path: str | os.PathLike, which: str = "last") -> Path:
    """The checkpoint file meant by ``path``: the file itself, or in a run directory
    ``checkpoints/last.pt`` (``which="last"``: where training stopped, what resuming reads)
    or ``checkpoints/best.pt`` (``which="best"``: the lowest validation error; the last one
    where no best was kept)."""
    path = Path(path)
    if not path.is_dir():
        return path
    best = path / "checkpoints" / "best.pt"
    return best if which == "best" and best.is_file() else path / "checkpoints" / "last.pt"


def weights_of(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The weights every command that uses a network means by ``path`` (predict, evaluate,
    features, figures, convert, --init): a file itself; for a run directory its best
    checkpoint (the lowest validation top-1 error), or its last where it kept no best.
    Returns the file and, for a run directory, a line saying which was taken."""
    path = Path(path)
    if not path.is_dir():
        return path, None
    file = resolve(path, "best")
    if not file.is_file():
        raise UserError(f"{path}: not a run directory with a checkpoint (no {file})")
    ckpt = load_checkpoint(file, mmap=True)
    error = (ckpt.get("metrics") or {}).get("best_val_top1_error")
    why = (
        f"the lowest validation top-1 error, {100 * error:.2f}%"
        if file.name == "best.pt" and isinstance(error, float)
        else "no best checkpoint was kept"
    )
    return file, f"{path}: using {file} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')}: {why})"


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (a file, or a run directory's last
    checkpoint); a clear error for anything else. ``mmap``: tensors are read from the file
    when first used (for a look at its config, say)."""
    path = resolve(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, not a torch file, foreign pickle
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path}: not an alexnet checkpoint (no model / model_config)")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


TRAINING_KEYS = ("config", "optimizer", "schedule", "epoch", "step", "rng", "sampler", "metrics")


def resume_target(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(run directory, checkpoint)`` that ``--resume PATH`` continues: a run directory goes
    on from its last checkpoint. A checkpoint file must be one of a run directory's
    (``<run>/checkpoints/*.pt``, the run's ``config.json`` beside them): a file elsewhere has
    no run to continue, and writing the run's files beside it would overwrite whatever is
    there. A run's best checkpoint is taken only where it is as new as its last one:
    continuing from an older step would overwrite the newer ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(f"{path}: no checkpoints/last.pt, so no run here to resume")
        return path, last
    if not path.is_file():
        raise UserError(f"{path}: no such run directory or checkpoint")
    run = path.parent.parent
    if path.parent.name != "checkpoints" or not (run / "config.json").is_file():
        raise UserError(
            f"{path}: not inside a run directory (<run>/checkpoints/{path.name}); --resume "
            f"continues a run, so give the run's directory. To start a new run from these "
            f"weights: --init {path}"
        )
    last = run / "checkpoints" / "last.pt"
    if last.is_file() and not path.samefile(last):
        mine, newest = checkpoint_step(path), checkpoint_step(last)
        if newest is not None and (mine is None or mine < newest):
            raise UserError(
                f"{path}: step {mine}, older than the run's last checkpoint (step {newest}); "
                f"resuming from it would overwrite the newer one. Resume {run} to go on from "
                f"step {newest}, or start a new run from these weights with --init {path}"
            )
    return run, path


def load_training_checkpoint(
    path: str | os.PathLike, *, mmap: bool = False
) -> tuple[Path, dict[str, Any]]:
    """``(file, checkpoint)`` of a run to resume (see ``resume_target``), which must hold a
    training state, not only weights (an imported or exported checkpoint has no optimizer,
    schedule or position to continue from)."""
    path = Path(path)
    if path.is_file() and path.parent.name != "checkpoints":
        ckpt = load_checkpoint(path, mmap=True)  # weights only? say that, not where it lies
        _require_training_state(path, ckpt)
    _, path = resume_target(path)
    ckpt = load_checkpoint(path, mmap=mmap)
    _require_training_state(path, ckpt)
    return path, ckpt


def _require_training_state(path: Path, ckpt: dict) -> None:
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise UserError(
            f"{path}: not a training checkpoint (no {', '.join(missing)}): it holds weights "
            f"only, so there is no run to resume; start a new run from it with --init {path}"
        )


def load_card(path: str | os.PathLike) -> ModelCard:
    """The card of a checkpoint, run directory (its best) or ``.safetensors`` export, without
    reading its weights (the file is memory-mapped)."""
    path, _ = weights_of(path)
    if path.suffix == ".safetensors":
        return ModelCard.from_dict(_load_safetensors(path), str(path))
    return ModelCard.from_dict(load_checkpoint(path, mmap=True), str(path))


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, ModelCard]:
    """``(model, card)`` from a ``.pt`` checkpoint, a run directory (``weights_of``: its best
    checkpoint) or a ``weights.safetensors`` export. The model is in eval mode on
    ``map_location``; the card (``alexnet.card``) says how to use it."""
    from alexnet.model import AlexNet

    path, _ = weights_of(path)
    ckpt = _load_safetensors(path) if path.suffix == ".safetensors" else load_checkpoint(path)
    card = ModelCard.from_dict(ckpt, str(path))
    config = dict(card.model_config)
    if isinstance(config.get("widths"), list):
        config["widths"] = tuple(config["widths"])
    try:
        model = AlexNet(**{**config, "init": "none"})
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: weights do not fit the model it describes ({e})") from None
    model.config["init"] = config.get("init", "paper")
    return model.to(map_location).eval(), card


STATS_PREFIX = "__data_stats__."


def export_safetensors(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Weights only, for sharing: the model's tensors, the data statistics under
    ``__data_stats__.*``, and the rest of the card as JSON metadata. ``source``: a checkpoint
    or a run directory (its best checkpoint, as everywhere: ``weights_of``). ``load_model``
    reads the result."""
    from safetensors.torch import save as st_save

    path, _ = weights_of(source)
    ckpt = load_checkpoint(path)
    card = ModelCard.from_dict(ckpt, str(path))
    tensors = {k: v.contiguous() for k, v in ckpt["model"].items()}
    for k, v in card.data_stats.items():
        tensors[STATS_PREFIX + k] = v.contiguous()
    meta = {"format": "alexnet-weights/1"}
    for key, value in card.to_dict().items():
        if key != "data_stats":
            meta[key] = json.dumps(value)
    out = Path(out)
    with atomic_open(out, "wb") as f:
        f.write(st_save(tensors, metadata=meta))
    return out


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if "model_config" not in meta:
        raise UserError(f"{path}: no model_config metadata (not written by alexnet)")
    stats = {k[len(STATS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(STATS_PREFIX)}
    # every key but the format is JSON (files of the first version wrote epoch and step as
    # their str(), "None" included)
    card = {}
    for key, text in meta.items():
        if key != "format":
            try:
                card[key] = json.loads(text)
            except ValueError:
                card[key] = None
    return {
        **card,
        "model": {k: v for k, v in tensors.items() if not k.startswith(STATS_PREFIX)},
        "data_stats": stats or None,
    }


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint file was written at (memory-mapped: no tensor is read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file has no step to tell
        return None
    return ckpt.get("step") if isinstance(ckpt, dict) else None
