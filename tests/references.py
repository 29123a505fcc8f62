"""Independent references shared by tests: other projects' layouts written out by hand."""

from __future__ import annotations

import numpy as np
import torch


def torchvision_state(
    seed: int = 0,
    classes: int = 7,
    widths: tuple[int, ...] = (64, 192, 384, 256, 256),
    fc: int = 4096,
) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's alexnet layout (``features.N`` / ``classifier.N``), He
    scaled; ``widths`` and ``fc`` shrink it for fast tests."""
    g = torch.Generator().manual_seed(seed)
    c1, c2, c3, c4, c5 = widths
    shapes = {
        "features.0": (c1, 3, 11, 11),
        "features.3": (c2, c1, 5, 5),
        "features.6": (c3, c2, 3, 3),
        "features.8": (c4, c3, 3, 3),
        "features.10": (c5, c4, 3, 3),
        "classifier.1": (fc, c5 * 36),
        "classifier.4": (fc, fc),
        "classifier.6": (classes, fc),
    }
    sd = {}
    for key, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        sd[f"{key}.weight"] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        sd[f"{key}.bias"] = torch.randn(shape[0], generator=g) * 0.05
    return sd


def torchvision_reference(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision's own AlexNet class with ``sd`` where torchvision is installed (the suite
    runs with it on torch 2.14.1: make test-torch214), else its layout written out here
    independently. Eval mode: dropout inactive."""
    try:
        import torchvision
    except ImportError:
        return _torchvision_written_out(sd)
    net = torchvision.models.alexnet(num_classes=sd["classifier.6.bias"].numel())
    net.load_state_dict(sd)
    return net.eval()


def torchvision_installed() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def _torchvision_written_out(sd: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d((6, 6)),
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(9216, 4096),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, sd["classifier.6.bias"].numel()),
    )
    index = {
        "features.0": 0,
        "features.3": 3,
        "features.6": 6,
        "features.8": 8,
        "features.10": 10,
        "classifier.1": 16,
        "classifier.4": 19,
        "classifier.6": 21,
    }
    net.load_state_dict(
        {f"{index[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in sd.items()}
    )
    return net.eval()
