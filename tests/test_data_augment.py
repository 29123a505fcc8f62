"""DeviceAugment against per-image numpy references: crop, flip and ten-view geometry (PAPER
B3, B5), mean-image subtraction (B2), PCA colour noise statistics (B4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.data import DeviceAugment

H, W, C, CROP = 12, 10, 3, 7


def _stats(rng, channels=C, h=H, w=W):
    cov = np.atleast_2d(np.cov(rng.normal(size=(channels, 50))))
    vals, vecs = np.linalg.eigh(cov * 400)
    return {
        "mean": rng.uniform(0, 255, (channels, h, w)).astype(np.float32),
        "eigvals": vals[::-1].astype(np.float32),
        "eigvecs": vecs[:, ::-1].astype(np.float32),
    }


def _images(rng, b=6, channels=C, h=H, w=W):
    return torch.from_numpy(rng.integers(0, 256, (b, channels, h, w), dtype=np.uint8))


def _locate(out_b: np.ndarray, img: np.ndarray, mean: np.ndarray):
    """Find (y, x, flipped) such that img - mean cropped there equals out_b (brute force)."""
    hits = []
    for y in range(img.shape[1] - CROP + 1):
        for x in range(img.shape[2] - CROP + 1):
            ref = img[:, y : y + CROP, x : x + CROP] - mean[:, y : y + CROP, x : x + CROP]
            for flipped in (False, True):
                r = ref[:, :, ::-1] if flipped else ref
                if np.allclose(out_b, r, atol=1e-4):
                    hits.append((y, x, flipped))
    return hits


METHODS = pytest.mark.parametrize("method", ["gather", "loop"])  # CUDA's and the CPU's path


@METHODS
def test_train_crop_flip_and_mean_match_a_per_image_reference(method):
    rng = np.random.default_rng(0)
    stats, images = _stats(rng), _images(rng, b=40)
    aug = DeviceAugment(stats, CROP, train=True, pca_std=0.0, method=method)
    out = aug(images, torch.Generator().manual_seed(1))
    assert out.shape == (40, C, CROP, CROP) and out.dtype == torch.float32
    img64, mean64 = images.numpy().astype(np.float64), stats["mean"].astype(np.float64)
    found = [_locate(out[b].numpy(), img64[b], mean64) for b in range(40)]
    assert all(len(h) == 1 for h in found)  # exactly one placement explains each output
    flips = [h[0][2] for h in found]
    ys = {h[0][0] for h in found}
    assert 5 <= sum(flips) <= 35  # PAPER B3: reflection with probability 1/2
    assert len(ys) > 2  # positions vary


def test_same_generator_seed_same_batch_and_fresh_draws_per_call():
    rng = np.random.default_rng(1)
    stats, images = _stats(rng), _images(rng)
    aug = DeviceAugment(stats, CROP, train=True)
    a = aug(images, torch.Generator().manual_seed(5))
    b = aug(images, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    c1, c2 = aug(images, g), aug(images, g)
    assert torch.equal(a, b) and torch.equal(a, c1)
    assert not torch.equal(c1, c2)


@METHODS
def test_ten_views_are_the_corners_centre_and_reflections(method):
    rng = np.random.default_rng(2)
    stats, images = _stats(rng), _images(rng, b=3)
    aug = DeviceAugment(stats, CROP, train=False, method=method)
    out = aug.views(images, 10).numpy()
    assert out.shape == (30, C, CROP, CROP)
    img, mean = images.numpy().astype(np.float64), stats["mean"].astype(np.float64)
    cy, cx = (H - CROP) // 2, (W - CROP) // 2
    places = [(0, 0), (0, W - CROP), (H - CROP, 0), (H - CROP, W - CROP), (cy, cx)]
    for b in range(3):
        for v in range(10):
            y, x = places[v % 5]
            ref = (img[b] - mean)[:, y : y + CROP, x : x + CROP]
            ref = ref[:, :, ::-1] if v >= 5 else ref  # PAPER B5: the reflections
            np.testing.assert_allclose(out[b * 10 + v], ref, atol=1e-4)
    centre = aug(images)  # train=False: the centre view
    np.testing.assert_allclose(centre.numpy(), out[4::10], atol=1e-6)
    np.testing.assert_allclose(aug.views(images, 1).numpy(), out[4::10], atol=1e-6)


def test_pca_noise_is_one_offset_per_image_with_the_paper_covariance():
    rng = np.random.default_rng(3)
    stats = _stats(rng)
    n = 20000
    images = torch.full((n, C, H, W), 100, dtype=torch.uint8)
    # Constant images and a zero mean image: output - 100 is the colour offset of each image.
    aug0 = DeviceAugment({**stats, "mean": np.zeros_like(stats["mean"])}, CROP, train=True)
    out = aug0(images, torch.Generator().manual_seed(0)).double() - 100.0
    offsets = out[:, :, 0, 0]
    assert torch.allclose(out, offsets[:, :, None, None].expand_as(out), atol=1e-3)
    vals, vecs = stats["eigvals"].astype(np.float64), stats["eigvecs"].astype(np.float64)
    mag = 0.1 * vals / 255.0  # pca_scale="unit": l_i read with pixels in [0, 1], in 0-255 units
    expected = vecs @ np.diag(mag**2) @ vecs.T
    got = np.cov(offsets.numpy().T)
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05 * mag.max() ** 2)
    np.testing.assert_allclose(offsets.numpy().mean(0), 0, atol=4 * mag.max() / np.sqrt(n))
    # Coefficients along the eigenvectors are independent N(0, (0.1 l_i / 255)^2).
    coef = offsets.numpy() @ vecs
    np.testing.assert_allclose(coef.std(0), mag, rtol=0.03)


def test_pca_std_scale_and_switches():
    rng = np.random.default_rng(4)
    stats, images = _stats(rng), _images(rng, b=4000)
    zero = {**stats, "mean": np.zeros_like(stats["mean"])}
    aug = DeviceAugment(zero, CROP, train=True, pca_scale="std", flip=False)
    g = torch.Generator().manual_seed(0)
    out = aug(images, g).double()
    g = torch.Generator().manual_seed(0)
    plain = DeviceAugment(zero, CROP, train=True, pca_std=0.0, flip=False)(images, g).double()
    coef = (out - plain)[:, :, 0, 0].numpy() @ stats["eigvecs"].astype(np.float64)
    np.testing.assert_allclose(coef.std(0), 0.1 * np.sqrt(stats["eigvals"]), rtol=0.05)
    scaled = DeviceAugment(
        stats, CROP, train=False, scale=0.5, dtype=torch.bfloat16, channels_last=True
    )(images[:2])
    ref = DeviceAugment(stats, CROP, train=False)(images[:2]) * 0.5
    assert scaled.dtype == torch.bfloat16
    assert scaled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scaled.float(), ref, atol=1.0, rtol=0.01)
    no_mean = DeviceAugment(stats, CROP, train=False, subtract_mean=False)(images[:2])
    cy, cx = (H - CROP) // 2, (W - CROP) // 2
    assert torch.equal(no_mean, images[:2, :, cy : cy + CROP, cx : cx + CROP].float())


@METHODS
def test_one_channel_noise_is_a_brightness_shift_and_pad_crops_with_zeros(method):
    rng = np.random.default_rng(5)
    stats = _stats(rng, channels=1, h=8, w=8)
    images = _images(rng, b=500, channels=1, h=8, w=8)
    aug = DeviceAugment(stats, 8, train=True, pad=2, flip=False, pca_std=0.0, method=method)
    out = aug(images, torch.Generator().manual_seed(0))
    assert out.shape == (500, 1, 8, 8)
    centred = images.double() - torch.from_numpy(stats["mean"]).double()
    padded = torch.nn.functional.pad(centred, (2, 2, 2, 2))
    for b in range(20):  # each output is one 8x8 window of the zero-padded centred image
        windows = [padded[b, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.allclose(out[b].double(), w, atol=1e-4) for w in windows)
    noisy = DeviceAugment(stats, 8, train=True, flip=False)(images, torch.Generator())
    shift = noisy - DeviceAugment(stats, 8, train=True, flip=False, pca_std=0.0)(
        images, torch.Generator()
    )
    assert shift.abs().sum() > 0 and shift.std(dim=(1, 2, 3)).max() < 1e-3  # per-image constant


def test_gather_and_loop_paths_agree():
    rng = np.random.default_rng(7)
    stats, images = _stats(rng), _images(rng, b=16)
    for pad in (0, 2):
        outs = [
            DeviceAugment(stats, CROP, train=True, pad=pad, method=m)(
                images, torch.Generator().manual_seed(4)
            )
            for m in ("gather", "loop")
        ]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-6)


def test_rejects_a_crop_larger_than_the_images():
    with pytest.raises(ValueError, match="larger"):
        DeviceAugment(_stats(np.random.default_rng(0)), 20, train=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_draws():
    rng = np.random.default_rng(6)
    stats, images = _stats(rng), _images(rng, b=16)
    aug = DeviceAugment(stats, CROP, train=True)
    cpu = aug(images, torch.Generator().manual_seed(3))
    cuda = aug(images.cuda(), torch.Generator().manual_seed(3))  # CPU draws, moved
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=1e-5)
    gcuda = torch.Generator(device="cuda").manual_seed(3)
    assert aug(images.cuda(), gcuda).shape == cpu.shape
    views = aug.views(images.cuda(), 10).cpu()
    torch.testing.assert_close(views, aug.views(images, 10), atol=1e-4, rtol=1e-5)


def test_pca_noise_from_training_pixels_against_numpy_pca():
    """PAPER B4 from the data, independently: the colour offsets' spread along each principal
    axis of the training pixels (numpy's eigendecomposition of their RGB covariance, pixels in
    [0, 1]) is 0.1 times that axis's eigenvalue (in 0-255 units, times 255), and they lie in
    the span the text describes. The stats are computed by prepare's own code from the same
    pixels; nothing of the augmentation's formula is restated here."""
    from alexnet.data.store import stats_from_images

    rng = np.random.default_rng(7)
    mix = np.array([[1.0, 0.6, 0.2], [0.0, 0.8, 0.5], [0.0, 0.0, 0.4]])
    pixels = np.clip(rng.normal(0.5, 0.15, (400, 8, 8, 3)) @ mix.T, 0, 1)
    train = np.round(pixels * 255).astype(np.uint8)  # (N, H, W, C) as stored
    stats = stats_from_images(train)
    unit = train.reshape(-1, 3).astype(np.float64) / 255.0
    lam, vec = np.linalg.eigh(np.cov(unit.T))  # the paper's PCA, with pixels in [0, 1]
    n = 20000
    images = torch.full((n, 3, 8, 8), 100, dtype=torch.uint8)
    zero_mean = {**stats, "mean": np.zeros_like(stats["mean"])}
    aug = DeviceAugment(zero_mean, 8, train=True, flip=False, pca_std=0.1)
    offsets = (aug(images, torch.Generator().manual_seed(0)).double() - 100.0)[:, :, 0, 0]
    along = offsets.numpy() @ vec  # coordinates on numpy's principal axes, 0-255 units
    np.testing.assert_allclose(along.std(0), 255 * 0.1 * lam, rtol=0.03)
    np.testing.assert_allclose(np.corrcoef(along.T), np.eye(3), atol=0.03)  # independent
