"""Your own images, as a new user brings them: folders and lists for predict, folders of
class folders for evaluate, features and figures (prepared once into a keyed cache), phone
photos with an EXIF orientation, a diverged network refused rather than printed as NaN, a
run directory meaning the same weights in every command, and the Python API."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import evalkit
import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import Predictor, figures
from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.data import PreparedDataset
from alexnet.data.pipeline import stored_image
from alexnet.runtime import paths


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_HOME, str(tmp_path / "home"))
    return tmp_path / "home"


def _json(capsys) -> object:
    return json.loads(capsys.readouterr().out)


def _as_folder(ds: PreparedDataset, root: Path) -> Path:
    """The split's images as lossless PNG files in one folder per class id."""
    for i in range(len(ds)):
        folder = root / ds.classes[int(ds.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.get_batch(np.array([i]))[0].permute(1, 2, 0).numpy()).save(
            folder / f"{i:03d}.png"
        )
    return root


# ------------------------------------------------------------------------------- predict
def test_predict_takes_folders_and_lists_and_names_what_it_cannot_read(tmp_path, capsys):
    ckpt = evalkit.known_checkpoint(tmp_path / "known.pt", [0.3, 2.0, 1.5, -1.0])
    (tmp_path / "photos" / "trip" / ".hidden").mkdir(parents=True)
    for name in ("a.jpg", "trip/b.png", "trip/.hidden/c.jpg"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "photos" / name)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'photos' / 'a.jpg'}\n\n{tmp_path / 'missing.jpg'}\n")
    argv = ["predict", str(tmp_path / "photos"), f"@{listed}", "--checkpoint", str(ckpt)]
    assert main([*argv, "--json", "--top", "1"]) == 2  # one listed file is missing
    out = capsys.readouterr()
    rows = json.loads(out.out)
    files = [Path(r["file"]).relative_to(tmp_path).as_posix() for r in rows]
    assert files == ["photos/a.jpg", "photos/trip/b.png", "photos/a.jpg", "missing.jpg"]
    assert [r["predictions"][0]["class_index"] for r in rows[:3]] == [1, 1, 1]
    assert rows[3]["error"] == "No such file or directory"
    # nothing is left out of a folder without a word
    assert "photos: left out 2 entries: " in out.err
    assert "notes.txt: not an image file" in out.err and ".hidden/: hidden" in out.err


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    """Orientation 6: the camera stored the pixels turned 90 degrees; a viewer turns them
    back. Predict and `prepare folder` see what the viewer shows; ImageNet's preparation
    keeps ILSVRC's pixels as stored (the paper's)."""
    upright = np.zeros((60, 40, 3), np.uint8)
    upright[:20] = (250, 0, 0)  # red on top
    Image.fromarray(upright).save(tmp_path / "upright.png")
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # as the sensor read it
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    want = stored_image(tmp_path / "upright.png", 32, 3).astype(int)
    got = stored_image(tmp_path / "phone.jpg", 32, 3).astype(int)
    assert np.abs(got - want).mean() < 3, "predict must see the photo upright"
    from alexnet.data.pipeline import RecordFormat, load_rgb

    as_stored, _ = load_rgb((tmp_path / "phone.jpg").read_bytes(), RecordFormat(32))
    assert np.abs(as_stored.transpose(2, 0, 1).astype(int) - want).mean() > 30  # imagenet's


def test_a_diverged_network_is_refused_never_printed_as_nan(tmp_path, capsys):
    path = evalkit.known_checkpoint(tmp_path / "nan.pt", [0.3, math.nan, 1.5, -1.0, 0, 0, 0, 0])
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "x.png")
    for extra in ([], ["--json"]):
        assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(path), *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "nan" not in out.lower()
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and "not finite" in lines[0] and "Traceback" not in err
    data = evalkit.make_dataset(tmp_path / "data", n_train=8, n_val=8)
    argv = ["evaluate", "--checkpoint", str(path), "--data", str(data), "--json"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "not finite" in err


# ----------------------------------------------------------------- folders for evaluation
def test_evaluate_features_and_figures_take_a_folder_of_images(tmp_path, capsys, home):
    data, run = evalkit.tiny_run()
    folder = _as_folder(PreparedDataset(data, "val"), tmp_path / "val")
    capsys.readouterr()  # what training the tiny run printed
    common = ["--checkpoint", str(run), "--precision", "fp32", "--backend", "torch"]
    assert main(["evaluate", *common, "--data", str(data), "--split", "val", "--json"]) == 0
    prepared = _json(capsys)
    assert main(["evaluate", *common, "--data", str(folder), "--json"]) == 0
    from_folder, err = capsys.readouterr()
    from_folder = json.loads(from_folder)
    assert "preparing it once" in err and "using" in err and "best.pt" in err
    for key in ("top1_error", "top5_error", "images"):
        assert from_folder[key] == prepared[key], key
    assert main(["evaluate", *common, "--data", str(folder), "--json"]) == 0
    assert "the cache made of it before" in capsys.readouterr().err
    [cache] = (home / "datasets").iterdir()  # a split to evaluate, no training statistics
    assert main(["prepare", "verify", str(cache)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{cache}: OK")
    out = tmp_path / "val.npy"
    assert main(["features", "extract", *common, "--data", str(folder), "--out", str(out)]) == 0
    assert np.load(out).shape == (len(PreparedDataset(data, "val")), 32)
    png = tmp_path / "p.png"
    assert main(["figures", "predictions", *common, "--data", str(folder), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    # one image changed: a new key, a new cache (never a stale one)
    first = sorted((folder / evalkit.CLASSES[0]).iterdir())[0]
    Image.new("RGB", (32, 32), (0, 0, 0)).save(first)
    assert main(["evaluate", *common, "--data", str(folder), "--json"]) == 0
    assert "preparing it once" in capsys.readouterr().err
    assert len(list((home / "datasets").iterdir())) == 2


def test_a_folder_with_classes_the_network_does_not_have_is_one_line(tmp_path, capsys):
    _, run = evalkit.tiny_run()
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "val" / "zebra" / "z.png")
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(tmp_path / "val")]) == 2
    err = capsys.readouterr().err
    assert "class folders not in the training set: ['zebra']" in err and "Traceback" not in err


def test_features_and_figures_of_photos_of_classes_the_network_never_saw(
    tmp_path, capsys, monkeypatch
):
    """fc7 of anyone's photos: features and figures read a folder by its own labels where
    they are not the network's (evaluate still refuses it, above)."""
    _, run = evalkit.tiny_run()
    rng = np.random.default_rng(0)
    for cls in ("yak", "zebra"):
        (tmp_path / "mine" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "mine" / cls / f"{i}.png")
    common = ["--checkpoint", str(run), "--data", str(tmp_path / "mine")]
    out = tmp_path / "f.npy"
    assert main(["features", "extract", *common, "--out", str(out)]) == 0
    assert np.load(out).shape == (8, 32)
    seen = {}
    real = figures.plot_neighbours
    monkeypatch.setattr(
        figures, "plot_neighbours", lambda *a, **k: (seen.update(a=a, k=k), real(*a, **k))
    )
    png = tmp_path / "nn.png"
    argv = ["figures", "neighbours", *common, "--n", "2", "-k", "3", "--out", str(png)]
    assert main(argv) == 0 and png.stat().st_size > 1000
    distances = seen["a"][4]
    assert distances.shape == (2, 3) and distances.min() > 0  # no query is its own neighbour
    assert seen["k"]["searched"] == 6 and seen["k"]["what"] == "other images of the folder"
    assert seen["a"][5] == ["yak", "zebra"]  # the folder's own class names label the images
    png = tmp_path / "p.png"
    argv = ["figures", "predictions", *common, "--n", "2", "--out", str(png)]
    assert main(argv) == 0 and png.stat().st_size > 1000
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------- a run directory, everywhere
def test_a_run_directory_means_its_best_checkpoint_in_every_command(tmp_path, capsys):
    """It meant best.pt to predict and evaluate but last.pt to `convert safetensors`, so one
    run predicted different classes through the two."""
    data, run = evalkit.tiny_run()
    best, last = (load_checkpoint(run / "checkpoints" / n) for n in ("best.pt", "last.pt"))
    capsys.readouterr()
    assert best["step"] < last["step"]  # they differ, so the check can fail
    image = tmp_path / "x.png"
    Image.fromarray(PreparedDataset(data, "val").get_batch([0])[0].permute(1, 2, 0).numpy()).save(
        image
    )

    def probs(*source) -> list:
        argv = ["predict", str(image), *source, "--json", "--top", "8", "--precision", "fp32"]
        assert main(argv) == 0
        return sorted(
            (p["class_index"], round(p["probability"], 6)) for p in _json(capsys)[0]["predictions"]
        )

    st = tmp_path / "run.safetensors"
    assert main(["convert", "safetensors", "--checkpoint", str(run), "--out", str(st)]) == 0
    assert "best.pt" in capsys.readouterr().err
    from_run = probs("--checkpoint", str(run))
    assert from_run == probs("--checkpoint", str(run / "checkpoints" / "best.pt"))
    assert from_run == probs("--checkpoint", str(st))
    assert from_run != probs("--checkpoint", str(run / "checkpoints" / "last.pt"))


# ------------------------------------------------------------------------------- Python
def test_the_python_api_takes_paths_pil_images_and_arrays(tmp_path):
    data, run = evalkit.tiny_run()
    record = PreparedDataset(data, "val").get_batch([5])[0].permute(1, 2, 0).numpy()
    Image.fromarray(record).save(tmp_path / "x.png")
    p = Predictor.load(run, device="cpu", backend="torch", precision="fp32")
    by_path, by_pil, by_array = p.predict(
        [tmp_path / "x.png", Image.open(tmp_path / "x.png"), record], top=3
    )
    assert by_path == by_pil == by_array
    assert [c["class_id"] for c in by_path][0] in evalkit.CLASSES
    feats = p.features([record], "fc7")
    assert feats.shape == (1, 32) and torch.isfinite(feats).all()
    assert p.probabilities([record], views=10).shape == (1, len(evalkit.CLASSES))


def test_library_entry_points_keep_freed_memory_as_the_cli_does(monkeypatch, tmp_path):
    """The CLI set glibc to keep freed memory; the same training step imported as a library
    ran without it (46% of the bf16 peak against 69%). Training and the predictor now set it
    when they start (never at import), and ALEXNET_MALLOC=default still opts out."""
    from alexnet.runtime import memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda keep=True: calls.append(keep) or True)
    _, run = evalkit.tiny_run()
    Predictor.load(run, device="cpu", backend="torch")
    assert calls == [True]
    monkeypatch.setenv("ALEXNET_MALLOC", "default")
    Predictor.load(run, device="cpu", backend="torch")
    assert calls == [True]


def test_a_folder_of_split_folders_reports_on_its_test_split(tmp_path, capsys):
    data, run = evalkit.tiny_run()
    ds = PreparedDataset(data, "val")
    _as_folder(ds, tmp_path / "photos" / "test")
    _as_folder(PreparedDataset(data, "train"), tmp_path / "photos" / "train")
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(run), "--data", str(tmp_path / "photos"), "--json"]
    assert main([*argv, "--backend", "torch", "--precision", "fp32"]) == 0
    result = _json(capsys)
    assert result["split"] == "test" and result["images"] == len(ds)
    assert main(argv[:-1] + ["--backend", "torch"]) == 0
    assert "images of test (the folder's test/ images)" in capsys.readouterr().out


def test_a_mistyped_setting_is_refused_before_a_folder_is_prepared(tmp_path, capsys, home):
    from datagen import make_folder_tree

    make_folder_tree(tmp_path / "photos", ["a", "b"], per_class=3)
    argv = ["train", "--data", str(tmp_path / "photos"), "--lr", "-1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "optim.lr=-1.0: must be > 0" in capsys.readouterr().err
    assert not (home / "datasets").exists()  # nothing was prepared for a run that cannot start


def test_an_unfinished_cache_of_a_folders_earlier_contents_is_removed(tmp_path, capsys, home):
    data, run = evalkit.tiny_run()
    folder = _as_folder(PreparedDataset(data, "val"), tmp_path / "val")
    bad = folder / evalkit.CLASSES[0] / "truncated.png"
    bad.write_bytes(sorted((folder / evalkit.CLASSES[0]).iterdir())[0].read_bytes()[:60])
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(run), "--backend", "torch", "--data", str(folder)]
    assert main(argv) == 2
    assert "truncated.png" in capsys.readouterr().err
    [refused] = (home / "datasets").iterdir()
    assert (refused / "bad_files.txt").is_file()
    # the same refused folder again: the same unfinished cache, resumed, still refused
    assert main(argv) == 2
    assert list((home / "datasets").iterdir()) == [refused]
    # an unfinished cache of another folder of the same name is not this folder's to remove
    other = home / "datasets" / f"{refused.name[:-4]}beef"
    other.mkdir()
    (other / "source.txt").write_text(str(tmp_path / "elsewhere" / "val"))
    # and one that another process is preparing is left to it
    busy = home / "datasets" / f"{refused.name[:-4]}cafe"
    busy.mkdir()
    (busy / "source.txt").write_text(str(folder))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(busy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        bad.unlink()  # the user fixes the folder: new contents, a new cache
        assert main(argv) == 0
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"removed an unfinished cache of its earlier contents ({refused})" in err
    assert not refused.exists() and other.exists() and busy.exists()
    assert len(list((home / "datasets").iterdir())) == 3


HOLD = """import sys, time
from alexnet.runtime.owner import owned
with owned(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_network_of_grey_images_reads_and_fine_tunes_on_a_folder_of_photos(tmp_path, capsys):
    """The Fashion-MNIST demo's kind of network (one channel) on a folder of RGB photos: the
    folder is prepared in grey (PIL's luma, as predict reads a photo), so evaluate scores it
    as the same images prepared in grey, and a fine-tuning run keeps fc8 where the class
    folders are the network's classes ('T-shirt/top' read from 'T-shirt_top/')."""
    from trainkit import tiny_config

    from alexnet.data.sources import folder_name
    from alexnet.data.store import prepare_arrays
    from alexnet.train import train

    rng = np.random.default_rng(0)
    classes = ["T-shirt/top", "Trouser", "Bag"]

    def split(n):
        labels = np.arange(n) % 3
        grey = rng.integers(0, 60, (n, 20, 20)).astype(np.uint8)
        for k, c in enumerate(labels):  # a bright block whose place is the class
            grey[k, 2 + 5 * c : 8 + 5 * c, 4:16] += 150
        return grey, labels

    data = prepare_arrays(tmp_path / "grey", {"train": split(48), "val": split(24)}, classes)
    cfg = tiny_config(data, tmp_path / "runs", **{"run.name": "grey", "schedule.epochs": 1})
    run = Path(train(cfg)["run_dir"])
    val = PreparedDataset(data, "val")
    folder = tmp_path / "photos"
    for i in range(len(val)):
        grey = val.get_batch(np.array([i]))[0, 0].numpy()
        tint = np.stack([grey, grey, grey], -1)  # an RGB photo whose luma is the image
        d = folder / folder_name(classes[int(val.labels[i])])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tint).save(d / f"{i:02d}.png")
    common = ["--checkpoint", str(run), "--precision", "fp32", "--backend", "torch", "--json"]
    capsys.readouterr()
    assert main(["evaluate", *common, "--data", str(data), "--split", "val"]) == 0
    want = _json(capsys)
    assert main(["evaluate", *common, "--data", str(folder)]) == 0
    got, err = capsys.readouterr()
    assert "grey" in err and json.loads(got)["top1_error"] == want["top1_error"]
    out = tmp_path / "f.npy"
    argv = ["features", "extract", *common[:-1], "--data", str(folder), "--out", str(out)]
    assert main(argv) == 0 and np.load(out).shape[0] == len(val)
    argv = [
        "train",
        "--init",
        str(run),
        "--data",
        str(folder),
        "--epochs",
        "1",
        "--batch-size",
        "8",
    ]
    argv += ["--precision", "fp32", "--out", str(tmp_path / "runs"), "--name", "tuned"]
    assert main(argv) == 0
    assert "fc8 kept" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "runs" / "tuned" / "checkpoints" / "last.pt")
    assert ck["model"]["conv1.weight"].shape[1] == 1
