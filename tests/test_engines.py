"""``--backend``: every engine computes what torch computes, the cache follows the weights,
a missing engine names its extra, bf16 is refused where its top-1 disagrees, and the CLI's
allocator setting keeps freed memory (fewer page faults)."""

from __future__ import annotations

import importlib.util
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import evalkit
import numpy as np
import pytest
import torch

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.interop import engines
from alexnet.model import AlexNet
from alexnet.runtime import memory
from alexnet.runtime.errors import UserError
from alexnet.runtime.fileio import atomic_torch_save

BACKENDS = ("torch", "openvino", "onnxruntime")


def _checkpoint(path, seed: int = 0, per_tower: bool = True):
    torch.manual_seed(seed)
    model = AlexNet(
        5,
        arch="small",
        image_size=28,
        widths=(8, 16, 16, 16, 8),
        fc_width=16,
        lrn_per_tower=per_tower,
        init="kaiming",
    ).eval()
    stats = {
        "mean": torch.full((3, 32, 32), 110.0),
        "eigvals": torch.zeros(3),
        "eigvecs": torch.eye(3),
    }
    ckpt = {
        "model": model.state_dict(),
        "model_config": model.config,
        "classes": list("abcde"),
        "class_names": list("ABCDE"),
        "data_stats": stats,
        "augment": {"crop_size": 28, "scale": 1.0 / 50},
        "config": {},
    }
    atomic_torch_save(path, ckpt)
    return path


def _reference(path, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """The checkpoint's network in float64 eager torch: independent of every backend."""
    model, _ = load_model(path)
    model = model.double()
    with torch.no_grad():
        if layer is None:
            return model(x.double())
        return model.forward_features(x.double(), layer).flatten(1)


def _inputs(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed)) * 50.0


@pytest.mark.parametrize("per_tower", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_equals_torch_fp32(tmp_path, backend, per_tower):
    path = _checkpoint(tmp_path / "m.pt", per_tower=per_tower)
    model, ckpt = load_model(path)
    x = _inputs()
    want = _reference(path, x)
    got = engines.for_inference(model, ckpt, path, backend, batch_size=len(x), precision="fp32")(x)
    # float32 rounding of a float64 reference, relative to the largest logit
    np.testing.assert_allclose(got.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))
    feats = engines.for_inference(
        model, ckpt, path, backend, batch_size=len(x), layer="conv5", precision="fp32"
    )
    want = _reference(path, x, "conv5")
    np.testing.assert_allclose(
        feats.forward_features(x, "conv5").double(),
        want,
        rtol=0,
        atol=1e-4 * float(want.abs().max()),
    )


def test_auto_picks_an_installed_backend_and_reports_agreement(tmp_path):
    path = _checkpoint(tmp_path / "m.pt")
    model, ckpt = load_model(path)
    wrapped = engines.for_inference(model, ckpt, path, "auto", batch_size=8)
    x = _inputs(8)
    fastest = wrapped.choice
    wrapped(x)  # on a bf16 CPU a bf16 choice that agrees too little becomes fp32 here
    assert wrapped.choice == fastest or (
        wrapped.choice.precision == "fp32" and "fp32 used instead" in wrapped.report()
    )
    assert wrapped.choice in engines.candidates("auto")
    manifest = json.loads((tmp_path / "m.pt.engines" / "manifest.json").read_text())
    timed = manifest["choices"][f"auto|auto|logits|batch=8|threads={torch.get_num_threads()}"]
    assert set(timed["seconds"]) == {c.label() for c in engines.candidates("auto")}
    assert min(timed["seconds"], key=timed["seconds"].get) == fastest.label()
    if wrapped.choice != engines.Choice("torch", "fp32"):
        want = torch.softmax(_reference(path, x), 1)
        assert wrapped.check["top1_agreement"] == 1.0
        got = torch.softmax(wrapped(x).double(), 1)
        rel = float(((got - want).abs().amax(1) / want.amax(1)).max())
        assert wrapped.check["max_rel_error"] == pytest.approx(rel, abs=1e-6)
        assert "top-1 agreement 100.00%" in wrapped.report()


def test_cache_is_rebuilt_when_the_checkpoint_changes_and_never_serves_another(tmp_path):
    import shutil

    path = _checkpoint(tmp_path / "m.pt", seed=0)
    x = _inputs()
    model, ckpt = load_model(path)
    engines.for_inference(model, ckpt, path, "onnxruntime")(x)
    cache = tmp_path / "m.pt.engines"
    first = json.loads((cache / "manifest.json").read_text())["digest"]
    old_graphs = sorted(p.name for p in cache.glob("*.onnx"))
    assert old_graphs
    _checkpoint(path, seed=1)  # new weights under the same name
    model, ckpt = load_model(path)
    got = engines.for_inference(model, ckpt, path, "onnxruntime")(x)
    want = _reference(path, x)
    np.testing.assert_allclose(got.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert json.loads((cache / "manifest.json").read_text())["digest"] != first
    # another checkpoint handed this cache (copied beside it) does not use it
    other = _checkpoint(tmp_path / "other.pt", seed=2)
    shutil.copytree(cache, tmp_path / "other.pt.engines")
    model, ckpt = load_model(other)
    got = engines.for_inference(model, ckpt, other, "onnxruntime")(x)
    want = _reference(other, x)
    np.testing.assert_allclose(got.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_a_damaged_cached_graph_is_exported_again(tmp_path):
    """The cache is derived data: a graph cut short (a full disk, a copy gone wrong) or
    altered is noticed by its recorded SHA-256 and exported again, not fed to the engine."""
    path = _checkpoint(tmp_path / "m.pt")
    x = _inputs()
    want = _reference(path, x)
    model, ckpt = load_model(path)
    engines.for_inference(model, ckpt, path, "onnxruntime", precision="fp32")(x)
    (graph,) = (tmp_path / "m.pt.engines").glob("*.onnx")
    size = graph.stat().st_size
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:]):
        graph.write_bytes(damage(graph.read_bytes()))
        model, ckpt = load_model(path)
        got = engines.for_inference(model, ckpt, path, "onnxruntime", precision="fp32")(x)
        np.testing.assert_allclose(got.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))
        assert graph.stat().st_size == size


_SETUP = """
import sys
from alexnet.checkpoint import load_model
from alexnet.interop import engines
model, ckpt = load_model(sys.argv[1])
print(engines.for_inference(model, ckpt, sys.argv[1], "torch", batch_size=4).choice.label())
"""


def test_one_process_at_a_time_sets_up_a_checkpoints_engines(tmp_path):
    """Ranks of one torchrun (or two commands) must not empty a cache another is writing:
    while the checkpoint is locked, a second setup waits; released, it goes on."""
    import fcntl
    import os
    import time

    path = _checkpoint(tmp_path / "m.pt")
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SETUP, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3.0)  # long enough for the setup to finish (about 1 s) were it not waiting
        assert proc.poll() is None and not (tmp_path / "m.pt.engines").exists()
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().startswith("torch ")
    assert (tmp_path / "m.pt.engines" / "manifest.json").exists()


def test_openvinos_compiled_model_is_cached_beside_the_checkpoint(tmp_path):
    pytest.importorskip("openvino")
    path = _checkpoint(tmp_path / "m.pt")
    model, ckpt = load_model(path)
    engines.for_inference(model, ckpt, path, "openvino")(_inputs())
    blobs = list((tmp_path / "m.pt.engines" / "openvino").glob("*.blob"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 0
    before = blobs[0].read_bytes()
    _checkpoint(path, seed=1)  # new weights: the cache, blobs included, starts afresh
    model, ckpt = load_model(path)
    engines.for_inference(model, ckpt, path, "openvino")(_inputs())
    again = list((tmp_path / "m.pt.engines" / "openvino").glob("*.blob"))
    assert len(again) == 1 and again[0].read_bytes() != before


def test_a_missing_engine_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    path = evalkit.known_checkpoint(tmp_path / "k.pt", [0.1, 0.5, 0.2])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    code = main(["predict", str(image), "--checkpoint", str(path), "--backend", "openvino"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "openvino is not installed" in err[0] and "alexnet[openvino]" in err[0]


def test_predict_and_ten_view_evaluate_agree_across_backends(tmp_path, capsys):
    data, run = evalkit.tiny_run()
    out = {}
    for backend in BACKENDS:
        args = [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(data),
            "--views",
            "10",
            "--batch-size",
            "8",
            "--json",
            "--backend",
            backend,
            "--precision",
            "fp32",
        ]
        assert main(args) == 0
        out[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = out["torch"]
    for backend in ("openvino", "onnxruntime"):
        assert out[backend]["top1_error"] == want["top1_error"]
        assert out[backend]["top5_error"] == want["top5_error"]
        assert out[backend]["backends"][0].startswith(f"backend {backend} fp32")
        assert "top-1 agreement 100.00%" in out[backend]["backends"][0]


def test_bf16_is_refused_where_its_top1_disagrees(tmp_path):
    """fc8 set so the logits nearly tie: bf16 rounding reorders them, fp32 does not."""
    path = _checkpoint(tmp_path / "m.pt")
    model, ckpt = load_model(path)
    x = _inputs(64)
    with torch.no_grad():
        feats = model.forward_features(x, "fc7")
        model.fc8.weight.mul_(0.02 / (feats @ model.fc8.weight.T).std())  # spread 0.02
        model.fc8.bias.copy_(8.0 + 0.01 * torch.arange(5.0))  # one bf16 value: 8.0
        fp32 = model(x).argmax(1)
        bf16 = copy_bf16(model)(x.bfloat16()).float().argmax(1)
    assert feats.abs().max() > 0
    assert float((fp32 == bf16).double().mean()) < engines.MIN_AGREEMENT  # the premise
    wrapped = engines.InferenceModel(
        model, ckpt, engines.Choice("torch", "bf16", True), None, None, 64
    )
    got = wrapped(x)
    assert wrapped.choice == engines.Choice("torch", "fp32", True)
    assert "fp32 used instead" in wrapped.report()
    assert torch.equal(got.argmax(1), fp32)
    # asked for by name (--precision bf16), bf16 is kept and the report says it agreed too little
    kept = engines.InferenceModel(
        model, ckpt, engines.Choice("torch", "bf16", True), None, None, 64, fallback=False
    )
    assert torch.equal(kept(x).argmax(1), bf16)
    assert kept.choice.precision == "bf16" and "below the 99%" in kept.report()


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_precision_bf16_is_bf16_and_agrees_with_fp32(tmp_path, backend):
    """Asked for by name, bf16 is computed in bf16 (it differs from fp32 by more than fp32
    rounding) and stays close; where the backend cannot honour it, one clear error instead
    of fp32 under a bf16 label. torch computes bf16 on any CPU (emulated where not native)."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    path = _checkpoint(tmp_path / "m.pt")
    model, ckpt = load_model(path)
    x = _inputs(32)
    want = _reference(path, x)
    if not engines.native_bf16(backend) and backend != "torch":
        with pytest.raises(UserError, match="no native bf16"):
            engines.for_inference(model, ckpt, path, backend, precision="bf16")
        return
    wrapped = engines.for_inference(model, ckpt, path, backend, batch_size=32, precision="bf16")
    got = wrapped(x).double()
    assert wrapped.choice.precision == "bf16" and wrapped.choice.backend == backend
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) > 1e-4 * scale  # not fp32: bf16's 8-bit mantissa
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * scale)
    assert f"backend {backend} bf16" in wrapped.report()
    assert "top-1 agreement" in wrapped.report()


def test_precision_bf16_where_the_engine_has_none_is_one_clear_line(tmp_path, capsys):
    path = evalkit.known_checkpoint(tmp_path / "k.pt", [0.1, 0.5, 0.2])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    args = [
        "predict",
        str(image),
        "--checkpoint",
        str(path),
        "--backend",
        "onnxruntime",
        "--precision",
        "bf16",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX Runtime" in err[0] and "--precision fp32" in err[0]


def test_precision_fp32_never_times_bf16_and_features_under_auto_stay_fp32(tmp_path):
    assert {c.precision for c in engines.candidates("auto", "fp32")} == {"fp32"}
    assert {c.precision for c in engines.candidates("torch", "bf16")} == {"bf16"}
    # features have no top-1 to hold bf16 to, so auto does not offer it for them
    path = _checkpoint(tmp_path / "m.pt")
    model, ckpt = load_model(path)
    feats = engines.for_inference(model, ckpt, path, "torch", batch_size=8, layer="conv5")
    assert feats.choice.precision == "fp32"


def copy_bf16(model):
    import copy

    return copy.deepcopy(model).bfloat16()


_FAULTS = """
import resource, sys
from alexnet.runtime import memory
assert memory.keep_freed_memory(sys.argv[1] == "kept")  # before torch loads, as the CLI does
import torch
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(96 << 18)  # 96 MiB of float32, freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


def _fewest_faults(mode: str) -> int:
    """The fewest minor page faults of one round of allocating, touching and freeing 96 MiB,
    over twelve rounds in a fresh process set up as the CLI sets itself up (a long-lived
    heap may hold a free block that serves it either way). The minimum, because the kernel
    may reclaim idle kept pages between rounds on a busy machine."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], env=env, check=True, capture_output=True, text=True
    )
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(memory._mallopt() is None, reason="glibc's mallopt only")
def test_kept_freed_memory_is_reused_without_page_faults():
    pages = (96 << 20) // resource.getpagesize()
    assert _fewest_faults("default") > pages / 2  # every round mapped and faulted in afresh
    assert _fewest_faults("kept") < pages / 20


# A Python signal handler runs on the thread's signal stack (CPython installs handlers with
# SA_ONSTACK). Prints whether that stack is mapped memory, then takes a signal: a dangling
# stack is a SIGSEGV at delivery, which in a test worker is a worker lost without a trace.
_SIGNAL_STACK = r"""
import ctypes, faulthandler, gc, mmap, os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the premise crashes: no core file
faulthandler.enable()  # as pytest does: its own signal stack is the one to keep
libc = ctypes.CDLL(None, use_errno=True)
class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]
def stack_mapped() -> bool:
    s = Stack()
    assert libc.sigaltstack(None, ctypes.byref(s)) == 0
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= s.sp < hi:
            return True
    return False
if sys.argv[1] == "dangling":  # the harness's own premise: an unmapped stack is caught
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    sp = libc.mmap(None, 65536, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert libc.sigaltstack(ctypes.byref(Stack(sp, 0, 65536)), None) == 0
    libc.munmap(ctypes.c_void_p(sp), ctypes.c_size_t(65536))
else:  # the engines as predict/evaluate/bench use them: made, used, dropped in that order
    import torch
    sys.path.insert(0, sys.argv[3])
    from test_engines import _checkpoint, _inputs
    from alexnet.checkpoint import load_model
    from alexnet.interop import engines
    path = _checkpoint(__import__("pathlib").Path(sys.argv[2]) / "m.pt")
    model, ckpt = load_model(path)
    engines.native_bf16("openvino")
    first = engines.for_inference(model, ckpt, path, "openvino", batch_size=4)
    second = engines.for_inference(model, ckpt, path, "openvino", batch_size=4)
    first(_inputs(4)), second(_inputs(4))
    del first
    gc.collect()
    del second
    gc.collect()
print("mapped" if stack_mapped() else "unmapped", flush=True)
signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
"""


def _signal_stack(mode: str, tmp_path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", _SIGNAL_STACK, mode, str(tmp_path), str(Path(__file__).parent)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack and /proc/self/maps: Linux")
def test_the_signal_stack_survives_openvino(tmp_path):
    """OpenVINO's CPU plugin (one per ``Core``) swaps the thread's signal stack and restores
    it only if its own is still current: two cores dropped in the order made leave it
    unmapped, and full test runs lost a worker to the next SIGCHLD. One core per process."""
    pytest.importorskip("openvino")
    premise = _signal_stack("dangling", tmp_path)
    assert premise.stdout == "unmapped\n" and premise.returncode == -signal.SIGSEGV, premise
    run = _signal_stack("engines", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[-2:] == ["mapped", "handled"], run.stdout


def test_onnxruntime_threads_sleep_between_our_batches_but_spin_as_a_peer(tmp_path):
    """Our commands prepare each batch between runs: ONNX Runtime's spinning threads would take
    the cores from that (docs/SPEED.md); the bench's peer keeps ONNX Runtime's default."""
    pytest.importorskip("onnxruntime")
    path = _checkpoint(tmp_path / "m.pt")
    model, ckpt = load_model(path)
    cache = engines.open_cache(path, engines.model_digest(model, ckpt))
    choice = engines.Choice("onnxruntime", "fp32")
    ours = engines.make_runner(model, ckpt, choice, None, cache)
    peer = engines.make_runner(model, ckpt, choice, None, cache, peer=True)

    def spinning(runner) -> str | None:
        options = runner.session.get_session_options()
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: ONNX Runtime's default, which spins
            return None

    assert spinning(ours) == "0"
    assert spinning(peer) is None
    x = _inputs()
    torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=0)


# ------------------------------------------------------------ the first call of a checkpoint
def _no_timing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the engines were timed")

    monkeypatch.setattr(engines, "time_runners", refuse)


def test_a_few_inputs_run_on_torch_without_timing_the_engines(tmp_path, monkeypatch):
    """The first `alexnet predict one.png` of a checkpoint spent 8.1 s timing every engine
    (an export and a compile each) for one image."""
    path = _checkpoint(tmp_path / "m.pt")
    model, card = load_model(path)
    _no_timing(monkeypatch)
    wrapped = engines.for_inference(model, card, path, "auto", batch_size=1, inputs=1)
    assert wrapped.choice.backend == "torch"
    assert not list((tmp_path / "m.pt.engines").glob("*.onnx"))  # nothing exported
    wrapped = engines.for_inference(model, card, path, "auto", batch_size=8, inputs=16)
    assert wrapped.choice.backend == "torch"  # two passes: still not worth an engine


def test_one_timing_serves_every_checkpoint_of_the_architecture(tmp_path, monkeypatch):
    first = _checkpoint(tmp_path / "a.pt", seed=0)
    model, card = load_model(first)
    timed = engines.for_inference(model, card, first, "auto", batch_size=8).choice
    record = json.loads((tmp_path / "alexnet-home" / "engines" / "machine.json").read_text())
    (job,) = record.values()
    assert (
        set(job["seconds"]) == set(job["setup"]) == {c.label() for c in engines.candidates("auto")}
    )
    second = _checkpoint(tmp_path / "b.pt", seed=1)  # other weights, the same architecture
    model, card = load_model(second)
    _no_timing(monkeypatch)
    assert engines.for_inference(model, card, second, "auto", batch_size=8).choice == timed


def test_with_a_record_a_small_job_counts_the_engines_setup(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path / "m.pt")
    model, card = load_model(path)
    options = engines.candidates("auto", "fp32")
    if len({o.backend for o in options}) < 2:
        pytest.skip("one backend installed: nothing to weigh")
    engine = next(o for o in options if o.backend != "torch")
    seconds = {o.label(): 0.010 for o in options} | {engine.label(): 0.001}

    def choice_with(setup: float):
        record = {o.label(): 0.0 for o in options} | {engine.label(): setup}
        monkeypatch.setattr(
            engines.MachineRecord, "get", lambda self, job: {"seconds": seconds, "setup": record}
        )
        cache = engines.open_cache(path, engines.model_digest(model, card))
        return engines.choose(model, card, cache, "auto", 1, None, "fp32", inputs=2)

    assert choice_with(setup=5.0).backend == "torch"  # 2 x 9 ms saved: not worth 5 s
    assert choice_with(setup=0.001) == engine  # a setup cheaper than the gain
