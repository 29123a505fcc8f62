"""The GPU check's parts that run anywhere: its dataset, its end-to-end loop (on the CPU),
reading pytest's report, the targets, and a clear result without CUDA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

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
    small = dict(batch=4, steps=1, rounds=1, warmup=1, device="cpu", arch="small")
    r = gpu_check.end_to_end(jpegs, 1, False, **small)
    assert r["end_to_end_ips"] > 0 and r["model_only_ips"] > 0 and r["workers"] == 1
    assert r["optimizer"] == "paper"  # PaperSGD, what alexnet train runs (it timed torch's SGD)
    nv = gpu_check.end_to_end(jpegs, 1, True, **small)
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


# What the GPU image's Python lacks (the device tool's list): hidden from every process of
# the rehearsal, so nothing it runs may need them.
ABSENT = ("simplejpeg", "turbojpeg", "openvino", "faiss")


def _offline(cmd: list[str]) -> list[str] | None:
    """``cmd`` in a network namespace of its own (no network at all), or None where this
    machine does not allow one."""
    for unshare in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*unshare, "true"]).returncode == 0:
            return [*unshare, *cmd]
    return None


def test_the_check_rehearses_offline_without_cuda_or_the_optional_packages(tmp_path):
    """The command the GPU day runs, here: offline, with this environment's Python (no
    install), the packages the GPU image lacks hidden, and no CUDA. Every step that needs
    no CUDA runs and passes; the others are reported skipped, not failed; exit 0."""
    hide = tmp_path / "site"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in ABSENT)
    )
    root = Path(gpu_check.__file__).resolve().parents[2]
    out = tmp_path / "gpu-check.json"
    cmd = _offline(
        [
            sys.executable,
            "-m",
            "alexnet.bench.gpu_check",
            "--out",
            str(out),
            "--images",
            "64",
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    if cmd is None:
        pytest.skip("this machine allows no network namespace (unshare -n) for the rehearsal")
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{root}", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["cuda_available"] is False and s["ok"] is True
    status = {name: step["status"] for name, step in s["steps"].items()}
    assert status == {
        "dataset": "passed",
        "pytest": "skipped",
        "bench": "skipped",
        "end to end": "skipped",
        "loader": "passed",
    }
    assert s["pytest"]["skipped"] > 0 and s["pytest"]["failed"] == s["pytest"]["error"] == 0
    assert s["jpeg_decoders"] == ["pil"]  # the optional decoders were hidden
    assert set(s["decode_per_core"]) == {"pil"}
    said = [line for line in done.stdout.splitlines() if line.startswith("gpu-check [")]
    assert len(said) == 5  # a line per step, as each ended


def test_a_step_over_its_limit_is_stopped_with_the_processes_it_started(tmp_path):
    """A timed-out pytest was killed but the trainings it had started kept the GPU through
    the benches: the whole session of a step is killed now."""
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(60)"
    )
    r = gpu_check._run([sys.executable, "-c", code], timeout=3)
    assert r["rc"] == "timeout" and r["seconds"] < 10  # not held up by what it started
    child = int(pidfile.read_text())
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")
    # gone, or a zombie waiting for init to collect it: no longer running either way
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"
