"""Fine-tuning (``alexnet train --init SOURCE``, alexnet/finetune.py): transfer is real on real
data, a file in torchvision's own format served on 127.0.0.1 fine-tunes end to end on a
folder of images, fc8 is kept or made anew, layers freeze, pretrained layers take their own
rate, and a fine-tuned run resumes without its source."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_folder_tree
from trainkit import tiny_config, tiny_data
from weightkit import TV_URL, serve, tv_entry

from alexnet import finetune
from alexnet import train as T
from alexnet.card import ModelCard
from alexnet.checkpoint import load_checkpoint, load_model
from alexnet.cli import main
from alexnet.data import prepare_arrays, small
from alexnet.model import AlexNet
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import file_digest


# ------------------------------------------------------------------ transfer on real data
@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Fashion-MNIST as users have it: Debian's package (installed when we are root), else
    the canonical download. Only where neither can be had is the test skipped."""
    from alexnet.lab.fashion import fetch_fashion_mnist

    try:
        folder = fetch_fashion_mnist(None, tmp_path_factory.mktemp("download"))
    except UserError as e:
        pytest.skip(f"Fashion-MNIST cannot be had on this machine: {e}")
    return small.load_fashion_mnist(folder)


def _take(images, labels, classes, per_class, rng):
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    )
    rng.shuffle(idx)
    return images[idx], np.array([classes.index(v) for v in labels[idx]])


def _error(run: Path, data: Path) -> float:
    """Top-1 test error of the run's last checkpoint (the same steps for every run)."""
    out = io.StringIO()
    argv = ["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--data", str(data)]
    with redirect_stdout(out):
        assert main([*argv, "--json", "--precision", "fp32", "--backend", "torch"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])["top1_error"]


@pytest.mark.slow  # one pretraining (~20 s) and six short runs on 2 cores
def test_transfer_is_real_on_fashion_mnist(fashion, tmp_path):
    """A small net trained on Fashion-MNIST classes 0-4 (tops, trousers, pullovers, dresses,
    coats), fine-tuned on 300 images of classes 5-9 (sandals, shirts, sneakers, bags, ankle
    boots), against the same net and recipe from scratch, for the same steps, three seeds.
    Rates: the small recipe trains at 0.01 on unit-variance inputs (He init); the new fc8
    takes 0.04, four times that, as the demo's recipe does, and the pretrained layers 0.01,
    the rate they were trained at (finetune.pretrained_lr_mult 0.25); the run from scratch
    takes 0.04 throughout. Measured here: fine-tuned 18.1/19.6/16.6% test error, from
    scratch 35.0/27.6/28.8%."""
    (x, y), (xt, yt) = fashion["train"], fashion["test"]
    rng = np.random.default_rng(0)
    a, b = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    names = small.FASHION_MNIST_CLASSES
    source = prepare_arrays(
        tmp_path / "a",
        {"train": _take(x, y, a, 3000, rng), "val": _take(xt, yt, a, 100, rng)},
        [names[c] for c in a],
    )
    target = prepare_arrays(
        tmp_path / "b",
        {
            "train": _take(x, y, b, 60, rng),
            "val": _take(x, y, b, 20, rng),
            "test": _take(xt, yt, b, 1000, rng),
        },
        [names[c] for c in b],
        extra_meta={"test_split": "test"},
    )
    net = ["--set", "model.widths=16,32,48,48,32", "--set", "model.fc_width=128"]
    net += ["--precision", "fp32", "--out", str(tmp_path)]
    argv = ["train", "--preset", "small", "--data", str(source), "--name", "pre"]
    assert main([*argv, "--epochs", "4", "--batch-size", "64", *net]) == 0
    recipe = ["--batch-size", "32", "--lr", "0.04", "--epochs", "10", "--schedule", "constant"]
    recipe += ["--set", "optim.warmup_epochs=1", "--data", str(target)]
    margins = []
    for seed in (0, 1, 2):
        tuned, scratch = f"ft{seed}", f"scratch{seed}"
        init = ["--init", str(tmp_path / "pre"), "--pretrained-lr-mult", "0.25"]
        assert main(["train", *init, "--name", tuned, *recipe, *net, "--seed", str(seed)]) == 0
        argv = ["train", "--preset", "small", "--name", scratch, *recipe, *net]
        assert main([*argv, "--seed", str(seed)]) == 0
        ft, sc = _error(tmp_path / tuned, target), _error(tmp_path / scratch, target)
        assert ft < sc, (seed, ft, sc)
        margins.append(sc - ft)
    assert np.mean(margins) > 0.05, margins  # measured 0.17, 0.08, 0.12


# ---------------------------------------------------------- torchvision's format, end to end
def _torchvision_alexnet_state(classes: int) -> tuple[dict, str]:
    """A state dict of torchvision's own AlexNet class where torchvision is installed (its
    real layout and sizes), else the same layout written out by tests/references.py."""
    try:
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.alexnet(num_classes=classes).state_dict(), "torchvision"
    except ImportError:
        from references import torchvision_state

        return torchvision_state(0, classes, widths=(8, 16, 24, 16, 16), fc=32), "stand-in"


@pytest.mark.usefixtures("one_thread")
def test_a_torchvision_file_served_on_loopback_fine_tunes_on_a_folder(server, registered, tmp_path):
    state, made_by = _torchvision_alexnet_state(classes=1000)
    buf = io.BytesIO()
    torch.save(state, buf)
    serve(server, TV_URL, buf.getvalue())
    registered(tv_entry(buf.getvalue()))
    make_folder_tree(tmp_path / "photos", ["cat", "dog", "emu"], per_class=6)
    argv = ["train", "--data", str(tmp_path / "photos"), "--init", "test-owt"]
    argv += ["--out", str(tmp_path / "runs"), "--name", "ft", "--epochs", "1"]
    argv += ["--batch-size", "4", "--precision", "fp32", "--set", "data.holdout=0.2"]
    assert main(argv) == 0, made_by
    ck = load_checkpoint(tmp_path / "runs" / "ft" / "checkpoints" / "last.pt")
    converted = Path(ck["init"]["file"])
    assert ck["init"]["source"] == "test-owt" and ck["init"]["head"] == "new"
    assert ck["init"]["sha256"] == file_digest(converted)
    assert ck["classes"] == ["cat", "dog", "emu"] and ck["model_config"]["arch"] == "owt"
    # torchvision's contract kept: 224 crops of 256 images, its mean as a constant image
    assert ck["augment"]["crop_size"] == 224 and ck["data_stats"]["mean"].shape == (3, 256, 256)
    want = torch.tensor([0.485, 0.456, 0.406]) * 255.0
    torch.testing.assert_close(ck["data_stats"]["mean"][:, 100, 100], want)
    assert (
        main(["predict", str(tmp_path / "photos"), "--checkpoint", str(tmp_path / "runs" / "ft")])
        == 0
    )


# ------------------------------------------------------------------------- the mechanics
def _card(classes: list[str], model: AlexNet) -> ModelCard:
    return ModelCard.from_dict(
        {
            "model_config": model.config,
            "classes": classes,
            "data_stats": {"mean": torch.zeros(3, 16, 16)},
            "augment": {"crop_size": 16},
        }
    )


def test_fc8_is_kept_in_the_datas_order_or_made_anew():
    torch.manual_seed(0)
    kw = dict(arch="small", image_size=16, widths=(8, 16, 16, 16, 16), fc_width=32)
    source = AlexNet(3, **kw)
    start = finetune.Start(_card(["owl", "cat", "dog"], source), source.state_dict(), {})
    model = AlexNet(3, **kw)
    init = finetune.apply(model, start, ["cat", "dog", "owl"])
    assert init["head"] == "kept"
    order = [1, 2, 0]  # cat, dog, owl in the source's rows
    assert torch.equal(model.fc8.weight, source.fc8.weight[order])
    assert torch.equal(model.fc8.bias, source.fc8.bias[order])
    assert torch.equal(model.conv3.weight, source.conv3.weight)
    other = AlexNet(4, **kw)
    made = other.fc8.weight.clone()
    assert finetune.apply(other, start, ["a", "b", "c", "d"])["head"] == "new"
    assert torch.equal(other.fc8.weight, made) and torch.equal(other.fc7.weight, source.fc7.weight)
    # a class whose name holds '/' comes from a folder with '_' (sources.folder_name)
    start = finetune.Start(_card(["T-shirt/top", "Bag", "Coat"], source), source.state_dict(), {})
    model = AlexNet(3, **kw)
    assert finetune.apply(model, start, ["Bag", "Coat", "T-shirt_top"])["head"] == "kept"
    assert torch.equal(model.fc8.weight, source.fc8.weight[[1, 2, 0]])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def source_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source")
    T.train(tiny_config(data, out, **{"schedule.epochs": 1}))
    return out / "run"


@pytest.mark.usefixtures("one_thread")
def test_frozen_layers_stay_and_pretrained_layers_take_their_rate(data, source_run, tmp_path):
    cfg = tiny_config(data, tmp_path, **{"schedule.epochs": 1})
    cfg.finetune.source, cfg.finetune.freeze_below = str(source_run), "fc6"
    cfg.finetune.pretrained_lr_mult = 0.1
    T.train(cfg)
    before = load_model(source_run)[0].state_dict()
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    for name, w in after["model"].items():
        frozen = name.split(".")[0] in ("conv1", "conv2", "conv3", "conv4", "conv5")
        assert torch.equal(w, before[name]) == frozen, name
    groups = {g["name"]: g["lr_mult"] for g in after["optimizer"]["param_groups"]}
    assert groups == {"pretrained weights": 0.1, "pretrained biases": 0.1}  # fc8 kept
    assert after["init"]["freeze_below"] == "fc6"


@pytest.mark.usefixtures("one_thread")
def test_a_fine_tuned_run_resumes_without_its_source(data, source_run, tmp_path):
    """The run holds what it took from its source (weights, mean image, crop, scale): a
    source moved or deleted since does not stop it from resuming, bitwise as unbroken."""
    copy = tmp_path / "src.pt"
    copy.write_bytes((source_run / "checkpoints" / "best.pt").read_bytes())
    cfg = tiny_config(data, tmp_path / "a", **{"schedule.epochs": 2})
    cfg.finetune.source = str(copy)
    whole = load_checkpoint(T.train(cfg)["checkpoint"])
    cfg = tiny_config(data, tmp_path / "b", **{"schedule.epochs": 2, "run.max_steps": 5})
    cfg.finetune.source = str(copy)
    T.train(cfg)
    copy.unlink()
    cfg.run.max_steps = 0
    resumed = load_checkpoint(T.train(cfg, resume=tmp_path / "b" / "run")["checkpoint"])
    for name, w in whole["model"].items():
        assert torch.equal(resumed["model"][name], w), name
    assert resumed["init"] == whole["init"]


def test_a_source_that_is_neither_a_file_nor_a_name_is_one_line(data, tmp_path, capsys):
    argv = ["train", "--data", str(data), "--init", "IMAGENET1K_V2", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "did you mean 'IMAGENET1K_V1'" in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------- the small recipes on raw data
@pytest.mark.parametrize("preset", ["quick", "small"])
def test_the_small_recipes_train_on_data_as_prepare_stores_it(fashion, tmp_path, preset):
    """Fashion-MNIST as `alexnet prepare fashion-mnist` stores it (raw 0-255 pixels), at the
    preset's own rate: with He init on raw pixels the loss was NaN by step 5; the recipes now
    divide the inputs by the training pixels' std (data.unit_variance)."""
    from alexnet import config as C

    (x, y), (xt, yt) = fashion["train"], fashion["test"]
    data = prepare_arrays(
        tmp_path / "fmnist",
        {"train": (x[:6400], y[:6400]), "val": (xt[:1000], yt[:1000])},
        small.FASHION_MNIST_CLASSES,
    )
    cfg = C.preset(preset, **{"data.root": str(data), "run.out_dir": str(tmp_path)})
    cfg.schedule.epochs, cfg.run.name = 1, "run"
    result = T.train(cfg)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert result["status"] == "finished" and math.isfinite(record["train_loss"])
    assert record["val_top1_error"] < 0.4, record  # learning, not the label marginal (0.9)
