"""A real interruption: ``alexnet train`` killed with SIGKILL mid-run, then resumed, ends with
the same weights as a run never interrupted (CPU, deterministic mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainkit import tiny_config, tiny_data

from alexnet.checkpoint import load_checkpoint
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_write_json
from alexnet.train import train


def _step(path: Path) -> int | None:
    try:
        return load_checkpoint(path)["step"]
    except UserError:  # not there yet
        return None


@pytest.mark.slow  # three training runs and a subprocess: ~15 s on an idle 2-core CPU
def test_sigkill_then_resume_equals_an_unbroken_run(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs with OMP_NUM_THREADS=1: same kernels, same sums
    try:
        data = tiny_data(tmp_path / "data", n_train=256)
        settings = {"schedule.epochs": 3, "run.save_every_steps": 3, "run.log_every": 4}
        straight = train(tiny_config(data, tmp_path / "a", **settings))
        cfg = tiny_config(data, tmp_path / "b", **settings)
        atomic_write_json(tmp_path / "config.json", cfg.to_dict())
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "alexnet", "train", "--config", str(tmp_path / "config.json")]
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        last = tmp_path / "b" / "run" / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 120
        while (_step(last) or 0) < 9 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
        killed_at = load_checkpoint(last)
        assert killed_at["finished"] is None and 9 <= killed_at["step"] < straight["step"]
        resumed = train(cfg, resume=tmp_path / "b" / "run")
        assert resumed["status"] == "finished" and resumed["step"] == straight["step"] == 48
        a = load_checkpoint(Path(straight["run_dir"]) / "checkpoints" / "last.pt")["model"]
        b = load_checkpoint(Path(resumed["run_dir"]) / "checkpoints" / "last.pt")["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), k
    finally:
        torch.set_num_threads(before)
