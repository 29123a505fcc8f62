"""End-to-end training on a tiny generated dataset: the run directory, learning, resume
exactness (PAPER D1-D5 machinery), non-finite losses, config errors.

The helpers ``tiny_data`` and ``tiny_config`` live in trainkit.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trainkit import tiny_config, tiny_data

from alexnet import config as C
from alexnet import train as T
from alexnet.checkpoint import load_checkpoint, load_model
from alexnet.runtime.errors import UserError
from alexnet.train import TrainingDiverged, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "tiny")


def _weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_directory_and_result(data, tmp_path):
    cfg = tiny_config(data, tmp_path, **{"run.export": True, "run.precision": "bf16"})
    result = train(cfg)
    run = Path(result["run_dir"])
    assert result["status"] == "finished" and result["epoch"] == 2 and result["step"] == 8
    assert result["precision"] == "bf16"  # bf16 autocast runs on the CPU too
    config = json.loads((run / "config.json").read_text())
    assert C.from_dict(config) == cfg
    env = json.loads((run / "env.json").read_text())
    assert {"git", "versions", "hardware", "device"} <= env.keys()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    keys = {"train_loss", "train_error", "val_top1_error", "val_top5_error", "lr"}
    assert keys | {"images_per_sec", "seconds"} <= records[0].keys()
    assert [r["lr"] for r in records] == [0.02, pytest.approx(0.002)]  # the step at epoch 1
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["epoch"] == 2 and ck["step"] == 8 and ck["sampler"]["start_batch"] == 0
    assert ck["sampler"]["epoch"] == 2  # the next epoch, from its first batch
    assert ck["classes"] == list("abcd") and ck["augment"]["crop_size"] == 16
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    # The safetensors export is the best checkpoint's model.
    exported, _ = load_model(run / "weights.safetensors")
    best, _ = load_model(run / "checkpoints" / "best.pt")
    best_ck = load_checkpoint(run / "checkpoints" / "best.pt")
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(exported(x), best(x))
    assert best_ck["metrics"]["best_val_top1_error"] == min(r["val_top1_error"] for r in records)


def test_it_learns(data, tmp_path):
    cfg = tiny_config(
        data,
        tmp_path,
        **{
            "schedule.epochs": 12,
            "schedule.milestones": (10,),
            "model.dropout": 0.0,
            "data.pca_std": 0.0,
        },
    )
    result = train(cfg)
    assert result["val_top1_error"] < 0.5 and result["train_loss"] < 0.8, result  # chance: 0.75


@pytest.mark.parametrize(
    "stop_after, workers",
    [(3, 0), (4, 0), (6, 0), (3, 2)],  # mid-epoch, at the epoch end, in epoch 2; with workers
)
def test_resume_is_bitwise_exact(data, tmp_path, stop_after, workers):
    """N steps straight == k steps, stop (a complete checkpoint), resume to N. Dropout, crop,
    flip and colour noise are all on, so every random state must be restored; with loader
    workers, starting them must not draw from the random state dropout draws from."""
    w = {"data.num_workers": workers}
    straight = train(tiny_config(data, tmp_path / "a", **w))
    first = train(tiny_config(data, tmp_path / "b", **w, **{"run.max_steps": stop_after}))
    assert first["status"] == "stopped" and first["step"] == stop_after
    resumed = train(tiny_config(data, tmp_path / "b", **w), resume=first["run_dir"])
    assert resumed["status"] == "finished" and resumed["step"] == straight["step"]
    _assert_same(_weights(straight["run_dir"]), _weights(resumed["run_dir"]))
    a = load_checkpoint(Path(straight["run_dir"]) / "checkpoints" / "last.pt")["optimizer"]
    b = load_checkpoint(Path(resumed["run_dir"]) / "checkpoints" / "last.pt")["optimizer"]
    for i in a["state"]:
        assert torch.equal(a["state"][i]["velocity"], b["state"][i]["velocity"])

    def records(r):
        lines = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        drop = ("seconds", "images_per_sec")
        return [{k: v for k, v in json.loads(s).items() if k not in drop} for s in lines]

    assert records(straight) == records(resumed)


def test_resume_with_a_different_config_says_what_differs(data, tmp_path):
    first = train(tiny_config(data, tmp_path, **{"run.max_steps": 2}))
    changed = tiny_config(data, tmp_path, **{"optim.lr": 0.1, "model.dropout": 0.2})
    with pytest.raises(UserError, match="cannot resume with a different config") as e:
        train(changed, resume=first["run_dir"])
    assert "optim.lr: 0.02 -> 0.1" in str(e.value) and "model.dropout: 0.5 -> 0.2" in str(e.value)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    from alexnet.data import DeviceAugment

    original, calls = DeviceAugment.__call__, {"n": 0}

    def poisoned(self, images, generator=None):
        x = original(self, images, generator)
        if self.train:
            calls["n"] += 1
            if calls["n"] == 6:  # the sixth training step sees a NaN image
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(DeviceAugment, "__call__", poisoned)
    cfg = tiny_config(data, tmp_path, **{"run.save_every_steps": 1})
    with pytest.raises(TrainingDiverged, match="not finite at step 6") as e:
        train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert str(last) in str(e.value)
    ck = load_checkpoint(last)
    assert ck["step"] == 5
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_config_errors_come_before_any_work(data, tmp_path):
    with pytest.raises(UserError, match="optim.lr=-1.0.*schedule.kind='sometimes'"):
        train(tiny_config(data, tmp_path, **{"optim.lr": -1.0, "schedule.kind": "sometimes"}))
    with pytest.raises(UserError, match="neither a prepared dataset .* nor a folder of images"):
        train(tiny_config(tmp_path / "nowhere", tmp_path))
    with pytest.raises(UserError, match="unknown setting 'optim.lrate'; did you mean optim.lr"):
        tiny_config(data, tmp_path, **{"optim.lrate": 0.1})
    with pytest.raises(UserError, match="fewer than one batch"):
        train(tiny_config(data, tmp_path, **{"optim.batch_size": 128}))
    assert not (tmp_path / "run").exists()


def test_cli_flags_and_overrides():
    import argparse

    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args(
        [
            "--preset",
            "paper-steps",
            "--lr",
            "0.02",
            "--epochs",
            "5",
            "--set",
            "bias_lr_mult=2",
            "--set",
            "optim.bias_decay=false",
            "--compile",
            "--no-channels-last",
        ]
    )
    cfg = T.from_args(args)
    assert cfg.preset == "paper-steps" and cfg.schedule.kind == "steps"
    assert cfg.optim.lr == 0.02 and cfg.schedule.epochs == 5
    assert cfg.optim.bias_lr_mult == 2.0 and cfg.optim.bias_decay is False
    assert cfg.run.compile and not cfg.run.channels_last
    assert cfg.optim.batch_size == 128 and cfg.optim.momentum == 0.9  # PAPER D1
    paper = C.preset("paper")
    assert (paper.optim.lr, paper.schedule.kind, paper.schedule.epochs) == (0.01, "plateau", 90)
    assert paper.optim.weight_decay == 0.0005 and paper.data.crop_size == 224  # D1, B3
    assert math.isclose(paper.schedule.factor, 0.1) and paper.schedule.max_cuts == 3  # D4


def test_two_tower_layout_trains_like_the_grouped_network(data, tmp_path):
    """run.tower_devices on two CPU "devices" exercises the model-parallel path (PAPER A12) that
    `--towers cuda:0,cuda:1` runs; with dropout off it follows the grouped network."""
    same = {"model.dropout": 0.0, "schedule.epochs": 1}
    grouped = train(tiny_config(data, tmp_path / "g", **same))
    towers = train(tiny_config(data, tmp_path / "t", **same, **{"run.tower_devices": "cpu,cpu"}))
    a, b = _weights(grouped["run_dir"]), _weights(towers["run_dir"])
    assert a.keys() == b.keys()  # saved as the grouped network: load_model reads it
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    model, _ = load_model(towers["run_dir"])
    assert model.conv2.groups == 2


def test_model_config_fields_are_the_models_keyword_arguments():
    """One source for the model's options: ModelConfig's fields are AlexNet's keyword
    arguments, less the three the data decides."""
    import dataclasses
    import inspect

    from alexnet.model import AlexNet

    kwargs = set(inspect.signature(AlexNet).parameters)
    fields = {f.name for f in dataclasses.fields(C.ModelConfig)}
    assert fields == kwargs - {"num_classes", "in_channels", "image_size"}
    assert set(AlexNet().config) == kwargs  # model.config rebuilds it: AlexNet(**config)


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_every_preset_is_a_valid_config(name):
    """Each named preset resolves and passes validation (apart from the dataset it needs)."""
    cfg = C.preset(name)
    C.validate(cfg, check_files=False)
    assert cfg.preset == name


@pytest.mark.parametrize("name", ["small", "quick", "demo"])
def test_small_presets_build_a_net_whose_output_depends_on_its_input(name):
    """The small recipes use He init (README): with the paper's N(0, 0.01^2) the small net's
    logits barely depend on the input (SGD then stalls at the label marginal)."""
    import dataclasses

    from alexnet.model import AlexNet

    def spread(model_cfg) -> float:
        torch.manual_seed(0)
        net = AlexNet(10, in_channels=1, image_size=28, **dataclasses.asdict(model_cfg)).eval()
        with torch.no_grad():
            logits = net(torch.randn(64, 1, 28, 28))
        return float(logits.std(dim=0).mean())  # across inputs, per class

    cfg = C.preset(name).model
    assert cfg.init == "kaiming"
    assert spread(cfg) > 0.05  # measured 0.25-0.33
    assert spread(dataclasses.replace(cfg, init="paper")) < 1e-4  # measured ~1e-7: the stall
