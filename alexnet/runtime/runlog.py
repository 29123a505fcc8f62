"""The run directory: what a run wrote, and enough to say how it was made.

    runs/<name>/config.json     the resolved TrainConfig
    runs/<name>/env.json        git revision, library versions, hardware, command, world size
    runs/<name>/metrics.jsonl   one JSON record per epoch
    runs/<name>/tb/             TensorBoard event files
    runs/<name>/checkpoints/    last.pt, best.pt
    runs/<name>/weights.safetensors

Only rank 0 writes (``enabled=False`` elsewhere), and only while it owns the directory
(``alexnet.runtime.owner``: ``runs/<name>/.lock`` names the process training it; a second
``alexnet train`` on the same run is refused in one line). ``metrics.jsonl`` is rewritten
atomically after each epoch, so a resumed run drops any record newer than its checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_json, atomic_write_text, remove_stale_temps


def claim_run_dir(out_dir: str | Path, name: str, preset: str) -> Path:
    """``out_dir/name``, or a new ``out_dir/<preset>-<date>-<time>`` (suffixed ``-2``, ``-3``...
    if taken). An unnamed run's directory is created here, atomically (``mkdir`` fails for
    every process but one), so two runs started in the same second never share one."""
    out = Path(out_dir)
    if name:
        return out / name
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 10_000):
        path = out / (f"{preset}-{stamp}" + (f"-{k}" if k > 1 else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"{out}: no free run name for {preset}-{stamp}")


def start_fresh(path: Path) -> None:
    """Make ``path`` (owned by this process) ready for a new run. One that already holds a
    checkpoint is an error: resume it or choose another name. One that holds none (its run
    was killed or diverged before the first save) is started afresh: there is nothing to
    resume, and what it logged belongs to no checkpoint."""
    if (path / "checkpoints" / "last.pt").exists():
        raise UserError(f"{path}: a run is already there; resume it with --resume {path}")
    if (path / "metrics.jsonl").exists() or (path / "tb").exists():
        print(
            f"train: {path} holds no checkpoint (its run stopped before the first save): "
            "starting it afresh",
            flush=True,
        )
        shutil.rmtree(path / "tb", ignore_errors=True)
        (path / "metrics.jsonl").unlink(missing_ok=True)


def git_revision() -> dict[str, Any]:
    """The package's git commit and whether the tree had changes (None outside a checkout)."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, world_size: int, argv: list[str] | None) -> dict:
    """Everything about where and how the run ran, for env.json."""
    import numpy

    import alexnet

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": argv,
        "git": git_revision(),
        "versions": {
            "alexnet": alexnet.__version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        },
        "hardware": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpus": gpus,
        },
        "device": str(device),
        "world_size": world_size,
    }


class RunLog:
    """Writes the run directory (rank 0 only: with ``enabled=False`` every method is a no-op)."""

    def __init__(self, path: Path, *, enabled: bool, resume_epoch: int | None = None) -> None:
        self.path, self.enabled = Path(path), enabled
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.path / "checkpoints"):  # left by a kill mid-save
            remove_stale_temps(folder)
        if resume_epoch is not None and self.metrics_path.exists():
            old = [json.loads(s) for s in self.metrics_path.read_text().splitlines() if s]
            self.records = [r for r in old if r["epoch"] <= resume_epoch]

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.path / "config.json", config)

    def write_env(self, env: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.path / "env.json", env)

    def open_tensorboard(self, step: int) -> None:
        """Event files under tb/; on resume, events logged after the checkpoint's ``step``
        are dropped (purge_step drops steps >= its value: the checkpoint's own step was logged
        before it was saved, so it stays)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.path / "tb"), purge_step=step + 1 if step else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for tag, v in values.items():
                self._tb.add_scalar(tag, v, step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to metrics.jsonl (rewritten atomically) and TensorBoard."""
        if not self.enabled:
            return
        self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_text(self.metrics_path, text)
        skip = ("epoch", "step", "event")
        self.scalars({f"epoch/{k}": v for k, v in record.items() if k not in skip}, record["step"])
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run directory's ``metrics.jsonl`` (or of that file), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not records:
        raise UserError(f"{path}: no epochs recorded yet")
    return records


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The one line printed after each epoch (rank 0): every rate in it an error rate."""
    event = {"cut": " [rate cut]", "stop": " [end]"}.get(record["event"], "")
    train = f"train loss {record['train_loss']:.4f}, top-1 error {100 * record['train_error']:.2f}%"
    val = (
        f"val top-1 error {100 * record['val_top1_error']:.2f}%, top-5 error "
        f"{100 * record['val_top5_error']:.2f}%"
    )
    return (
        f"epoch {record['epoch']}/{epochs}: {train} | {val} | lr {record['lr']:.3g} | "
        f"{record['images_per_sec']:.0f} img/s | {record['seconds']:.1f}s{event}"
    )
