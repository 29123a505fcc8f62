"""Finding the images of a source (PAPER G1): a parent folder passed as --train is refused,
hidden files and folders are skipped and counted (never trained on), and a resumed prepare
accepts the same inputs however their paths are typed."""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from datagen import make_folder_tree, make_imagenet_tars
from datagen import one_error_line as _one_error
from datagen import prepare_cli as _cli

from alexnet.cli import main
from alexnet.data import PreparedDataset, prepare

WNIDS = ["n01440764", "n01443537"]


def test_a_parent_folder_as_train_is_refused_with_the_folder_to_pass(tmp_path, capsys):
    parent = tmp_path / "imagenet"
    make_folder_tree(parent / "train", WNIDS, per_class=2)
    make_folder_tree(parent / "val", WNIDS, per_class=1, seed=1)
    (parent / "devkit" / "data").mkdir(parents=True)
    for kind in ("imagenet", "folder"):
        rc, _, err = _cli(capsys, kind, "--train", parent, tmp_path / f"out_{kind}")
        line = _one_error(err)
        assert rc == 2 and f"(--train {parent.resolve() / 'train'})" in line, line
        assert not (tmp_path / f"out_{kind}" / "meta.json").exists()
    # ImageNet classes are WNIDs: one stray folder among them is named, not made a class.
    (parent / "train" / "misc").mkdir()
    rc, _, err = _cli(capsys, "imagenet", "--train", parent / "train", tmp_path / "o2")
    assert rc == 2 and "misc are not ImageNet classes" in _one_error(err)
    # The download folder (the tars side by side) is not a folder of per-class tars either.
    src = make_imagenet_tars(tmp_path / "src", n_classes=2, per_class=1, odd=False)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(src.train_tar, downloads)
    shutil.copy(src.val_tar, downloads)
    rc, _, err = _cli(capsys, "imagenet", "--train", downloads, tmp_path / "o3")
    line = _one_error(err)
    assert rc == 2 and f"--train {downloads.resolve() / src.train_tar.name}" in line, line


def test_class_folders_with_split_like_names_but_images_are_accepted(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", ["test", "train", "zebra"], per_class=2)
    rc, _, _ = _cli(
        capsys,
        "folder",
        "--train",
        tmp_path / "src",
        tmp_path / "out",
        "--size",
        "16",
        "--workers",
        "1",
    )
    assert rc == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["classes"] == [
        "test",
        "train",
        "zebra",
    ]


def _hidden_tree(root: Path) -> dict[str, list[Path]]:
    files = make_folder_tree(root, WNIDS, per_class=3)
    ckpt = root / WNIDS[0] / ".ipynb_checkpoints"
    ckpt.mkdir()
    shutil.copy(files[WNIDS[0]][0], ckpt / "0000-checkpoint.jpg")  # a readable image
    (root / WNIDS[1] / "._0001.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "README.txt").write_text("where these came from")
    return files


@pytest.mark.parametrize("kind", ["imagenet", "folder"])
def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path, capsys, kind):
    files = _hidden_tree(tmp_path / "train")
    out = tmp_path / "out"
    rc, stdout, _ = _cli(
        capsys, kind, "--train", tmp_path / "train", out, "--size", "16", "--workers", "1"
    )
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["count"] == sum(map(len, files.values())) == 6
    assert meta["ignored_hidden"] == 3 and meta["ignored_outside_class_folders"] == 1
    assert "3 hidden file(s) or folder(s)" in stdout
    listed = dict(line.split("\t") for line in (out / "ignored_files.txt").read_text().splitlines())
    hidden = {Path(n).name for n, why in listed.items() if why.startswith("hidden")}
    assert hidden == {".ipynb_checkpoints", "._0001.jpg", ".DS_Store"}
    trained = (out / "train.files.txt").read_text().splitlines()
    assert sorted(map(Path, trained)) == sorted(p.resolve() for v in files.values() for p in v)


def test_hidden_per_class_tars_are_skipped_and_counted(tmp_path, capsys):
    src = make_imagenet_tars(tmp_path / "src", n_classes=2, per_class=2, odd=False)
    tars = tmp_path / "tars"
    with tarfile.open(src.train_tar) as outer:
        outer.extractall(tars, filter="data")
    (tars / f"._{src.wnids[0]}.tar").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    rc, stdout, _ = _cli(capsys, "imagenet", "--train", tars, tmp_path / "out", "--size", "16")
    assert rc == 0 and "1 hidden file(s)" in stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["classes"] == src.wnids and meta["splits"]["train"]["count"] == 4


def _parse(*argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    prepare.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def test_resume_accepts_the_same_inputs_typed_another_way(tmp_path, monkeypatch):
    make_folder_tree(tmp_path / "data" / "train", 2, per_class=6)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    opts = ["--size", "16", "--chunk", "3", "--workers", "1"]
    whole = tmp_path / "whole"
    assert (
        prepare.run_folder(_parse("folder", "--train", tmp_path / "data/train", whole, *opts)) == 0
    )

    def stop() -> None:
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        prepare.run_folder(_parse("folder", "--train", "data/train", "out", *opts), stop)
    for typed in (tmp_path / "data" / "train", tmp_path / "link" / "train", "./data/../data/train"):
        args = _parse("folder", "--train", typed, tmp_path / "out", *opts)
        with pytest.raises(KeyboardInterrupt):  # resumed: one more chunk done, then stopped
            prepare.run_folder(args, stop)
    assert prepare.run_folder(_parse("folder", "--train", "link/train", "out", *opts)) == 0
    for name in ("train.bin", "train.files.txt", "meta.json"):
        assert (tmp_path / "out" / name).read_bytes() == (whole / name).read_bytes(), name
    a, b = PreparedDataset(tmp_path / "out"), PreparedDataset(whole)
    assert np.array_equal(a.labels.numpy(), b.labels.numpy())
    # Other settings are still refused, naming what differs.
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        prepare.run_folder(_parse("folder", "--train", "data/train", "out", *opts), stop)
    with pytest.raises(prepare.UserError, match="size 16 -> 24"):
        prepare.run_folder(_parse("folder", "--train", "data/train", "out", *opts, "--size", "24"))


def test_bad_options_and_outputs_are_one_error(tmp_path, capsys):
    make_folder_tree(tmp_path / "src", 2, per_class=1)
    (tmp_path / "afile").write_text("")
    cases = [
        (["--chunk", "0"], "out", "--chunk 0: must be at least 1"),
        (["--size", "-5"], "out", "--size -5: must be at least 0"),
        (["--workers", "0"], "out", "--workers 0: must be at least 1"),
        ([], "afile", "afile: exists and is not a folder"),
    ]
    for extra, out, message in cases:
        rc, _, err = _cli(capsys, "folder", "--train", tmp_path / "src", tmp_path / out, *extra)
        assert rc == 2 and message in _one_error(err)


def test_links_that_loop_or_lead_nowhere_are_noted_and_read_once(tmp_path, capsys):
    """A folder link back up the tree was followed ~40 levels (328 records from 8 images, and
    verify said OK); a file link to itself was a traceback. Each real folder is now read
    once per class, and a link that leads nowhere is an ignored file with its reason."""
    make_folder_tree(tmp_path / "tree", ["cat", "dog"], per_class=4)
    cat = tmp_path / "tree" / "cat"
    (cat / "loop").symlink_to("..", target_is_directory=True)  # tree/cat/loop -> tree
    (cat / "again").symlink_to(".", target_is_directory=True)  # cat/again -> cat
    (cat / "self.jpg").symlink_to("self.jpg")  # a link to itself
    (cat / "gone.jpg").symlink_to("nowhere.jpg")  # broken
    (tmp_path / "tree" / "dog" / "cat").symlink_to(cat, target_is_directory=True)
    rc, out, err = _cli(
        capsys,
        "folder",
        "--train",
        tmp_path / "tree",
        tmp_path / "out",
        "--size",
        "16",
        "--workers",
        "1",
    )
    assert rc == 0, err
    ds = PreparedDataset(tmp_path / "out", "train")
    # cat: its own 4 images once (loop -> the tree above it and again -> itself are not
    # followed); dog: its own 4 and, through its link to cat's folder (a second way in from
    # another class: the tree as its user made it, as ImageFolder reads it), cat's 4.
    assert np.bincount(ds.labels.numpy()).tolist() == [4, 8]
    ignored = (tmp_path / "out" / "ignored_files.txt").read_text()
    assert "self.jpg\tcannot be read\tToo many levels of symbolic links" in ignored
    assert "gone.jpg\tcannot be read\tNo such file or directory" in ignored
    assert "a link to a folder already read" in ignored
    assert "linked folder(s) already read" in out and "unreadable file(s)" in out
    assert main(["prepare", "verify", str(tmp_path / "out")]) == 0


def test_an_empty_class_folder_is_refused_for_training_and_noted_for_validation(tmp_path, capsys):
    make_folder_tree(tmp_path / "train", ["cat", "dog", "emu"], per_class=2)
    make_folder_tree(tmp_path / "val", ["cat", "dog"], per_class=1, seed=1)
    (tmp_path / "val" / "emu").mkdir()
    (tmp_path / "train" / "owl").mkdir()  # a class of 0 images, trained on without a word
    rc, _, err = _cli(capsys, "folder", "--train", tmp_path / "train", tmp_path / "out")
    assert rc == 2 and "class folder(s) owl hold no images" in _one_error(err)
    shutil.rmtree(tmp_path / "train" / "owl")
    rc, out, err = _cli(
        capsys,
        "folder",
        "--train",
        tmp_path / "train",
        "--val",
        tmp_path / "val",
        tmp_path / "out",
        "--size",
        "16",
    )
    assert rc == 0, err
    assert "1 empty class folder(s) of this split" in out
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["empty_class_folders"] == 1


def test_a_class_with_a_slash_in_its_name_is_read_from_its_folder_name(tmp_path):
    """Fashion-MNIST's 'T-shirt/top' cannot be a folder: a network's classes are matched to
    folders by ``folder_name`` ('/' -> '_'), in the network's order; an unknown folder is
    refused with the folders the network's classes are read from."""
    from alexnet.data import sources
    from alexnet.runtime.errors import UserError

    make_folder_tree(tmp_path / "photos", ["Bag", "T-shirt_top"], per_class=2)
    classes, items, _ = sources.folder_tree(tmp_path / "photos", ["T-shirt/top", "Trouser", "Bag"])
    assert classes == ["T-shirt/top", "Trouser", "Bag"]
    assert sorted({(Path(it.name).parent.name, it.label) for it in items}) == [
        ("Bag", 2),
        ("T-shirt_top", 0),
    ]
    make_folder_tree(tmp_path / "photos", ["Tshirt"], per_class=1)
    with pytest.raises(UserError, match=r"\['Tshirt'\] \(its 3 classes' folders: T-shirt_top, "):
        sources.folder_tree(tmp_path / "photos", ["T-shirt/top", "Trouser", "Bag"])
