"""alexnet bench: the reference network is the same function as ours, and the command runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alexnet.bench.memory import saved_activation_bytes
from alexnet.bench.speed import build_pair, reference_network
from alexnet.cli import main
from alexnet.model import AlexNet, count_parameters


def test_reference_matches_ours_with_the_same_weights():
    # With LRN across all maps (as the reference's torch.nn.LocalResponseNorm) and ours's
    # weights copied in layer order, the two networks compute the same logits.
    ours = AlexNet(10, arch="small", lrn_per_tower=False).eval()
    ref = reference_network(ours).eval()
    layers = [m for m in ref if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    names = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    with torch.no_grad():
        for layer, name in zip(layers, names):
            layer.weight.copy_(getattr(ours, name).weight)
            layer.bias.copy_(getattr(ours, name).bias)
        x = torch.randn(2, 3, 32, 32) * 50
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["small", "paper"])
def test_pair_has_equal_parameter_counts(arch):
    ours, ref = build_pair(arch, 10 if arch == "small" else 1000)
    assert count_parameters(ref) == count_parameters(ours)
    if arch == "paper":
        assert count_parameters(ours) == 60_965_224  # PAPER A11


def test_saved_bytes_counts_activations_not_parameters():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    nbytes = saved_activation_bytes(lambda: torch.relu(lin(x)), lin.parameters())
    # Linear saves its input (8x64) and ReLU its output (8x32), float32.
    assert nbytes == (8 * 64 + 8 * 32) * 4


def test_bench_quick_json(capsys):
    assert main(["bench", "--device", "cpu", "--model", "small", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = ("reference_train_ips", "train_ips", "train_speedup", "reference_infer_ips")
    keys += ("infer_ips", "infer_speedup", "end_to_end_fraction", "train_peak_mb", "saved_mb")
    for key in keys:
        assert math.isfinite(out[key]) and out[key] > 0, key
    assert out["train_speedup"] == pytest.approx(out["train_ips"] / out["reference_train_ips"])
    assert out["parameters"] == count_parameters(AlexNet(10, arch="small"))
    # the peers, timed in the same run: the usual way and each installed engine
    from alexnet.interop.engines import candidates

    engines = {f"{c.backend}_{c.precision}" for c in candidates("auto") if c.backend != "torch"}
    assert set(out["peers"]) == {"usual", "ours"} | engines
    for name, peer in out["peers"].items():
        assert 0.0 <= peer["top1_agreement"] <= 1.0, name
        assert peer["infer_ips"] > 0 and peer["latency_ms"] > 0, name
    assert out["infer_ips"] == out["peers"]["ours"]["infer_ips"]
    for name, r in out["ratios"].items():
        assert r["infer"] == pytest.approx(out["infer_ips"] / out["peers"][name]["infer_ips"])
        assert r["latency"] == pytest.approx(out["peers"][name]["latency_ms"] / out["latency_ms"])
    assert out["best_infer_backend"].split()[0] in {"torch", "openvino", "onnxruntime"}
    # timed stretches last long enough: at least --steps calls (2), more for fast calls
    assert out["latency_calls_per_round"] >= out["infer_calls_per_round"] >= out["steps"]
    # the peak: the better of a run before the training rounds and one after inference
    early, late = out["matmul_peak_runs_gflops"]
    for k, best in out["matmul_peak_gflops"].items():
        assert best == max(early[k], late[k]) > 0, k


def test_each_contender_trains_with_its_own_optimizer():
    """Ours: PaperSGD, what alexnet train runs; the compiled peer: torch's fused SGD; the
    usual way: torch's SGD as constructed by default."""
    from alexnet.bench.steps import _optimizer
    from alexnet.optim import PaperSGD

    params = [torch.nn.Parameter(torch.ones(3))]
    assert isinstance(_optimizer("paper", params), PaperSGD)
    assert _optimizer("sgd_fused", params).defaults["fused"] is True
    usual = _optimizer("sgd", params)
    assert type(usual) is torch.optim.SGD and not usual.defaults["fused"]


def test_bench_bad_device_is_a_clear_error(capsys):
    assert main(["bench", "--device", "tpu", "--quick"]) == 2
    assert "--device tpu" in capsys.readouterr().err


def test_precision_check_missing_data_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main(["bench", "--precision-check", "--fashion-mnist", missing]) == 2
    assert "nowhere" in capsys.readouterr().err
