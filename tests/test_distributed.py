"""Scale-out: ``alexnet train`` under torchrun with 2 CPU processes (gloo) must give the same
network as one process on the same global batch, and only rank 0 writes.

Why the two runs can agree: the loader gives rank r the strided share ``order[r::2]`` of the
epoch's order, so each global batch of 16 is the same 16 images split 8 + 8; DDP averages
the two ranks' mean gradients, which is the mean over the 16. What would differ are the
random draws, made per rank: dropout masks and augmentation (crop position, flip, colour
noise). The test turns those off (dropout 0, crop = stored size with no padding, no flip,
no colour noise); the float sums then differ only in order, hence a small tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainkit import tiny_config, tiny_data

from alexnet.checkpoint import load_checkpoint
from alexnet.model import AlexNet
from alexnet.runtime import devices
from alexnet.runtime.distributed import DistEnv
from alexnet.runtime.errors import UserError
from alexnet.train import train

SAME_DRAWS = {
    "model.dropout": 0.0,
    "data.pca_std": 0.0,
    "data.flip": False,
    "data.pad": 0,
    "data.crop_size": 0,
}


def _cli_args(data: Path, out: Path) -> list[str]:
    sets = {
        **SAME_DRAWS,
        "model.widths": "8,16,16,16,16",
        "model.fc_width": 32,
        "model.init": "none",
        "data.unit_variance": "false",  # as tiny_config
        "schedule.milestones": 1,
        "run.export": "false",
        "run.log_every": 1,
    }
    args = [
        "train",
        "--data",
        str(data),
        "--preset",
        "quick",
        "--out",
        str(out),
        "--name",
        "run",
        "--batch-size",
        "16",
        "--lr",
        "0.02",
        "--epochs",
        "2",
        "--precision",
        "fp32",
        "--schedule",
        "steps",
    ]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


# ``python -m alexnet`` with a count, once the command is done, of the DDP wrappers still alive.
# With the collector off, only what train() itself lets go of is freed, as at an interpreter's
# exit: a wrapper still alive there holds the gloo group, whose threads can then abort the
# finished process ("terminate called without an active exception", seen once in CI).
LAUNCHER = """
import gc, sys
from alexnet.cli import main
gc.disable()
rc = main(sys.argv[1:])
left = sum(type(o).__name__ == "DistributedDataParallel" for o in gc.get_objects())
print(f"DDP wrappers left: {left}", flush=True)
sys.exit(rc)
"""


def test_two_cpu_processes_match_one(tmp_path):
    data = tiny_data(tmp_path / "data")
    one = train(tiny_config(data, tmp_path / "one", **SAME_DRAWS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(launcher),
        *_cli_args(data, tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DDP wrappers left: 0") == 2, proc.stdout[-3000:]
    # Only rank 0 printed the summary and wrote the run directory.
    assert proc.stdout.count('train: {"status": "finished"') == 1, proc.stdout
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run"]
    run = tmp_path / "two" / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock",  # rank 0's ownership of the run (empty now that it ended)
        "checkpoints",
        "config.json",
        "env.json",
        "metrics.jsonl",
        "tb",
    ]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert (run / ".lock").read_text() == ""

    a = load_checkpoint(Path(one["run_dir"]) / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert b["step"] == a["step"] == 8 and len(b["rng"]["ranks"]) == 2
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)
    # The weights moved: agreement is not just two copies of the initial network.
    torch.manual_seed(0)  # as train() seeds before building the model
    start = AlexNet(**a["model_config"]).state_dict()
    moved = {k: float((start[k] - b["model"][k]).abs().max()) for k in start}
    assert moved["conv1.weight"] > 1e-3 and moved["fc8.weight"] > 1e-3, moved
    ra = [json.loads(s) for s in (Path(one["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb, strict=True):  # all-reduced metrics cover the whole data set
        assert x["val_top1_error"] == y["val_top1_error"]
        assert x["train_error"] == y["train_error"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


def test_environment_is_read_once_and_checked():
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (3, 8, 1, False)
    assert DistEnv.from_environ({}) == DistEnv(0, 1, 0)
    with pytest.raises(UserError, match="RANK=8 outside WORLD_SIZE=8"):
        DistEnv.from_environ({"RANK": "8", "WORLD_SIZE": "8"})


def test_global_batch_must_split_evenly(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    data = tiny_data(tmp_path / "data")
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        train(tiny_config(data, tmp_path))


def test_auto_precision_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):

    cpu = torch.device("cpu")
    assert devices.precision_dtype("fp32", cpu) is None
    assert devices.precision_dtype("bf16", cpu) is torch.bfloat16
    for native, want in ((False, None), (True, torch.bfloat16)):
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda n=native: n)
        assert devices.precision_dtype("auto", cpu) is want


# Rank 0's second checkpoint save fails: with the disk's OSError (a full disk) or with another
# exception (a bug in what is saved).
FAILING_SAVE = """
import errno, os, sys
import alexnet.checkpoint as ckpt_io
from alexnet.cli import main
real, calls = ckpt_io.save_checkpoint, []
def failing(path, checkpoint):
    calls.append(path)
    if len(calls) == 2:
        if sys.argv[1] == "disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise RuntimeError("cannot pickle the checkpoint")
    return real(path, checkpoint)
if os.environ["RANK"] == "0":
    ckpt_io.save_checkpoint = failing
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["disk", "bug"])
def test_a_failed_save_on_rank_0_ends_every_rank_promptly(tmp_path, how):
    """Rank 1 waits for rank 0's save in a collective; a failure that never reached it left
    it waiting for run.dist_timeout_s (600 s by default, 120 here) before the run ended."""
    data = tiny_data(tmp_path / "data")
    launcher = tmp_path / "launch.py"
    launcher.write_text(FAILING_SAVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", str(launcher), how, *_cli_args(data, tmp_path / "out")]
    cmd += ["--set", "run.dist_timeout_s=120"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - t0 < 60, proc.stderr[-3000:]
    assert proc.returncode != 0
    if how == "disk":  # both ranks: one line each, no traceback
        assert proc.stderr.count("alexnet train: error:") == 2, proc.stderr[-3000:]
        assert "could not save the checkpoint at step 8" in proc.stderr
        assert "rank 0 could not save the checkpoint" in proc.stderr
    else:  # rank 0 shows the bug with its traceback; rank 1 stops with one line
        assert "RuntimeError: cannot pickle the checkpoint" in proc.stderr
        assert "rank 0 could not save the checkpoint" in proc.stderr
    last = load_checkpoint(tmp_path / "out" / "run" / "checkpoints" / "last.pt")
    assert last["step"] == 4  # the first save, intact
