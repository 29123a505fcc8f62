"""The paper's two-GPU layout (PAPER A12, section 3.2), as model parallelism.

Each tower holds half of the kernels (or neurons) of every layer and lives on its own device.
The towers exchange activations only where the paper says: before conv3 and before each
fully-connected layer. conv2, conv4 and conv5 see only their own tower's maps, which is what
``groups=2`` computes on one device, and each tower normalises (LRN) over its own maps, as the
authors' two-GPU net did. So with both towers on one device the output equals the grouped
``AlexNet``'s, and state dicts convert between the layouts by splitting or concatenating every
weight along its output dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alexnet.model import CONVS, LEARNED, AlexNet, make_lrn


def _halves(n: int) -> tuple[int, int]:
    return (n + 1) // 2, n // 2


def grouped_to_towers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``AlexNet`` (groups=2) state dict -> ``TwoTowerAlexNet`` state dict."""
    out = {}
    for key, value in state_dict.items():
        layer, _, param = key.partition(".")
        if layer not in LEARNED:
            raise KeyError(f"unexpected key {key!r} in an AlexNet state dict")
        first, second = torch.split(value, _halves(value.shape[0]), dim=0)
        out[f"tower0.{layer}.{param}"] = first.clone()
        out[f"tower1.{layer}.{param}"] = second.clone()
    return out


def towers_to_grouped(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``TwoTowerAlexNet`` state dict -> ``AlexNet`` (groups=2) state dict."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("tower0."):
            continue
        rest = key[len("tower0.") :]
        out[rest] = torch.cat([value.cpu(), state_dict[f"tower1.{rest}"].cpu()], dim=0)
    return out


class Tower(nn.Module):
    """Half of every layer of a grouped ``AlexNet`` (``template`` gives the sizes)."""

    def __init__(self, template: AlexNet, index: int) -> None:
        super().__init__()
        for name in CONVS:
            conv = getattr(template, name)
            # A grouped layer's kernels see conv.in_channels / groups maps: their own tower's
            # (conv2, conv4, conv5); conv1 and conv3 (groups=1) see every input map.
            self.add_module(
                name,
                nn.Conv2d(
                    conv.in_channels // conv.groups,
                    _halves(conv.out_channels)[index],
                    conv.kernel_size,
                    conv.stride,
                    conv.padding,
                ),
            )
        for name in ("fc6", "fc7", "fc8"):
            fc = getattr(template, name)
            self.add_module(name, nn.Linear(fc.in_features, _halves(fc.out_features)[index]))


class TwoTowerAlexNet(nn.Module):
    """``AlexNet`` split over two devices, e.g. ``TwoTowerAlexNet(("cuda:0", "cuda:1"))``.

    Takes the same keyword options as ``AlexNet`` (the grouped layout is required:
    ``towers=True`` and ``lrn_per_tower=True``). Inputs may live anywhere; logits are
    returned on the first device. Use ``from_grouped`` / ``grouped_state_dict`` to move
    weights between this layout and ``AlexNet``.
    """

    def __init__(self, devices: tuple[str, str] = ("cpu", "cpu"), **options) -> None:
        super().__init__()
        grouped = AlexNet(**options)
        if not grouped.config["towers"] or grouped.lrn_groups != 2:
            raise ValueError("two towers need the grouped layout (towers=True, lrn_per_tower=True)")
        self.config = dict(grouped.config)
        self.input_size = grouped.input_size
        self.devices = tuple(torch.device(d) for d in devices)
        self.tower0, self.tower1 = Tower(grouped, 0), Tower(grouped, 1)
        # Each tower's LRN sees only its own maps (the grouped model's LRN runs in 2 groups).
        self.lrn1 = make_lrn(self.config["lrn"], self.config["lrn_convention"], 1)
        self.lrn2 = make_lrn(self.config["lrn"], self.config["lrn_convention"], 1)
        self.pool, self.avgpool, self.drop = grouped.pool, grouped.avgpool, grouped.drop
        self.act, self.dropout_at = grouped.act, grouped.dropout_at
        self.load_state_dict(grouped_to_towers(grouped.state_dict()), strict=False)
        self.place()

    def place(self) -> TwoTowerAlexNet:
        """Put each tower on its device (call again after ``.to()`` moved everything)."""
        self.tower0.to(self.devices[0])
        self.tower1.to(self.devices[1])
        return self

    @classmethod
    def from_grouped(cls, model: AlexNet, devices: tuple[str, str] = ("cpu", "cpu")):
        towers = cls(devices, **{**model.config, "init": "none"})
        towers.load_state_dict(grouped_to_towers(model.state_dict()), strict=False)
        return towers.place()

    def grouped_state_dict(self) -> dict[str, Tensor]:
        return towers_to_grouped(self.state_dict())

    def _exchange(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Both towers get all maps/neurons: the only cross-device copies (PAPER A12)."""
        d0, d1 = self.devices
        return torch.cat([a, b.to(d0)], 1), torch.cat([a.to(d1), b], 1)

    def forward(self, x: Tensor) -> Tensor:
        towers, act, pool = (self.tower0, self.tower1), self.act, self.pool
        h = [x.to(d) for d in self.devices]
        h = [pool(self.lrn1(act(t.conv1(v)))) for t, v in zip(towers, h)]
        h = [pool(self.lrn2(act(t.conv2(v)))) for t, v in zip(towers, h)]
        h = self._exchange(*h)  # conv3 sees both towers' maps: PAPER A5
        h = [act(t.conv3(v)) for t, v in zip(towers, h)]
        h = [act(t.conv4(v)) for t, v in zip(towers, h)]
        h = [pool(act(t.conv5(v))) for t, v in zip(towers, h)]
        if self.avgpool is not None:
            h = [self.avgpool(v) for v in h]
        h = self._exchange(*h)  # fc6 sees all of pool5: PAPER A7
        h = [torch.flatten(v, 1) for v in h]
        if "pool5" in self.dropout_at:
            h = [self.drop(v) for v in h]
        for name in ("fc6", "fc7"):
            h = [act(getattr(t, name)(v)) for t, v in zip(towers, h)]
            if name in self.dropout_at:
                h = [self.drop(v) for v in h]
            h = self._exchange(*h)
        logits = [t.fc8(v) for t, v in zip(towers, h)]
        return torch.cat([logits[0], logits[1].to(self.devices[0])], 1)
