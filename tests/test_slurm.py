"""The Slurm path (recipes/paper-slurm.sbatch) on a CPU: the script itself, run by bash with
stand-ins for Slurm's ``srun`` (runs the task here, passes signals on) and ``scontrol``
(names this host, records a requeue). The warning before the time limit (SIGUSR1 to the
batch script) makes the run save and stop, and the job requeue itself; the requeued job
resumes the run and finishes it, and is not requeued again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import tiny_data

from alexnet.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

SRUN = """#!PYTHON
# srun's stand-in: one task here, with the task variables, signals passed on
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun's own options, before the command
    args = args[1:]
env = {**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
child = subprocess.Popen(args, env=env)
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: child.send_signal(s))
sys.exit(child.wait())
"""

SCONTROL = """#!/usr/bin/env bash
# scontrol's stand-in
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  requeue*) echo "requeue $2" >> "$SLURM_TEST_LOG" ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.replace("PYTHON", sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    venv_bin = Path(sys.executable).parent
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_TEST_LOG": str(tmp_path / "scontrol.log"),
        "DATA": str(tiny_data(tmp_path / "data")),
        "OUT": str(tmp_path / "runs"),
        "RUN": "run",
        "WORKERS": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


TINY = [
    "--preset",
    "quick",
    "--epochs",
    "40",
    "--batch-size",
    "16",
    "--precision",
    "fp32",
    "--set",
    "model.widths=8,16,16,16,16",
    "--set",
    "model.fc_width=32",
    "--set",
    "schedule.milestones=30",
    "--set",
    "run.export=false",
]


def test_the_time_limit_warning_saves_requeues_and_the_next_job_finishes(slurm, tmp_path):
    script = ROOT / "recipes" / "paper-slurm.sbatch"
    job = subprocess.Popen(
        ["bash", str(script), *TINY],
        env=slurm,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = tmp_path / "runs" / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch script
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 130, out[-3000:]
    assert "stopping (SIGUSR1)" in out and "requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    stopped = load_checkpoint(last)
    assert not stopped["finished"] and 0 < stopped["step"] < 40 * 4
    # the requeued job: the same script, finds the checkpoint, resumes, finishes
    again = subprocess.run(
        ["bash", str(script)], env=slurm, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming at epoch {stopped['epoch'] + 1}, step {stopped['step']}" in again.stdout
    done = load_checkpoint(last)
    assert done["finished"] and done["step"] == 40 * 4
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again
