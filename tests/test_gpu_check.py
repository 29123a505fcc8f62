"""The GPU check's parts that run anywhere: its dataset, its end-to-end loop (on the CPU),
reading pytest's report, the targets, and a clear result without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from alexnet.bench import gpu_check
from alexnet.data import PreparedDataset


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return gpu_check.synthetic_jpegs(tmp_path_factory.mktemp("g"), 40, 20, classes=4)


def test_the_synthetic_dataset_is_prepared_256_px_jpegs(jpegs):
    for split, n in (("train", 40), ("val", 20)):
        ds = PreparedDataset(jpegs, split)
        assert len(ds) == n and ds.storage == "jpeg" and ds.image_size == (256, 256)
        assert sorted(np.bincount(ds.labels.numpy()).tolist()) == [n // 4] * 4


@pytest.mark.slow  # a loader worker and 11 training steps: most of a minute on a busy 2-core VM
def test_end_to_end_runs_on_the_cpu(jpegs):
    small = dict(batch=4, workers=1, steps=1, device="cpu", arch="small", crop=32)
    r = gpu_check.end_to_end(jpegs, nvjpeg=False, **small)
    assert r["end_to_end_ips"] > 0 and r["model_only_ips"] > 0 and r["workers"] == 1
    nv = gpu_check.end_to_end(jpegs, nvjpeg=True, **small)
    assert nv == {"unavailable": "device cpu is not CUDA"}


def test_pytest_report_is_read_per_test(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='why')\n"
        "def test_c(): pass\n"
    )
    xml = tmp_path / "r.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    subprocess.run([*cmd, str(tmp_path / "test_x.py")], capture_output=True, cwd=tmp_path)
    r = gpu_check._junit(xml)
    assert (r["passed"], r["failed"], r["skipped"], r["error"]) == (1, 1, 1, 0)
    outcomes = {k.split("::")[-1]: v["outcome"] for k, v in r["tests"].items()}
    assert outcomes == {"test_a": "passed", "test_b": "failed", "test_c": "skipped"}
    assert "1 == 2" in r["tests"][next(k for k in r["tests"] if k.endswith("test_b"))]["detail"]
    assert gpu_check._junit(tmp_path / "missing.xml") == {"error": "missing.xml not written"}


def test_targets_take_the_best_figure():
    s = {
        "bench": {
            "128": {"result": {"train_ips": 30_000.0}},
            "256": {"result": None},
            "512": {"result": {"train_ips": 41_000.0}},
        },
        "end_to_end": {"cpu_workers": {"end_to_end_ips": 12_000.0}, "nvjpeg": {"error": "x"}},
    }
    t = gpu_check._targets(s)
    assert t["model_only_train_ips"] == {"target": 40_000, "best": 41_000.0, "met": True}
    assert t["end_to_end_ips"] == {"target": 20_000, "best": 12_000.0, "met": False}
    assert gpu_check._targets({})["end_to_end_ips"]["met"] is False


def test_without_cuda_the_summary_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu-check.json"
    assert gpu_check.main(["--out", str(out), "--workdir", str(tmp_path / "w")]) == 1
    summary = json.loads(out.read_text())
    assert summary["ok"] is False and "no CUDA device" in summary["error"]
    assert summary["cuda_available"] is False and summary["jpeg_decoders"][-1] == "pil"
