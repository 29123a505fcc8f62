"""On a CUDA device, each result against the CPU or a float64 formula (``pytest -m gpu``; part
of ``make gpu-check``). Skipped cleanly without CUDA.

``ALEXNET_GPU_DATA``: a prepared dataset of 256x256 JPEGs to use (the GPU check passes its
own); without it the tests make a small one. ``ALEXNET_GPU_TEST_DEVICE=cpu`` runs the same
code with the CPU standing in for the GPU: a dry run of the tests themselves (the
comparisons are then CPU against CPU), for machines without one.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import evalkit
import numpy as np
import pytest
import torch

from alexnet import config as C
from alexnet import evaluate as E
from alexnet.bench.gpu_check import synthetic_jpegs
from alexnet.checkpoint import load_checkpoint
from alexnet.data import DeviceAugment, PreparedDataset, decode
from alexnet.inference import Predictor
from alexnet.lrn import LocalResponseNorm, reference_lrn
from alexnet.model import AlexNet
from alexnet.runtime import distributed as D
from alexnet.runtime.fileio import atomic_write_json
from alexnet.towers import TwoTowerAlexNet, towers_to_grouped
from alexnet.train import train

DEVICE = os.environ.get("ALEXNET_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would round convolutions and matrix products to 10-bit mantissas; the
    comparisons here are against float32 CPU results."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory) -> Path:
    given = os.environ.get("ALEXNET_GPU_DATA")
    if given:
        return Path(given)
    return synthetic_jpegs(tmp_path_factory.mktemp("gpu-data"), 512, 128)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("convention", "groups"), [("code", 1), ("code", 2), ("printed", 2)])
def test_lrn_on_the_device_matches_the_float64_formula(convention, groups, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 96, 27, 27, generator=g) * 60  # post-ReLU, conv1-sized values
    grad = torch.randn(x.shape, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xd = x.to(DEVICE, copy=True).contiguous(memory_format=fmt).requires_grad_()
    y = LocalResponseNorm(convention=convention, groups=groups)(xd)
    y.backward(grad.to(DEVICE))
    x64 = x.double().requires_grad_()
    ref = reference_lrn(x64, convention=convention, groups=groups)  # PAPER A8
    ref.backward(grad.double())
    assert y.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(y.detach().cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xd.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_lrn_in_bf16_on_the_device_matches_the_float64_formula():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(8, 256, 13, 13, generator=g) * 40).bfloat16()
    grad = torch.randn(x.shape, generator=g).bfloat16()
    xd = x.to(DEVICE, copy=True).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = LocalResponseNorm(groups=2)(xd)
    y.backward(grad.to(DEVICE))
    x64 = x.double().requires_grad_()
    reference_lrn(x64, groups=2).backward(grad.double())
    ref = reference_lrn(x.double(), groups=2)
    torch.testing.assert_close(y.detach().cpu().double(), ref, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(xd.grad.cpu().double(), x64.grad, rtol=2**-7, atol=1e-3)


def test_device_augment_on_the_device_equals_the_cpu_for_the_same_seeds(gpu_data):
    ds = PreparedDataset(gpu_data, "train")
    images = ds.get_batch(np.arange(16))  # uint8 (16, 3, 256, 256)
    on = images.to(DEVICE)
    for options in ({}, {"pad": 4}, {"pca_scale": "std", "channels_last": True}):
        aug = DeviceAugment(ds.stats, 224, train=True, **options)  # PAPER B2-B4
        cpu = aug(images, torch.Generator().manual_seed(5))
        dev = aug(on, torch.Generator().manual_seed(5))  # the same draws, made on the CPU
        assert dev.device == on.device
        torch.testing.assert_close(dev.cpu(), cpu, rtol=1e-5, atol=1e-3)
    gen = lambda: torch.Generator(device=on.device).manual_seed(5)  # noqa: E731
    assert torch.equal(aug(on, gen()), aug(on, gen()))  # draws made on the device repeat
    test = DeviceAugment(ds.stats, 224, train=False)
    for n in (1, 10):  # the centre view and the ten of PAPER B5
        torch.testing.assert_close(test.views(on, n).cpu(), test.views(images, n))


def test_ten_view_counts_on_the_device_equal_the_cpu_counts():
    data, run = evalkit.tiny_run()
    ds = PreparedDataset(data, "val")
    counts = []
    for name in ("cpu", DEVICE):
        p = Predictor.of_network(run / "checkpoints" / "best.pt", device=name)
        counts.append(E.evaluate([p], ds, views=10, batch_size=8, env=D.DistEnv(0, 1, 0)))
    cpu, dev = counts
    assert int(cpu.images.sum()) == len(ds)
    for name in ("images", "top1", "top5"):
        assert torch.equal(getattr(dev, name).cpu(), getattr(cpu, name)), name


def test_evaluate_in_bf16_on_the_device_agrees_with_fp32(capsys):
    """``--precision bf16``: torch in bf16 on the device, its report against fp32 there."""
    from alexnet.cli import main

    data, run = evalkit.tiny_run()
    out = {}
    for precision in ("fp32", "bf16"):
        args = [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(data),
            "--views",
            "10",
            "--device",
            DEVICE,
            "--backend",
            "torch",
            "--precision",
            precision,
            "--json",
        ]
        capsys.readouterr()
        assert main(args) == 0
        out[precision] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    line = out["bf16"]["backends"][0]
    assert line.startswith("backend torch bf16"), line
    assert float(re.search(r"top-1 agreement ([\d.]+)%", line).group(1)) >= 99.0
    images = out["fp32"]["images"]
    assert abs(out["bf16"]["top1_error"] - out["fp32"]["top1_error"]) <= 1.0 / images + 1e-9


def _paper_config(data: Path, out: Path, per_epoch: int, **extra) -> C.TrainConfig:
    """The paper model (A1-A12) on 224 crops of the 256 JPEGs, about 32 steps in all."""
    epochs = max(1, math.ceil(32 / per_epoch))
    save_every = max(2, epochs * per_epoch // 4)
    return C.preset(
        "paper",
        **{
            "data.root": str(data),
            "run.out_dir": str(out),
            "run.name": "run",
            "optim.batch_size": 64,
            "schedule.kind": "steps",
            "schedule.epochs": epochs,
            "schedule.milestones": (1,),
            "run.deterministic": True,
            "run.device": DEVICE,
            "run.save_every_steps": save_every,
            "run.log_every": 4,
            "run.export": False,
            "data.num_workers": 4,
            **extra,
        },
    )


def _train_cli(args: list[str], wait: bool = True):
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS
    cmd = [sys.executable, "-m", "alexnet", "train", *args]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()[-3000:]
    return child


def _step(path: Path) -> int:
    """The step of a checkpoint, read through a memory map (no tensor loaded: polling the
    490 MB file by loading it took long enough to miss the moment to kill)."""
    from alexnet.checkpoint import checkpoint_step

    return (checkpoint_step(path) if path.is_file() else None) or 0


def test_paper_model_killed_and_resumed_on_the_device_equals_an_unbroken_run(gpu_data, tmp_path):
    per_epoch = len(PreparedDataset(gpu_data, "train")) // 64
    cfgs = {}
    for name in ("straight", "killed"):
        cfgs[name] = _paper_config(gpu_data, tmp_path / name, per_epoch)
        atomic_write_json(tmp_path / f"{name}.json", cfgs[name].to_dict())
    _train_cli(["--config", str(tmp_path / "straight.json")])
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.pt"
    child = _train_cli(["--config", str(tmp_path / "killed.json")], wait=False)
    target, deadline = 2 * cfgs["killed"].run.save_every_steps, time.monotonic() + 300
    while _step(last) < target and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-3000:]
    killed_at = load_checkpoint(last)
    straight = load_checkpoint(tmp_path / "straight" / "run" / "checkpoints" / "last.pt")
    assert killed_at["finished"] is None and target <= killed_at["step"] < straight["step"]
    _train_cli(["--resume", str(tmp_path / "killed" / "run")])
    resumed = load_checkpoint(last)
    assert resumed["step"] == straight["step"] and resumed["finished"]
    for k, a in straight["model"].items():
        b = resumed["model"][k]
        assert torch.equal(a, b), f"{k}: max |difference| {(a - b).abs().max().item()}"


def _two(device: str) -> tuple[str, str]:
    d = torch.device(device)
    return (f"{d.type}:0", f"{d.type}:0") if d.type == "cuda" else ("cpu", "cpu")


def test_two_towers_on_one_device_compute_the_grouped_model():
    torch.manual_seed(0)
    # He init: the paper's N(0, 0.01^2) with biases 1 (D2, D3) makes neighbouring activations
    # nearly equal, and max pooling then routes gradients by rounding, in either layout.
    grouped = AlexNet(10, arch="paper", init="kaiming")  # groups=2 in conv2/4/5: PAPER A12
    towers = TwoTowerAlexNet.from_grouped(grouped, _two(DEVICE)).eval()
    grouped = grouped.to(DEVICE).eval()  # eval: no dropout draws to match
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 50
    labels = torch.tensor([0, 3, 7, 9], device=DEVICE)
    outs = []
    for model in (grouped, towers):
        logits = model(x.to(DEVICE))
        torch.nn.functional.cross_entropy(logits, labels).backward()
        outs.append(logits.detach().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert str(next(towers.tower0.parameters()).device) == str(torch.device(_two(DEVICE)[0]))
    grads = towers_to_grouped({k: p.grad for k, p in towers.named_parameters()})
    for k, p in grouped.named_parameters():
        want = p.grad.cpu()
        assert (grads[k] - want).norm() <= 1e-4 * want.norm(), k


def test_two_towers_on_one_device_train(gpu_data, tmp_path):
    towers = {
        "run.tower_devices": ",".join(_two(DEVICE)),
        "run.max_steps": 3,
        "run.deterministic": False,
        "data.num_workers": 2,
    }
    result = train(_paper_config(gpu_data, tmp_path, 8, **towers))
    assert result["status"] == "stopped" and result["step"] == 3
    ckpt = load_checkpoint(Path(result["run_dir"]) / "checkpoints" / "last.pt")
    AlexNet(**ckpt["model_config"]).load_state_dict(ckpt["model"])  # the grouped layout
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nvjpeg_decodes_the_records_as_the_cpu_does(gpu_data):
    why = decode.nvjpeg_unavailable(DEVICE)
    if why:
        pytest.skip(f"nvJPEG: {why}")
    ds = PreparedDataset(gpu_data, "train")
    idx = np.arange(64)
    dec = decode.DeviceDecoder(DEVICE, ds.record_shape)
    got = dec(ds.records(idx))
    assert dec.backend == "nvjpeg" and got.device.type == "cuda" and got.dtype == torch.uint8
    diff = (got.cpu().int() - ds.get_batch(idx).int()).abs()
    # nvJPEG's IDCT is not libjpeg's: a level or two apart here and there, never far.
    assert diff.float().mean() < 0.5 and int(diff.max()) <= 8, (diff.float().mean(), diff.max())


def test_the_training_step_and_validation_never_wait_for_the_device(gpu_data, tmp_path):
    """CUDA's sync debug mode turns every synchronising call (a host-to-device copy from
    pageable memory, an .item(), a cudaMemcpy of a Python number) into an error: the
    training step with its bookkeeping, and the validation loop before its result, make
    none (tests/test_devices.py checks the same by construction on the CPU)."""
    if DEVICE != "cuda":
        pytest.skip("sync debug mode is CUDA's")
    from alexnet import session as S
    from alexnet import train as T
    from alexnet.runtime.distributed import DistEnv

    cfg = _paper_config(gpu_data, tmp_path, 8)
    cfg.optim.batch_size, cfg.data.num_workers = 32, 0
    s = S.build(cfg, DistEnv(), torch.device("cuda"))
    images, labels = next(iter(s.train_loader))
    first_bad = torch.full((), T.NO_BAD_STEP, dtype=torch.int64, device="cuda")
    T.train_step(s, images, labels, 0.01)  # the first copies the mean image up, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lr in (0.01, 0.005):
            loss, wrong = T.train_step(s, images, labels, lr)
            first_bad = T.account(s, loss, wrong, labels.shape[0], first_bad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(first_bad) == T.NO_BAD_STEP
