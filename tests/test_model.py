"""The network of PAPER section 3 against independent references built from torch primitives."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from references import torchvision_reference, torchvision_state

from alexnet.cli import main as cli
from alexnet.model import AlexNet, count_parameters
from alexnet.summary import summarize
from alexnet.towers import TwoTowerAlexNet, grouped_to_towers, towers_to_grouped


def reference_forward(
    m: AlexNet,
    x: torch.Tensor,
    alpha_scale: float = 1 / 5,
    per_tower: bool = True,
    stop: str | None = None,
) -> torch.Tensor:
    """The paper's network written out from PAPER A1-A9 with torch primitives only.

    Uses the model's parameters but none of its code: F.conv2d with the paper's strides,
    paddings and groups, torch's own LRN (k=2, n=5, beta=0.75, c = alpha * alpha_scale),
    max pooling 3/2, and ReLU everywhere but fc8.
    """
    sd = m.state_dict()
    alpha = 1e-4 * alpha_scale * 5  # F.local_response_norm divides alpha by n itself

    def lrn(t):
        parts = t.chunk(2, dim=1) if per_tower else (t,)
        return torch.cat([F.local_response_norm(p, 5, alpha, 0.75, 2.0) for p in parts], 1)

    def pool(t):
        return F.max_pool2d(t, 3, 2)

    x = pool(lrn(F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=4, padding=2))))
    x = pool(lrn(F.relu(F.conv2d(x, sd["conv2.weight"], sd["conv2.bias"], padding=2, groups=2))))
    x = F.relu(F.conv2d(x, sd["conv3.weight"], sd["conv3.bias"], padding=1))
    x = F.relu(F.conv2d(x, sd["conv4.weight"], sd["conv4.bias"], padding=1, groups=2))
    x = pool(F.relu(F.conv2d(x, sd["conv5.weight"], sd["conv5.bias"], padding=1, groups=2)))
    assert x.shape[1:] == (256, 6, 6)
    x = F.relu(F.linear(x.flatten(1), sd["fc6.weight"], sd["fc6.bias"]))
    x = F.relu(F.linear(x, sd["fc7.weight"], sd["fc7.bias"]))
    if stop == "fc7":
        return x
    return F.linear(x, sd["fc8.weight"], sd["fc8.bias"])


@pytest.fixture(scope="module")
def paper_model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet().eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224, dtype=torch.float64) * 60  # centred raw pixels (B2)


def test_paper_model_equals_primitive_reference(paper_model, image):
    m = AlexNet().double().eval()
    m.load_state_dict(paper_model.state_dict())
    out = m(image)
    ref = reference_forward(m, image)
    assert out.shape == (2, 1000)
    assert out.abs().max() > 1e-3  # not a dead network
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        m.forward_features(image, "fc7"),
        reference_forward(m, image, stop="fc7"),
        rtol=1e-10,
        atol=1e-12,
    )


def test_lrn_conventions_and_tower_boundary(paper_model, image):
    for convention, scale in (("code", 1 / 5), ("printed", 1.0)):
        for per_tower in (True, False):
            m = AlexNet(lrn_convention=convention, lrn_per_tower=per_tower).double().eval()
            m.load_state_dict(paper_model.state_dict())
            ref = reference_forward(m, image, alpha_scale=scale, per_tower=per_tower)
            torch.testing.assert_close(m(image), ref, rtol=1e-10, atol=1e-12)
    # The conventions give different networks: c = alpha/n vs c = alpha (PAPER A8).
    code = AlexNet(lrn_convention="code").double().eval()
    printed = AlexNet(lrn_convention="printed").double().eval()
    code.load_state_dict(paper_model.state_dict())
    printed.load_state_dict(paper_model.state_dict())
    assert not torch.allclose(
        code.forward_features(image, "conv1"), printed.forward_features(image, "conv1")
    )


def test_parameter_counts_and_summary():
    assert count_parameters(AlexNet()) == 60_965_224  # PAPER A11
    assert count_parameters(AlexNet(arch="owt")) == 61_100_840  # PAPER H2
    s = summarize("paper")
    assert [r["neurons"] for r in s["layers"]] == [
        290_400,
        186_624,
        64_896,
        64_896,
        43_264,
        4096,
        4096,
        1000,
    ]  # PAPER A10 (corrected)
    assert s["total_params"] == 60_965_224
    assert s["total_macs"] == 724_406_816
    assert s["layers"][0]["output_shape"] == [96, 55, 55]
    assert summarize("owt")["total_params"] == 61_100_840


def test_summary_command_json(capsys):
    assert cli(["summary", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "paper" and data["total_params"] == 60_965_224
    assert set(data["layers"][0]) == {"name", "output_shape", "neurons", "params", "macs"}
    assert cli(["summary", "--model", "small", "--in-channels", "1", "--image-size", "28"]) == 0
    assert "conv1" in capsys.readouterr().out


def test_initialisation_statistics():
    torch.manual_seed(0)
    m = AlexNet()
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}  # PAPER D3
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(m, name)
        w = layer.weight.detach().double()
        assert abs(w.std().item() - 0.01) < 0.01 * 0.03, name  # PAPER D2: N(0, 0.01^2)
        assert abs(w.mean().item()) < 0.01 * 0.03, name
        expected = 1.0 if name in ones else 0.0
        assert torch.all(layer.bias == expected), name


def test_kaiming_initialisation_statistics():
    torch.manual_seed(0)
    m = AlexNet(arch="small", num_classes=10, init="kaiming")
    for name in ("conv2", "conv3", "fc6"):
        layer = getattr(m, name)
        fan_in = layer.weight[0].numel()
        std = layer.weight.detach().double().std().item()
        assert abs(std - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5, name
        assert torch.all(layer.bias == 0), name


def test_layers_and_groups_as_in_the_paper():
    m = AlexNet()
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) == ((11, 11), (4, 4), (2, 2))
    assert [getattr(m, f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]  # A4-A6
    assert m.conv2.weight.shape == (256, 48, 5, 5)
    assert m.conv3.weight.shape == (384, 256, 3, 3)
    assert m.conv4.weight.shape == (384, 192, 3, 3)
    assert m.conv5.weight.shape == (256, 192, 3, 3)
    assert m.fc6.in_features == 9216
    assert (m.pool.kernel_size, m.pool.stride) == (3, 2)  # overlapping pooling, A9


def test_dropout_on_fc6_fc7_outputs_only():
    torch.manual_seed(0)
    m = AlexNet(arch="small", num_classes=10).train()
    x = torch.randn(4, 3, 32, 32) * 50
    seen = {}
    m.fc7.register_forward_hook(lambda mod, inp, out: seen.setdefault("fc7_in", inp[0]))
    m.fc8.register_forward_hook(lambda mod, inp, out: seen.setdefault("fc8_in", inp[0]))
    m(x)
    for key in ("fc7_in", "fc8_in"):  # both fc6 and fc7 outputs are dropped (PAPER C1)
        zero_frac = (seen[key] == 0).double().mean().item()
        assert 0.4 < zero_frac < 0.8, key
    m.eval()
    torch.testing.assert_close(m(x), m(x))  # deterministic at test time


def test_dropout_at_test_time_is_the_network_without_dropout():
    """PAPER C1: at test time every neuron is used, its output scaled so that it equals the
    training-time expectation (inverted dropout scales at training instead). So the eval-mode
    network equals the same weights with no dropout at all, and the training-time mean of
    fc7 over many masks approaches the eval-mode fc7."""
    torch.manual_seed(0)
    m = AlexNet(arch="small", num_classes=10, init="kaiming").double()
    plain = AlexNet(arch="small", num_classes=10, dropout=0.0, init="none").double()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(m.eval()(x), plain.eval()(x), rtol=0, atol=0)
    # Training mode: fc7's input is fc6's output under the model's own dropout. Over 2,000
    # masks (20 passes of 100 copies of each image) its mean approaches the eval-mode input.
    seen = {}
    m.fc7.register_forward_hook(lambda mod, inp, out: seen.__setitem__("fc7_in", inp[0]))
    m, x = m.float(), x.float()
    with torch.no_grad():
        m.eval()(x)
        exact, total = seen["fc7_in"], 0
        for _ in range(20):
            m.train()(x.repeat(100, 1, 1, 1))
            total = total + seen["fc7_in"].view(100, *exact.shape).sum(0)
    mean = total / 2000
    torch.testing.assert_close(mean, exact, rtol=0.15, atol=0.05 * float(exact.abs().max()))


def test_two_towers_equal_grouped_model():
    torch.manual_seed(0)
    grouped = AlexNet(arch="small", num_classes=10, dropout=0.0).double()
    towers = TwoTowerAlexNet.from_grouped(grouped, ("cpu", "cpu")).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64) * 50
    torch.testing.assert_close(towers(x), grouped(x), rtol=1e-10, atol=1e-12)
    # Gradients agree too, after converting them to the grouped layout.
    towers(x).square().sum().backward()
    grouped(x).square().sum().backward()
    tgrads = towers_to_grouped({k: p.grad for k, p in towers.named_parameters()})
    for k, p in grouped.named_parameters():
        torch.testing.assert_close(tgrads[k], p.grad, rtol=1e-8, atol=1e-10)
    # State dicts convert both ways unchanged.
    back = towers_to_grouped(grouped_to_towers(grouped.state_dict()))
    assert all(torch.equal(back[k], v) for k, v in grouped.state_dict().items())


def test_two_towers_paper_model(paper_model):
    towers = TwoTowerAlexNet.from_grouped(paper_model).eval()
    x = torch.randn(1, 3, 224, 224) * 60
    torch.testing.assert_close(towers(x), paper_model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(towers) == 60_965_224
    with pytest.raises(ValueError):
        TwoTowerAlexNet(towers=False)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = AlexNet(arch="small", num_classes=10)
    x = torch.randn(8, 3, 32, 32) * 50
    F.cross_entropy(m(x), torch.randint(0, 10, (8,))).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_sgd_overfits_one_small_batch():
    # The small net with He init (N(0, 0.01^2) stalls at this scale: see reset_parameters).
    torch.manual_seed(0)
    m = AlexNet(
        arch="small", num_classes=10, in_channels=1, image_size=28, dropout=0.0, init="kaiming"
    )
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.arange(16) % 10
    opt = torch.optim.SGD(m.parameters(), lr=0.005, momentum=0.9)
    first = None
    for _ in range(45):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    m.eval()
    assert loss.item() < 0.1 * first
    assert (m(x).argmax(1) == y).all()


def test_owt_loads_torchvision_weights_unchanged():
    sd = torchvision_state(classes=1000)
    owt = AlexNet(arch="owt").eval()
    owt.load_torchvision_state_dict(sd)
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(owt(x), torchvision_reference(sd)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        owt.load_torchvision_state_dict({"features.1.weight": torch.zeros(1)})


def test_variants_and_options_build_and_run():
    x = torch.randn(2, 1, 28, 28)
    for options in (
        {},
        {"lrn": False},
        {"pool_kernel": 2},
        {"towers": False},
        {"activation": "tanh"},
        {"dropout": 0.0},
    ):
        m = AlexNet(10, arch="small", in_channels=1, image_size=28, **options).eval()
        assert m(x).shape == (2, 10)
        rebuilt = AlexNet(**m.config)
        assert rebuilt.config == m.config
    with pytest.raises(ValueError):
        AlexNet(arch="vgg")
    with pytest.raises(ValueError):
        AlexNet(arch="small", image_size=4)
