"""Runs the lab reuses: a training run trained once (resumed when interrupted), and results
computed once per key and kept in a JSON file, so an interrupted experiment continues where
it stopped."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from alexnet.checkpoint import checkpoint_step, resolve
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_json
from alexnet.train import train


def train_one(cfg, *, retrain: bool, argv: list[str] | None = None) -> dict:
    """Train (or resume, or reuse a finished run); returns ``train()``'s result."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if retrain and run_dir.exists():
        print(f"demo: --retrain: removing {run_dir}")
        shutil.rmtree(run_dir)
    last = resolve(run_dir)
    steps_before = None
    if last.is_file():
        steps_before = checkpoint_step(last)
        print(
            f"{run_dir} holds a run: continuing it (reused as it is if finished; "
            "--retrain starts again)",
            flush=True,
        )
    result = train(
        cfg, resume=run_dir if last.is_file() else None, argv=argv or ["alexnet", "demo"]
    )
    if result["status"] != "finished":
        raise UserError(f"{run_dir}: training stopped ({result['status']}); run again to resume")
    return {**result, "reused": steps_before == result["step"]}


def cached(path: Path, key: str, compute: Callable[[], object]):
    """``compute()``'s JSON-able result, computed once per ``key`` and kept in ``path`` (a JSON
    object of key -> result, rewritten atomically after each new key)."""
    done = json.loads(path.read_text()) if path.is_file() else {}
    if key not in done:
        done[key] = compute()
        atomic_write_json(path, done)
    return done[key]
