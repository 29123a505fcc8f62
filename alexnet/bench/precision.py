"""``alexnet bench --precision-check``: bf16 autocast against fp32 training on real
Fashion-MNIST, with the gap between two fp32 runs in different batch orders as the noise it
is judged against (docs/RESULTS.md, "bf16 against fp32")."""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from alexnet.model import AlexNet
from alexnet.runtime import devices


def _train_curve(images, labels, precision: str, steps: int, batch: int, seed: int) -> list[float]:
    """Training losses of the small model: init from seed 0, batch order and dropout from
    ``seed``, SGD with PAPER D1's momentum and weight decay."""
    torch.manual_seed(0)
    model = AlexNet(10, arch="small", in_channels=1, image_size=images.shape[-1], init="kaiming")
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx].contiguous(memory_format=torch.channels_last)
        with devices.autocast(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else None):
            loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _smooth(v: list[float], w: int = 25) -> list[float]:
    return [statistics.fmean(v[max(0, i - w + 1) : i + 1]) for i in range(len(v))]


def precision_check(args: argparse.Namespace) -> int:
    """bf16 autocast against fp32 training on real Fashion-MNIST; the gap between two fp32 runs
    with different batch orders is the noise it is judged against."""
    from alexnet.data.small import load_fashion_mnist

    raw, labels = load_fashion_mnist(args.fashion_mnist)["train"]
    x = torch.from_numpy(raw.copy()).permute(0, 3, 1, 2).float() / 255.0
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(labels)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, batch = args.check_steps, args.batch_size or 64
    runs = {"fp32": ("fp32", 1), "bf16": ("bf16", 1), "fp32_other_order": ("fp32", 2)}
    curves = {k: _smooth(_train_curve(x, y, p, steps, batch, s)) for k, (p, s) in runs.items()}
    skip = min(25, steps - 1)  # the first window is mostly the shared initial loss
    gap = max(abs(a - b) for a, b in zip(curves["bf16"][skip:], curves["fp32"][skip:]))
    noise = max(
        abs(a - b) for a, b in zip(curves["fp32_other_order"][skip:], curves["fp32"][skip:])
    )
    result = {
        "steps": steps,
        "batch_size": batch,
        "max_gap_bf16_fp32": gap,
        "max_gap_fp32_orders": noise,
        "final_fp32": curves["fp32"][-1],
        "final_bf16": curves["bf16"][-1],
        "within_noise": gap <= noise,
    }
    if args.json:
        print(json.dumps({**result, "curves": curves}, indent=2))
        return 0
    print(f"{'step':>6} {'fp32':>8} {'bf16':>8} {'fp32 (other order)':>19}  (loss, mean of 25)")
    for i in range(0, steps, max(1, steps // 12)):
        print(
            f"{i + 1:6d} {curves['fp32'][i]:8.4f} {curves['bf16'][i]:8.4f} "
            f"{curves['fp32_other_order'][i]:19.4f}"
        )
    print(
        f"max |bf16 - fp32| = {gap:.4f}; max |fp32 - fp32 other order| = {noise:.4f} "
        f"(after step {skip}); final {result['final_fp32']:.4f} fp32, "
        f"{result['final_bf16']:.4f} bf16"
    )
    return 0
