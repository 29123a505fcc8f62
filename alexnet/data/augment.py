"""The paper's augmentation, batched on the device: crop + flip (B3), PCA colour noise (B4),
mean-image subtraction (B2), and the test views (centre crop, the ten views of B5).

Images arrive as uint8 (B, C, H, W) at the stored size (256x256 for ImageNet, B1) on any
device. Every random draw comes from the ``torch.Generator`` passed in, in a fixed order
(crop rows, crop columns, flips, colour alphas), so a seeded generator reproduces a batch
exactly on CPU and, with a CUDA generator, on the GPU.

Colour noise units (the paper is silent). B4 adds ``sum_i p_i * a_i * l_i`` with
``a_i ~ N(0, 0.1)``; that is only meaningful for a stated pixel scale, since ``l_i`` is a
variance. ``pca_scale="unit"`` (default) reads the formula with pixel values in [0, 1], as the
widely used reimplementations do (on ImageNet about 5 grey levels of 255 along p_1);
``pca_scale="std"`` uses ``sqrt(l_i)`` instead, the unit-consistent reading (about 12 levels).
For one-channel data (Fashion-MNIST) the "PCA" is the 1x1 pixel variance: the noise is a
random brightness shift of the same size, drawn the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

PCA_SCALES = ("unit", "std")


def _tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)


def gather_crops(
    x: torch.Tensor,
    batch: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    flips: torch.Tensor,
    crop: int,
) -> torch.Tensor:
    """Crop ``x[batch[k]]`` at (ys[k], xs[k]), size ``crop``, mirrored where ``flips[k]``.

    ``x`` is (N, C, H, W); returns (K, C, crop, crop) in channels_last memory format. One
    batched gather over an NHWC view: no Python loop over images.
    """
    ar = torch.arange(crop, device=x.device)
    rows = ys[:, None] + ar  # (K, crop)
    cols = torch.where(flips[:, None], xs[:, None] + (crop - 1) - ar, xs[:, None] + ar)
    nhwc = x.permute(0, 2, 3, 1)
    out = nhwc[batch[:, None, None], rows[:, :, None], cols[:, None, :]]  # (K, crop, crop, C)
    return out.permute(0, 3, 1, 2)


class DeviceAugment:
    """``aug(uint8 images, generator) -> float (B, C, crop, crop)``; see the module docstring.

    ``stats``: a mapping with ``mean`` (C, H, W) in 0-255 units and ``eigvals`` (C,),
    ``eigvecs`` (C, C) (columns are eigenvectors), e.g. ``PreparedDataset.stats`` or a
    checkpoint's ``data_stats``. ``train=False`` makes ``aug(x)`` the centre view. ``pad``
    zero-pads (after mean subtraction, i.e. with the mean colour) before the random crop, for
    small images. ``subtract_mean=False`` skips B2; ``pca_std=0`` switches B4 off.
    """

    def __init__(
        self,
        stats: Mapping,
        crop_size: int,
        *,
        train: bool,
        flip: bool = True,
        pca_std: float = 0.1,
        scale: float = 1.0,
        pad: int = 0,
        pca_scale: str = "unit",
        subtract_mean: bool = True,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        method: str = "auto",
    ) -> None:
        if pca_scale not in PCA_SCALES:
            raise ValueError(f"pca_scale must be one of {PCA_SCALES}, not {pca_scale!r}")
        self.mean = _tensor(stats["mean"]).float()
        self.eigvals = _tensor(stats["eigvals"]).float()
        self.eigvecs = _tensor(stats["eigvecs"]).float()
        c, h, w = self.mean.shape
        if crop_size > min(h, w) + 2 * pad:
            raise ValueError(f"crop {crop_size} larger than the {h}x{w} images (pad {pad})")
        self.crop, self.train, self.flip = int(crop_size), train, flip
        self.pca_std, self.scale, self.pad = float(pca_std), float(scale), int(pad)
        self.pca_scale, self.subtract_mean = pca_scale, subtract_mean
        self.dtype, self.channels_last = dtype, channels_last
        if method not in ("auto", "gather", "loop"):
            raise ValueError(f"method must be auto, gather or loop, not {method!r}")
        self.method = method
        if not subtract_mean:
            self.mean = torch.zeros_like(self.mean)
        # PAPER B4: per-component magnitude l_i (pixels in [0, 1]) or sqrt(l_i), in 0-255 units.
        lam = self.eigvals.clamp(min=0)
        self.pca_magnitude = lam / 255.0 if pca_scale == "unit" else lam.sqrt()
        # per device: the buffers (``_buffers``), and per view shape the views' places
        self._on: dict[object, tuple[torch.Tensor, ...]] = {}

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (
                self.mean.to(device),
                self.pca_magnitude.to(device),
                self.eigvecs.to(device),
            )
        return self._on[device]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        x = x.to(self.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def color_noise(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(n, C) offsets, one fresh alpha per image per call (PAPER B4), 0-255 units."""
        _, mag, vecs = self._buffers(torch.device(device))
        gen_device = generator.device if generator is not None else device
        alpha = torch.randn(n, vecs.shape[0], generator=generator, device=gen_device)
        alpha = alpha.to(device) * self.pca_std
        return (alpha * mag) @ vecs.T  # row k: sum_i p_i * alpha_ki * mag_i

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None):
        if not self.train:
            return self.views(images, 1)
        b, _, h, w = images.shape
        device = images.device
        mean, _, _ = self._buffers(device)
        gen_device = generator.device if generator is not None else device
        p, crop = self.pad, self.crop
        # PAPER B3: a random crop position and a reflection with probability 1/2 per image.
        ys = torch.randint(0, h + 2 * p - crop + 1, (b,), generator=generator, device=gen_device)
        xs = torch.randint(0, w + 2 * p - crop + 1, (b,), generator=generator, device=gen_device)
        flips = torch.rand(b, generator=generator, device=gen_device) < 0.5
        ys, xs, flips = ys.to(device), xs.to(device), flips.to(device)
        if not self.flip:
            flips = torch.zeros_like(flips)
        noise = None
        if self.pca_std > 0:
            noise = self.color_noise(b, generator, device)
        centred = None
        if p:
            centred = F.pad(images.float() - mean, (p, p, p, p))
        x = self._crops(images, centred, mean, ys, xs, flips)
        if noise is not None:
            x.add_(noise[:, :, None, None].to(x.dtype))  # x is a fresh tensor
        return self._finish(x)

    def _use_gather(self, device: torch.device) -> bool:
        return self.method == "gather" or (self.method == "auto" and device.type != "cpu")

    def _crops(self, images, centred, mean, ys, xs, flips, batch=None) -> torch.Tensor:
        """Float crops minus the mean image at the same place (PAPER B2), flipped together.

        ``centred``: the already centred and padded images (``pad`` > 0), else None. On CUDA
        (``method="auto"``) one batched gather; on the CPU a loop of slice copies, which
        there is ~10x faster than the gather's per-element index arithmetic.
        """
        device = images.device
        batch = torch.arange(len(ys), device=device) if batch is None else batch
        c = self.crop
        if self._use_gather(device):
            if centred is not None:
                return gather_crops(centred, batch, ys, xs, flips, c)
            x = gather_crops(images, batch, ys, xs, flips, c).float()
            return x - gather_crops(mean[None], torch.zeros_like(batch), ys, xs, flips, c)
        out = torch.empty((len(ys), images.shape[1], c, c), dtype=torch.float32, device=device)
        for k, (b, y, x, f) in enumerate(
            zip(batch.tolist(), ys.tolist(), xs.tolist(), flips.tolist(), strict=True)
        ):
            if centred is not None:
                patch = centred[b, :, y : y + c, x : x + c]
                out[k].copy_(patch.flip(-1) if f else patch)
                continue
            self._crop_minus_mean(images[b], mean, y, x, f, out[k])
        return out

    def _crop_minus_mean(self, pixels, mean, y: int, x: int, flip: bool, out) -> None:
        """``out`` = the crop at (y, x) of ``pixels`` (C, H, W) or (B, C, H, W), minus the
        mean image's crop at the same place (PAPER B2), both reflected if ``flip``."""
        c = self.crop
        patch, mpatch = pixels[..., y : y + c, x : x + c], mean[:, y : y + c, x : x + c]
        if flip:
            patch, mpatch = patch.flip(-1), mpatch.flip(-1)
        torch.sub(patch, mpatch, out=out)

    def view_offsets(self, h: int, w: int, n: int) -> list[tuple[int, int, bool]]:
        """(row, col, flipped) of each test view: 1 = centre; 10 = PAPER B5 (tl, tr, bl, br,
        centre, then the same five reflected)."""
        c = self.crop
        centre = ((h - c) // 2, (w - c) // 2, False)
        if n == 1:
            return [centre]
        if n != 10:
            raise ValueError(f"views: n must be 1 or 10, not {n}")
        five = [(0, 0, False), (0, w - c, False), (h - c, 0, False), (h - c, w - c, False), centre]
        return five + [(y, x, True) for y, x, _ in five]

    def views(self, images: torch.Tensor, n: int = 10) -> torch.Tensor:
        """Test views (B*n, C, crop, crop), image-major (views of image 0 first), mean
        subtracted the same way as in training; no colour noise."""
        b, channels, h, w = images.shape
        if self.crop > min(h, w):
            # Views are cut from the stored image (no padding): a larger crop has no pixels.
            raise ValueError(f"test views of {self.crop} px from {h}x{w} images: crop too large")
        device = images.device
        mean, _, _ = self._buffers(device)
        if not self._use_gather(device):
            # The same n places in every image: n batched slices (view-major), not b*n copies.
            c = self.crop
            out = torch.empty((b, n, channels, c, c), dtype=torch.float32, device=device)
            for k, (y, x, f) in enumerate(self.view_offsets(h, w, n)):
                self._crop_minus_mean(images, mean, y, x, f, out[:, k])
            return self._finish(out.view(b * n, channels, c, c))
        ys, xs, flips = self._view_places(device, h, w, n)
        ys, xs, flips = ys.repeat(b), xs.repeat(b), flips.repeat(b)
        batch = torch.arange(b, device=device).repeat_interleave(n)
        return self._finish(self._crops(images, None, mean, ys, xs, flips, batch))

    def _view_places(self, device: torch.device, h: int, w: int, n: int):
        """Rows, columns and flips of the ``n`` views, on ``device``, made once per shape: a
        host-to-device copy of them in every batch would wait for the device each time."""
        key = (device, h, w, n)
        if key not in self._on:
            offsets = torch.tensor(self.view_offsets(h, w, n), device=device)  # (n, 3)
            self._on[key] = (offsets[:, 0], offsets[:, 1], offsets[:, 2].bool())
        return self._on[key]
