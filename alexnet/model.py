"""The network of section 3 of the paper, and two variants built by the same code.

``AlexNet()`` is the paper's network (PAPER A1-A12, C1, D2, D3). ``arch="owt"`` is the later
"one weird trick" layout that torchvision ships (PAPER H2); ``arch="small"`` keeps the paper's
eight-layer pattern scaled for 28-32 px images (Fashion-MNIST, CIFAR-10) on a CPU.

Shapes in comments are for the paper model on a 224x224x3 input, batch N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.dropout import Dropout
from alexnet.lrn import LocalResponseNorm

CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
LEARNED = (*CONVS, "fc6", "fc7", "fc8")  # the eight learned layers (PAPER A1)
LAYERS = (*CONVS, "pool5", "fc6", "fc7", "fc8")  # what ``forward_features`` can return
GROUPED = ("conv2", "conv4", "conv5")  # see only their own tower's maps (PAPER A4, A6)


def make_lrn(enabled: bool, convention: str, groups: int) -> nn.Module:
    """The paper's LRN (PAPER A8: n=5, alpha=1e-4, beta=0.75, k=2) over ``groups`` blocks of
    channels, or nothing where ``enabled`` is false (owt, an ablation)."""
    if not enabled:
        return nn.Identity()
    return LocalResponseNorm(5, 1e-4, 0.75, 2.0, convention, groups=groups)


def layer_of(parameter: str) -> str:
    """The layer a parameter belongs to: "conv1" for "conv1.weight" and "tower0.conv1.bias"
    (alexnet/towers.py), "" for a module's own "weight"."""
    parts = parameter.split(".")
    return parts[-2] if len(parts) > 1 else ""


@dataclass(frozen=True)
class ArchSpec:
    widths: tuple[int, int, int, int, int]  # kernels in conv1..conv5
    kernels: tuple[int, int, int, int, int]
    strides: tuple[int, int, int, int, int]
    paddings: tuple[int, int, int, int, int]
    fc_width: int
    image_size: int
    lrn: bool
    towers: bool  # groups=2 in conv2, conv4, conv5 (PAPER A12)
    dropout_at: tuple[str, ...]  # which activations dropout is applied to
    adaptive_pool: bool  # torchvision's AdaptiveAvgPool2d((6, 6)) before fc6


ARCHS: dict[str, ArchSpec] = {
    "paper": ArchSpec(
        widths=(96, 256, 384, 384, 256),  # PAPER A3-A6
        kernels=(11, 5, 3, 3, 3),
        strides=(4, 1, 1, 1, 1),
        # Deviation: conv1 padding 2 on 224 px (55x55 out, as torchvision); the paper's
        # 224 with no padding gives no integer map size (PAPER A3).
        paddings=(2, 2, 1, 1, 1),
        fc_width=4096,  # PAPER A7
        image_size=224,
        lrn=True,  # PAPER A8
        towers=True,  # PAPER A4, A6, A12
        dropout_at=("fc6", "fc7"),  # PAPER C1: on the outputs of fc6 and fc7
        adaptive_pool=False,
    ),
    "owt": ArchSpec(  # PAPER H2: torchvision.models.alexnet, layer for layer
        widths=(64, 192, 384, 256, 256),
        kernels=(11, 5, 3, 3, 3),
        strides=(4, 1, 1, 1, 1),
        paddings=(2, 2, 1, 1, 1),
        fc_width=4096,
        image_size=224,
        lrn=False,
        towers=False,
        dropout_at=("pool5", "fc6"),  # torchvision drops the inputs of fc6 and fc7
        adaptive_pool=True,
    ),
    "small": ArchSpec(  # the paper's pattern for 28-32 px: no stride-4 stem, narrower layers
        widths=(48, 128, 192, 192, 128),
        kernels=(3, 5, 3, 3, 3),
        strides=(1, 1, 1, 1, 1),
        paddings=(1, 2, 1, 1, 1),
        fc_width=1024,
        image_size=32,
        lrn=True,
        towers=True,
        dropout_at=("fc6", "fc7"),
        adaptive_pool=False,
    ),
}

# torchvision's alexnet state-dict keys -> ours (PAPER H2), for loading its weights unchanged.
TORCHVISION_KEYS = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}


def resolve_options(**options) -> dict:
    """``AlexNet``'s keyword arguments checked, with the arch's own value filled in wherever
    None was given: ``AlexNet(**resolved)`` builds the same network whatever the defaults
    become later. Raises ``ValueError`` naming the first bad option."""
    o = dict(options)
    arch = o["arch"]
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    choices = {
        "activation": ("relu", "tanh"),
        "pool_kernel": (3, 2),
        "lrn_convention": ("code", "printed"),
        "init": ("paper", "kaiming", "none"),
    }
    for name, allowed in choices.items():
        if o[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {o[name]!r}")
    if not 0.0 <= o["dropout"] < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {o['dropout']}")
    spec = ARCHS[arch]
    for name in ("image_size", "widths", "fc_width", "lrn", "towers"):
        if o[name] is None:
            o[name] = getattr(spec, name)
    if o["conv1_padding"] is None:
        o["conv1_padding"] = spec.paddings[0]
    o["widths"] = tuple(o["widths"])
    if len(o["widths"]) != 5 or min(o["widths"]) < 1:
        raise ValueError(f"widths needs five positive conv widths, got {o['widths']}")
    if o["towers"] and any(w % 2 for w in o["widths"]):
        raise ValueError(f"two towers (groups=2) need even widths, got {o['widths']}")
    return o


class AlexNet(nn.Module):
    """AlexNet. ``AlexNet()`` is the paper's network; keyword options serve the ablations.

    Args:
        num_classes: outputs of fc8 (1000 for ImageNet, PAPER A1).
        arch: ``"paper"``, ``"owt"`` (torchvision's layout) or ``"small"`` (28-32 px inputs).
        in_channels: 3 for RGB, 1 for greyscale data such as Fashion-MNIST.
        image_size: input height and width; sets fc6's fan-in (224 for paper/owt).
        widths, fc_width: kernels per conv layer and neurons per hidden FC layer.
        lrn: local response normalisation after ReLU 1 and 2 (PAPER A8; E3 ablates it).
        lrn_convention: ``"code"``, c = alpha/n as in the authors' code, Caffe and
            torch.nn.LocalResponseNorm (default), or ``"printed"``, c = alpha as printed.
        lrn_per_tower: normalise within each tower's maps, as the authors' two-GPU net did
            (layers-145.cfg: one cmrnorm of 48 channels per GPU); False normalises across all
            maps of the layer, as Caffe's bvlc_alexnet does.
        pool_kernel: 3 for the paper's overlapping pooling (z=3, s=2, PAPER A9), 2 for the
            non-overlapping z=s=2 it is compared with (E3).
        dropout: probability for dropout (PAPER C1: 0.5); 0 disables it.
        activation: ``"relu"`` (PAPER A2) or ``"tanh"`` (the comparison of PAPER E4).
        towers: groups=2 in conv2, conv4, conv5 (PAPER A12); False connects every map.
        conv1_padding: override conv1's padding (0 with 227 px inputs runs Caffe's weights).
        init: ``"paper"`` (PAPER D2, D3), ``"kaiming"`` (for small nets, see
            ``reset_parameters``) or ``"none"`` (torch's defaults, e.g. before loading weights).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        arch: str = "paper",
        in_channels: int = 3,
        image_size: int | None = None,
        widths: tuple[int, ...] | None = None,
        fc_width: int | None = None,
        lrn: bool | None = None,
        lrn_convention: str = "code",
        lrn_per_tower: bool = True,
        pool_kernel: int = 3,
        dropout: float = 0.5,
        activation: str = "relu",
        towers: bool | None = None,
        conv1_padding: int | None = None,
        init: str = "paper",
    ) -> None:
        super().__init__()
        self.config = resolve_options(
            num_classes=num_classes,
            arch=arch,
            in_channels=in_channels,
            image_size=image_size,
            widths=widths,
            fc_width=fc_width,
            lrn=lrn,
            lrn_convention=lrn_convention,
            lrn_per_tower=lrn_per_tower,
            pool_kernel=pool_kernel,
            dropout=dropout,
            activation=activation,
            towers=towers,
            conv1_padding=conv1_padding,
            init=init,
        )
        o, spec = self.config, ARCHS[arch]
        self.input_size = o["image_size"]
        self.dropout_at = spec.dropout_at
        self.act = F.relu if activation == "relu" else torch.tanh
        g = 2 if o["towers"] else 1
        self._add_convs(in_channels, g)
        # Each tower normalises over its own maps only (PAPER A12, H1): LRN in groups.
        self.lrn_groups = g if lrn_per_tower else 1
        self.lrn1 = make_lrn(o["lrn"], lrn_convention, self.lrn_groups)
        self.lrn2 = make_lrn(o["lrn"], lrn_convention, self.lrn_groups)
        self.pool = nn.MaxPool2d(kernel_size=pool_kernel, stride=2)  # z=3, s=2: PAPER A9
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6)) if spec.adaptive_pool else None
        self.drop = Dropout(dropout)  # PAPER C1 (nn.Dropout, a cheaper mask on CPU)
        self._add_fcs(in_channels, num_classes)
        if init != "none":
            self.reset_parameters(init)

    def _add_convs(self, in_channels: int, g: int) -> None:
        """conv1..conv5, in this order (their default initialisation draws from torch's
        generator); conv2, conv4 and conv5 in ``g`` groups."""
        o = self.config
        spec = ARCHS[o["arch"]]
        k, s, p = spec.kernels, spec.strides, (o["conv1_padding"], *spec.paddings[1:])
        c1, c2, c3, c4, c5 = o["widths"]
        self.conv1 = nn.Conv2d(in_channels, c1, k[0], s[0], p[0])  # 3 -> 96, 11x11/4: PAPER A3
        self.conv2 = nn.Conv2d(c1, c2, k[1], s[1], p[1], groups=g)  # 5x5x48 per tower: A4
        self.conv3 = nn.Conv2d(c2, c3, k[2], s[2], p[2])  # 3x3x256, sees both towers: A5
        self.conv4 = nn.Conv2d(c3, c4, k[3], s[3], p[3], groups=g)  # 3x3x192: A6
        self.conv5 = nn.Conv2d(c4, c5, k[4], s[4], p[4], groups=g)  # 3x3x192: A6

    def _add_fcs(self, in_channels: int, num_classes: int) -> None:
        """fc6..fc8, after the convolutions and pooling that set fc6's fan-in."""
        o = self.config
        flat = self._flat_features(in_channels, o["image_size"])  # 6*6*256 = 9216: PAPER A7
        self.fc6 = nn.Linear(flat, o["fc_width"])
        self.fc7 = nn.Linear(o["fc_width"], o["fc_width"])
        self.fc8 = nn.Linear(o["fc_width"], num_classes)  # feeds the softmax: PAPER A1

    def reset_parameters(self, init: str = "paper") -> None:
        """``"paper"``: weights ~ N(0, 0.01^2) everywhere (PAPER D2); biases 1 in conv2,
        conv4, conv5, fc6, fc7 and 0 in conv1, conv3, fc8 (PAPER D3).

        ``"kaiming"``: weights ~ N(0, 2 / fan_in), biases 0.
        Deviation (an option, used by the small-data recipes): with the small model's fan-ins
        (600-1152 against the paper net's 1200-9216), N(0, 0.01^2) gives every layer a gain of
        about 0.3, so by fc7 the input's signal is ~1e-3 of the constant that the bias-1 layers
        add, and SGD stalls at the label marginal. He et al.'s scaling keeps the signal alive.
        """
        ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
        for name in LEARNED:
            layer = getattr(self, name)
            if init == "paper":
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.constant_(layer.bias, 1.0 if name in ones else 0.0)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def _run(self, x: Tensor, stop: str | None = None) -> Tensor:
        act = self.act
        x = self.pool(self.lrn1(act(self.conv1(x))))  # N,96,55,55 -> N,96,27,27
        if stop == "conv1":
            return x
        x = self.pool(self.lrn2(act(self.conv2(x))))  # N,256,27,27 -> N,256,13,13
        if stop == "conv2":
            return x
        x = act(self.conv3(x))  # N,384,13,13; no pooling or LRN in conv3-5: PAPER A9
        if stop == "conv3":
            return x
        x = act(self.conv4(x))  # N,384,13,13
        if stop == "conv4":
            return x
        x = act(self.conv5(x))  # N,256,13,13
        if stop == "conv5":
            return x
        x = self.pool(x)  # N,256,6,6
        if self.avgpool is not None:
            x = self.avgpool(x)
        x = torch.flatten(x, 1)  # N,9216
        if stop == "pool5":
            return x
        if "pool5" in self.dropout_at:
            x = self.drop(x)
        x = act(self.fc6(x))  # N,4096
        if "fc6" in self.dropout_at:
            x = self.drop(x)
        if stop == "fc6":
            return x
        x = act(self.fc7(x))  # N,4096
        if "fc7" in self.dropout_at:
            x = self.drop(x)
        if stop == "fc7":
            return x
        return self.fc8(x)  # N,num_classes logits; no ReLU on fc8: PAPER A2

    def forward(self, x: Tensor) -> Tensor:
        """Logits; softmax is applied by the loss (training) or the caller (evaluation)."""
        return self._run(x)

    def forward_features(self, x: Tensor, layer: str = "fc7") -> Tensor:
        """Activations of ``layer`` (after its ReLU and pooling; fc7 is the 4096-d vector of
        PAPER F3). In eval mode dropout does not touch them."""
        if layer not in LAYERS:
            raise ValueError(f"unknown layer {layer!r}; choose one of {LAYERS}")
        return self._run(x, stop=layer)

    def _flat_features(self, in_channels: int, image_size: int) -> int:
        """fc6's fan-in, from the map sizes: floor((n + 2p - k) / s) + 1 per layer."""
        n = image_size
        for i, conv in enumerate(getattr(self, name) for name in CONVS):
            n = (n + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            if i in (0, 1, 4):
                n = (n - self.pool.kernel_size) // self.pool.stride + 1
            if n < 1:
                raise ValueError(f"image_size {image_size} is too small for this architecture")
        if self.avgpool is not None:
            n = 6
        return self.conv5.out_channels * n * n

    def load_torchvision_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load torchvision's ``alexnet`` weights (keys ``features.0.weight``...) unchanged
        into the ``owt`` model."""
        renamed = {}
        for key, value in state_dict.items():
            module, _, param = key.rpartition(".")
            if module not in TORCHVISION_KEYS:
                raise KeyError(f"unexpected key {key!r} in a torchvision alexnet state dict")
            renamed[f"{TORCHVISION_KEYS[module]}.{param}"] = value
        self.load_state_dict(renamed)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
