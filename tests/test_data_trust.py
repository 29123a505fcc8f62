"""What a prepared dataset can be trusted for: truncated files are one clear error, every
record carries a CRC-32 that ``verify`` checks and the loader checks as it reads, datasets
prepared before checksums still load, and a damaged devkit is one clear error."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zlib
from pathlib import Path

import evalkit
import numpy as np
import pytest
import torch
from datagen import make_folder_tree, make_imagenet_tars

from alexnet.cli import main
from alexnet.data import PreparedDataset, make_loader, prepare_arrays
from alexnet.data.verify import verify
from alexnet.runtime.errors import UserError


def _one_error(err: str, command: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"alexnet {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    """A folder-tree dataset stored as JPEG records, with its source files."""
    tmp = tmp_path_factory.mktemp("jpeg")
    make_folder_tree(tmp / "src", 3, per_class=10)
    out = tmp / "prepared"
    argv = ["folder", "--train", tmp / "src", "--val", tmp / "src", out, "--size", "32"]
    assert main(["prepare", *map(str, [*argv, "--workers", "1"])]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_bit(path: Path, byte: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_stored_checksums_are_the_crc32_of_each_record(jpeg_dir):
    for split in ("train", "val"):
        index = np.load(jpeg_dir / f"{split}.index.npy")
        data = (jpeg_dir / f"{split}.bin").read_bytes()
        want = [zlib.crc32(data[o : o + n]) for o, n in zip(index["offset"], index["length"])]
        assert index["crc32"].tolist() == want
    assert json.loads((jpeg_dir / "meta.json").read_text())["version"] == 2


def test_verify_catches_every_single_bit_flip_and_names_the_record(jpeg_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    out = _copy(jpeg_dir, tmp_path / "copy")
    index = np.load(out / "train.index.npy")
    names = (out / "train.files.txt").read_text().splitlines()
    caught = 0
    trials = 20
    for _ in range(trials):
        k = int(rng.integers(len(index)))
        byte = int(index["offset"][k] + rng.integers(index["length"][k]))
        bit = int(rng.integers(8))
        _flip_bit(out / "train.bin", byte, bit)
        rc = main(["prepare", "verify", str(out), "--quick"])
        err = capsys.readouterr().err
        if rc == 2 and f"train.bin: record {k} (source {names[k]}): checksum mismatch" in err:
            caught += 1
        _flip_bit(out / "train.bin", byte, bit)  # undo: one flip at a time
    assert caught == trials
    assert main(["prepare", "verify", str(out)]) == 0


def test_the_loader_checks_jpeg_records_as_it_reads_them(jpeg_dir, tmp_path, monkeypatch):
    out = _copy(jpeg_dir, tmp_path / "copy")
    index = np.load(out / "val.index.npy")
    names = (out / "val.files.txt").read_text().splitlines()
    k = 5
    _flip_bit(out / "val.bin", int(index["offset"][k] + index["length"][k] // 2), 3)
    ds = PreparedDataset(out, "val")
    ds.get_batch(np.array([k - 1, k + 1]))  # the others still read
    with pytest.raises(UserError, match=rf"val.bin: record {k} \(source {names[k]}\): checksum"):
        ds.get_batch(np.array([k - 1, k]))
    # From worker processes the error arrives as the same one line.
    loader = make_loader(ds, 4, shuffle=False, num_workers=1, pin_memory=False)
    with pytest.raises(UserError) as e:
        list(loader)
    assert "\n" not in str(e.value) and f"record {k} (source {names[k]})" in str(e.value)
    loader.close()
    monkeypatch.setenv("ALEXNET_CHECK_RECORDS", "0")
    unchecked = PreparedDataset(out, "val")
    assert not unchecked.check
    try:
        unchecked.get_batch(np.array([k]))  # decodes or fails to decode: not checked
    except UserError as err:
        assert "does not decode" in str(err) and f"record {k}" in str(err)


def test_raw_records_are_checked_by_verify_and_on_request_by_the_loader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    out = prepare_arrays(tmp_path / "raw", {"train": (images, np.arange(12) % 2)}, ["a", "b"])
    index = np.load(out / "train.index.npy")
    assert index["crc32"].tolist() == [zlib.crc32(im.tobytes()) for im in images]
    _flip_bit(out / "train.bin", 7 * 192 + 100, 0)
    with pytest.raises(UserError, match=r"train.bin: record 7: checksum mismatch"):
        verify(out)
    assert not PreparedDataset(out, "train").check  # raw: off unless asked (docs/DATA.md)
    PreparedDataset(out, "train").get_batch(np.arange(12))
    monkeypatch.setenv("ALEXNET_CHECK_RECORDS", "1")
    with pytest.raises(UserError, match="record 7: checksum mismatch"):
        PreparedDataset(out, "train").get_batch(np.arange(12))


def test_a_dataset_prepared_without_checksums_loads_and_verify_says_so(jpeg_dir, tmp_path, capsys):
    out = _copy(jpeg_dir, tmp_path / "v1")
    for split in ("train", "val"):  # the version-1 layout: no crc32 column
        index = np.load(out / f"{split}.index.npy")
        old = np.empty(len(index), [("offset", "<i8"), ("length", "<i8"), ("label", "<i8")])
        for f in old.dtype.names:
            old[f] = index[f]
        np.save(out / f"{split}.index.npy", old)
    meta = json.loads((out / "meta.json").read_text())
    del meta["file_crc32"]  # version 1 kept no checksums of its files either
    (out / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    a, b = PreparedDataset(out, "val"), PreparedDataset(jpeg_dir, "val")
    assert torch.equal(a.get_batch(np.arange(len(a))), b.get_batch(np.arange(len(b))))
    assert main(["prepare", "verify", str(out)]) == 0
    assert "no checksums" in capsys.readouterr().out
    (out / "meta.json").write_text(json.dumps({**meta, "version": 3}))
    assert main(["prepare", "verify", str(out)]) == 2
    assert "format version 3" in _one_error(capsys.readouterr().err, "prepare")


def test_truncated_files_are_one_clear_error_for_evaluate_and_the_loader(tmp_path, capsys):
    data = evalkit.make_dataset(tmp_path / "data")
    ckpt = evalkit.known_checkpoint(tmp_path / "known.pt", [0.0] * 8)
    val = data / "val.bin"
    val.write_bytes(val.read_bytes()[: val.stat().st_size // 2])
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu"])
    line = _one_error(capsys.readouterr().err, "evaluate")
    assert rc == 2 and "val.bin" in line and "truncated" in line
    stats = data / "stats.npz"
    stats.write_bytes(stats.read_bytes()[:100])
    with pytest.raises(UserError, match="stats.npz: unreadable"):
        _ = PreparedDataset(data, "train").stats
    index = data / "train.index.npy"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(UserError, match="train.index.npy: unreadable"):
        PreparedDataset(data, "train")


def _devkit_with(tmp: Path, src, meta_bytes: bytes | None, gt: bytes | None) -> Path:
    with tarfile.open(src.devkit) as t:
        files = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
    path = tmp / f"devkit_{len(list(tmp.glob('devkit_*')))}.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            if meta_bytes is not None and name.endswith("meta.mat"):
                data = meta_bytes
            if gt is not None and name.endswith("ground_truth.txt"):
                data = gt
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_a_damaged_devkit_is_one_clear_error(tmp_path, capsys):
    src = make_imagenet_tars(tmp_path / "src", n_classes=2, per_class=1, val_per_class=1)
    with tarfile.open(src.devkit) as t:
        meta = next(t.extractfile(m).read() for m in t if m.name.endswith("meta.mat"))
    cases = [
        (_devkit_with(tmp_path, src, meta[:cut], None), "unreadable .mat")
        for cut in (10, 100, len(meta) // 2, len(meta) - 5)
    ]
    cases.append((_devkit_with(tmp_path, src, None, b"1\n\xff\xfe\n"), "one ILSVRC2012_ID"))
    for devkit, message in cases:
        argv = ["imagenet", "--train", src.train_tar, "--val", src.val_tar, "--devkit", devkit]
        rc = main(["prepare", *map(str, [*argv, tmp_path / "out", "--size", "16"])])
        line = _one_error(capsys.readouterr().err, "prepare")
        assert rc == 2 and message in line and devkit.name in line, line


def test_verify_catches_a_changed_label_or_offset_in_the_index(jpeg_dir, tmp_path, capsys):
    for field, k in (("label", 4), ("offset", 7)):
        out = _copy(jpeg_dir, tmp_path / f"copy_{field}")
        index = np.load(out / "val.index.npy")
        labels = index["label"]
        index[field][k] = (labels[k] + 1) % 3 if field == "label" else index["offset"][k] + 1
        np.save(out / "val.index.npy", index)
        assert main(["prepare", "verify", str(out)]) == 2
        line = _one_error(capsys.readouterr().err, "prepare")
        assert "val.index.npy: checksum mismatch" in line, line


def test_a_damaged_chunk_is_redone_by_the_rerun(tmp_path, capsys, monkeypatch):
    from alexnet.data import pipeline

    make_folder_tree(tmp_path / "src", 2, per_class=4)
    argv = [
        "folder",
        "--train",
        tmp_path / "src",
        tmp_path / "out",
        "--size",
        "16",
        "--chunk",
        "2",
        "--workers",
        "1",
    ]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after the chunks, before the concatenation

    with monkeypatch.context() as m:
        m.setattr(pipeline, "finish_split", stop)
        assert main(["prepare", *map(str, argv)]) == 130
    _flip_bit(tmp_path / "out" / ".parts" / "train" / "chunk_000001.bin", 10, 2)
    assert main(["prepare", *map(str, argv)]) == 2
    line = _one_error(capsys.readouterr().err, "prepare")
    assert "chunk_000001.bin: did not match its index" in line
    assert main(["prepare", *map(str, argv)]) == 0
    assert main(["prepare", "verify", str(tmp_path / "out")]) == 0


def test_a_full_disk_while_preparing_is_one_line_and_the_rerun_finishes(
    tmp_path, small_disk, capsys
):
    """On a real full filesystem (no mock): the error was a 70-line traceback."""
    make_folder_tree(tmp_path / "tree", ["a", "b", "c"], per_class=20)
    disk = small_disk(200)
    out = disk / "ds"
    argv = ["prepare", "folder", "--train", str(tmp_path / "tree"), str(out)]
    argv += ["--size", "64", "--chunk", "4", "--workers", "2"]
    assert main(argv) == 2
    line = _one_error(capsys.readouterr().err, "prepare")
    assert "No space left on device" in line and "run the same command again" in line, line
    assert not list(disk.rglob("*.tmp"))  # no half-written file left behind
    small_disk.resize(disk, 8192)  # space freed
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    assert main(["prepare", "verify", str(out)]) == 0
    assert len(PreparedDataset(out, "train")) == 60
