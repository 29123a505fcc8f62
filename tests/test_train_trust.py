"""Training runs that fail in the ways users meet: settings that cannot work are refused
before any work with one line, damage left by a kill is cleaned up, a run killed before
its first checkpoint can be started again, nothing non-finite is ever saved, and the
TensorBoard record of a resumed run has every step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from trainkit import tiny_config, tiny_data

from alexnet import train as T
from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.runtime.errors import UserError
from alexnet.session import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "tiny")  # 16x16 images


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.crop_size": 20, "data.pad": 2}, "data.crop_size=20: larger than the 16x16"),
        ({"data.crop_size": 40}, "data.crop_size=40: larger than the 16x16"),
        ({"optim.lr": math.inf}, "optim.lr=inf: must be a finite number"),
        ({"data.scale": math.nan}, "data.scale=nan: must be a finite number"),
        ({"model.widths": (8, 16, 16, 16)}, "widths needs five"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_work(data, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        T.train(tiny_config(data, tmp_path, **overrides))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_the_cli_gives_one_line_for_them(data, tmp_path, capsys):
    argv = ["train", "--preset", "quick", "--data", str(data), "--out", str(tmp_path)]
    assert main([*argv, "--lr", "inf"]) == 2
    assert main([*argv, "--set", "data.crop_size=40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("alexnet train: error:") for line in err)


def test_resuming_a_weights_only_checkpoint_is_one_clear_line(data, tmp_path, capsys):
    weights = tmp_path / "imported.pt"
    torch.save({"model": {}, "model_config": {"arch": "small"}}, weights)  # as `convert` writes
    assert main(["train", "--resume", str(weights)]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(data, tmp_path):
    cfg = tiny_config(data, tmp_path, **{"schedule.epochs": 1})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # what a kill at step 2 of epoch 1 leaves
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    result = T.train(cfg)
    assert result["status"] == "finished" and result["run_dir"] == str(run)
    assert not list(run.rglob("*.tmp"))  # the kill's leftover is gone
    with pytest.raises(UserError, match="a run is already there"):
        T.train(cfg)  # now it holds a checkpoint: resume it instead


def test_a_resumed_run_keeps_every_tensorboard_step(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(data, tmp_path, **{"run.log_every": 1, "run.max_steps": 6})
    T.train(cfg)  # stops with a checkpoint at step 6, mid-epoch 2
    cfg.run.max_steps = 0
    T.train(cfg, resume=tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 9))  # steps 1..8, the checkpoint's own (6) once


def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch):
    """The loss stays finite, but the last step leaves an infinite weight: the end-of-epoch
    save refuses, naming the layer, and the last good checkpoint is kept as it was."""
    cfg = tiny_config(data, tmp_path, **{"schedule.epochs": 2})
    T.train(cfg)  # two good epochs: last.pt at step 8
    good = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    step = T.train_step

    def poisoned(s, images, labels, lr):
        out = step(s, images, labels, lr)
        if s.step == 11:  # the last step of epoch 3
            with torch.no_grad():
                s.model.fc8.bias[0] = math.inf
        return out

    monkeypatch.setattr(T, "train_step", poisoned)
    cfg.schedule.epochs = 3
    with pytest.raises(TrainingDiverged, match="non-finite weights in fc8.bias"):
        T.train(cfg, resume=tmp_path / "run")
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert kept["step"] == good["step"] == 8
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_predict_refuses_a_missing_device_and_a_zero_batch_in_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    ckpt = tmp_path / "none.pt"
    assert (
        main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--device", "cuda"])
        == 2
    )
    assert (
        main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(ckpt), "--batch-size", "0"])
        == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "--device cuda: CUDA is not available" in err
    assert "argument --batch-size: must be at least 1" in err


# -- resume only onto what a run was trained on ----------------------------------------------
@pytest.fixture
def trained(data, tmp_path) -> Path:
    """A run of two epochs (8 steps) with a best.pt from epoch 1 older than its last.pt."""
    T.train(tiny_config(data, tmp_path, **{"schedule.epochs": 2, "run.save_every_steps": 2}))
    return tmp_path / "run"


def _error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"alexnet {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resuming_a_checkpoint_outside_a_run_directory_touches_nothing(trained, tmp_path, capsys):
    """`--resume ~/Downloads/last.pt` took ~ for the run directory: it overwrote ~/config.json
    and deleted another program's temp file there."""
    home = tmp_path / "home"
    (home / "Downloads").mkdir(parents=True)
    copied = home / "Downloads" / "last.pt"
    copied.write_bytes((trained / "checkpoints" / "last.pt").read_bytes())
    (home / "config.json").write_text("mine")
    (home / ".notes.txt.1234.tmp").write_text("another program's")
    assert main(["train", "--resume", str(copied), "--epochs", "3"]) == 2
    assert "not inside a run directory" in _error_line(capsys)
    assert (home / "config.json").read_text() == "mine"
    assert sorted(p.name for p in home.rglob("*")) == [
        ".notes.txt.1234.tmp",
        "Downloads",
        "config.json",
        "last.pt",
    ]


def test_resuming_from_an_older_best_checkpoint_is_refused(trained, capsys):
    ckdir = trained / "checkpoints"
    best, last = load_checkpoint(ckdir / "best.pt"), load_checkpoint(ckdir / "last.pt")
    assert best["step"] < last["step"]  # epoch 2 did not improve on epoch 1 here
    before = (ckdir / "last.pt").read_bytes()
    assert main(["train", "--resume", str(ckdir / "best.pt"), "--epochs", "3"]) == 2
    line = _error_line(capsys)
    assert (
        f"step {best['step']}, older than the run's last checkpoint (step {last['step']})" in line
    )
    assert (ckdir / "last.pt").read_bytes() == before


@pytest.mark.parametrize("classes", [list("abdc"), list("abcde")])
def test_resuming_onto_other_data_is_refused(trained, tmp_path, classes, capsys):
    """Other classes of the same count relabelled the model silently; another count ended
    in a state_dict traceback."""
    from alexnet.data import prepare_arrays

    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % len(classes)
    other = prepare_arrays(
        tmp_path / "other", {"train": (images, labels), "val": (images, labels)}, classes
    )
    before = (trained / "checkpoints" / "last.pt").read_bytes()
    argv = ["train", "--resume", str(trained), "--data", str(other), "--epochs", "3"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "not the data" in line and ("class 2 is 'd'" in line or "5 classes" in line), line
    assert (trained / "checkpoints" / "last.pt").read_bytes() == before


def test_switching_channels_last_on_resume_continues_the_same_run(data, tmp_path):
    """run.channels_last may change on resume; the velocity saved in the old layout used to
    be mixed up element by element by the fused step (max |w - exact| 4.4 after a step)."""
    cfg = tiny_config(data, tmp_path / "a", **{"schedule.epochs": 2, "run.deterministic": False})
    whole = load_checkpoint(T.train(cfg)["checkpoint"])["model"]
    cfg = tiny_config(data, tmp_path / "b", **{"schedule.epochs": 1, "run.deterministic": False})
    T.train(cfg)
    cfg.schedule.epochs, cfg.run.channels_last = 2, False
    resumed = load_checkpoint(T.train(cfg, resume=tmp_path / "b" / "run")["checkpoint"])["model"]
    for name, w in whole.items():
        torch.testing.assert_close(resumed[name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_a_full_disk_while_training_keeps_the_last_checkpoint(data, small_disk, capsys):
    """On a real full filesystem: torch.save's failed write is a RuntimeError of torch's,
    which the save turns back into the disk's OSError: one line, the last good checkpoint
    kept, and the run resumes once there is space."""
    disk = small_disk(180)  # room for one checkpoint (~100 KB) but not its replacement
    argv = ["train", "--preset", "quick", "--data", str(data), "--out", str(disk)]
    argv += ["--name", "run", "--batch-size", "16", "--precision", "fp32"]
    argv += ["--set", "model.widths=8,16,16,16,16", "--set", "model.fc_width=32"]
    argv += ["--set", "run.export=false"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "could not save the checkpoint at step" in line and "No space left" in line, line
    kept = load_checkpoint(disk / "run" / "checkpoints" / "last.pt")
    assert 0 < kept["step"] < 12
    assert not list(disk.rglob("*.tmp"))
    small_disk.resize(disk, 4096)
    assert main(["train", "--resume", str(disk / "run")]) == 0
    done = load_checkpoint(disk / "run" / "checkpoints" / "last.pt")
    assert done["step"] == 12 and done["finished"]
