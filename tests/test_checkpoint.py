"""Checkpoints: complete, atomic, unwrapped; load_model; the safetensors export; a full disk."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from trainkit import tiny_config, tiny_data

from alexnet import checkpoint as ck_io
from alexnet.model import AlexNet
from alexnet.runtime.errors import UserError
from alexnet.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _small() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(
        5, arch="small", in_channels=1, image_size=16, widths=(4, 8, 8, 8, 8), fc_width=16
    )


def test_wrappers_are_removed():
    model = _small()
    compiled = torch.compile(model)  # not run: only the wrapper's key prefix matters here
    assert ck_io.unwrap(compiled) is model
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")
    prefixed = {"module._orig_mod." + k: v for k, v in model.state_dict().items()}
    assert ck_io.clean_state_dict(prefixed).keys() == model.state_dict().keys()


def test_every_random_state_round_trips():
    gen = torch.Generator().manual_seed(7)
    state = ck_io.rng_state(gen)

    def draw():
        return (
            random.random(),
            float(np.random.rand()),
            float(torch.rand(())),
            float(torch.rand((), generator=gen)),
        )

    first = draw()
    ck_io.set_rng_state(state, gen)
    assert draw() == first


def test_load_model_and_safetensors_export(tmp_path):
    model = _small().eval()
    stats = {"mean": torch.rand(1, 16, 16), "eigvals": torch.ones(1), "eigvecs": torch.eye(1)}
    ck_io.save_checkpoint(
        tmp_path / "a.pt",
        {
            "model": model.state_dict(),
            "model_config": model.config,
            "classes": list("abcde"),
            "class_names": list("ABCDE"),
            "data_stats": stats,
            "augment": {"crop_size": 16},
            "epoch": 3,
            "step": 30,
        },
    )
    loaded, ck = ck_io.load_model(tmp_path / "a.pt")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x)) and not loaded.training
    assert ck.classes == tuple("abcde") and ck.crop_size == 16
    out = ck_io.export_safetensors(tmp_path / "a.pt", tmp_path / "w.safetensors")
    exported, meta = ck_io.load_model(out)
    assert torch.equal(exported(x), model(x))
    assert torch.equal(meta.data_stats["mean"], stats["mean"])
    assert meta.class_names == tuple("ABCDE") and meta.epoch == 3
    assert AlexNet(**exported.config).config == model.config


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        ck_io.load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    ck_io.save_checkpoint(good, {"model": _small().state_dict(), "model_config": {}})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])  # what a non-atomic writer leaves on a full disk
    with pytest.raises(UserError, match="cut.pt: not a readable checkpoint"):
        ck_io.load_checkpoint(cut)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an alexnet checkpoint"):
        ck_io.load_checkpoint(tmp_path / "other.pt")


def test_a_full_disk_never_corrupts_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = tiny_data(tmp_path / "data")
    first = train(tiny_config(data, tmp_path, **{"run.max_steps": 2}))
    last = Path(first["run_dir"]) / "checkpoints" / "last.pt"
    before = last.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)  # part of the file made it, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"could not save the checkpoint at step 3 .*No space"):
        train(tiny_config(data, tmp_path, **{"run.max_steps": 3}), resume=first["run_dir"])
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before
    assert ck_io.load_checkpoint(last)["step"] == 2
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    # ... and the run resumes from it once there is space again.
    done = train(tiny_config(data, tmp_path), resume=first["run_dir"])
    assert done["status"] == "finished" and done["step"] == 8
