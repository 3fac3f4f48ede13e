"""Batched augmentation: identity at zero strength, image/mask alignment, ranges, seeding, conventions."""

from __future__ import annotations

import pytest
import torch

from sdfsmis.data.augment import (
    AugmentConfig, affine_matrices, augment, elastic_displacements, random_gamma, random_grids, resample,
    sampling_grid, warp,
)


def _disks(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 1, size, size] binary disks of random centre/radius."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.4 + size * 0.3).tolist()
        r = float(torch.rand(1, generator=g)) * size * 0.15 + size * 0.12
        out[i, 0] = (((ys - cy) ** 2 + (xs - cx) ** 2) <= r**2).float()
    return out


def test_identity_at_zero_strength():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 2, 24, 20, generator=g) * 2 - 1
    masks = (torch.rand(3, 3, 24, 20, generator=g) > 0.5).float()
    out_images, out_masks = augment(images, masks, AugmentConfig.identity(), g)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert torch.allclose(out_images, images, atol=1e-5)
    assert torch.equal(out_masks, masks)


def test_image_and_mask_stay_aligned_under_the_full_recipe():
    """The image is the mask itself (mask 1 -> +1, 0 -> -1); after one shared resampling and a
    monotone gamma, the transformed mask is exactly a level set of the transformed image."""
    masks = _disks()
    images = masks * 2 - 1
    g = torch.Generator().manual_seed(2)
    out_images, out_masks = augment(images, masks, AugmentConfig(), g)
    assert not torch.equal(out_masks, masks)  # the transform did something
    for img, m in zip(out_images[:, 0], out_masks[:, 0]):
        inside, outside = img[m > 0], img[m == 0]
        assert inside.numel() > 50 and outside.numel() > 50
        assert inside.min() > outside.max()


def test_ranges_kept_and_dtypes_preserved():
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(8, 1, 32, 32, generator=g) * 2 - 1).half()
    masks = (torch.rand(8, 1, 32, 32, generator=g) > 0.7).float()
    out_images, out_masks = augment(images, masks, AugmentConfig(), g)
    assert out_images.dtype == torch.float16 and out_masks.dtype == torch.float32
    assert out_images.min() >= -1 and out_images.max() <= 1
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}


def test_seeded_and_per_element():
    images = _disks(4) * 2 - 1
    a = augment(images, None, AugmentConfig(), torch.Generator().manual_seed(5))[0]
    b = augment(images, None, AugmentConfig(), torch.Generator().manual_seed(5))[0]
    c = augment(images, None, AugmentConfig(), torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = images[:1].expand(4, -1, -1, -1)
    d = augment(same, None, AugmentConfig(), torch.Generator().manual_seed(7))[0]
    assert not torch.equal(d[0], d[1])  # every element draws its own transform


def test_shift_convention_moves_right_and_down():
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 5, 5] = 1
    matrices = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 1.0, 2.0]]])  # +3 px in x, +2 px in y
    out, _ = warp(img, None, sampling_grid(matrices, 16, 16), image_pad=0.0)
    assert torch.nonzero(out[0, 0] > 0.5).tolist() == [[7, 8]]


def test_affine_parameters_within_ranges():
    cfg = AugmentConfig()
    m = affine_matrices(500, cfg, torch.Generator().manual_seed(0))
    det = torch.linalg.det(m[:, :, :2])  # scale^2 * cos(shear)
    assert det.min() > 0.9**2 * 0.99 and det.max() < 1.2**2 + 1e-5
    assert m[:, :, 2].abs().max() <= cfg.shift_px
    zero = affine_matrices(3, AugmentConfig.identity(), torch.Generator().manual_seed(0))
    assert torch.allclose(zero, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))


def test_elastic_field_is_small_smooth_noise():
    d = elastic_displacements(4, 64, 64, alpha=10, sigma=5, generator=torch.Generator().manual_seed(0))
    assert d.shape == (4, 2, 64, 64)
    assert abs(float(d.mean())) < 0.1 and 0.15 < float(d.std()) < 0.6
    step = (d[..., 1:] - d[..., :-1]).abs().mean()
    assert step < 0.2 * d.abs().mean()  # neighbouring displacements are strongly correlated


def test_gamma_formula():
    x = torch.linspace(-1, 1, 11).view(1, 1, 1, 11)
    out = random_gamma(x, (2.0, 2.0))
    assert torch.allclose(out, 2 * ((x + 1) / 2) ** 2 - 1, atol=1e-6)


def test_scaled_config_for_latents():
    cfg = AugmentConfig().scaled(0.125)
    assert cfg.shift_px == pytest.approx(0.625) and cfg.elastic_sigma == pytest.approx(0.625)
    assert cfg.elastic_alpha == pytest.approx(10 / 64) and cfg.rotate_deg == 5.0


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        AugmentConfig(scale=(1.2, 0.9))
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 16, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_drives_gpu_augmentation_identically():
    masks = _disks(3)
    images = masks * 2 - 1
    cpu = augment(images, masks, AugmentConfig(), torch.Generator().manual_seed(9))
    gpu = augment(images.cuda(), masks.cuda(), AugmentConfig(), torch.Generator().manual_seed(9))
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-3)
    assert (cpu[1] != gpu[1].cpu()).float().mean() < 1e-3


def test_resample_applies_a_grid_drawn_at_the_slice_size_to_smaller_maps():
    """A grid drawn at 64 px, applied to a map at 8 px (a latent), gives what warping at 64 px and
    then averaging down to 8 px gives: the same transform at both sizes (exact for the affine part on
    a linear map; the elastic part differs a little within a latent pixel)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = torch.stack([xs + 0.5 * ys, ys - 0.3 * xs])[None].repeat(4, 1, 1, 1)
    grid = random_grids(4, 64, 64, AugmentConfig(rotate_deg=20, shift_px=8), torch.Generator().manual_seed(0))
    fine_then_pool = torch.nn.functional.avg_pool2d(resample(smooth, grid), 8)
    pool_then_coarse = resample(torch.nn.functional.avg_pool2d(smooth, 8), grid)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the padded border
    assert (fine_then_pool - pool_then_coarse)[inner].abs().max() < 0.01
    assert (fine_then_pool - torch.nn.functional.avg_pool2d(smooth, 8))[inner].abs().max() > 0.2
    shift = sampling_grid(torch.tensor([[[1.0, 0.0, 8.0], [0.0, 1.0, 0.0]]]), 64, 64)  # 8 px right
    latent = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.equal(resample(latent, shift)[..., 1:], latent[..., :-1])  # one latent pixel right


def test_flip_mirrors_left_right():
    """flip=1 with no other motion mirrors every slice; flip=0 draws nothing extra (same stream)."""
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    still = AugmentConfig.identity()
    flipped, _ = augment(images, None, AugmentConfig(**{**still.__dict__, "flip": 1.0}), torch.Generator().manual_seed(1))
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)
    a = affine_matrices(5, AugmentConfig(), torch.Generator().manual_seed(2))
    b = affine_matrices(5, AugmentConfig(flip=0.0), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    half = affine_matrices(400, AugmentConfig(flip=0.5), torch.Generator().manual_seed(3))
    share = (torch.linalg.det(half[:, :, :2]) < 0).float().mean()
    assert 0.4 < share < 0.6


def test_random_intensity():
    """Identity strengths change nothing; each part changes what it should, seeded, within [-1, 1]."""
    from sdfsmis.data.augment import random_intensity

    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(random_intensity(images, AugmentConfig.identity(), torch.Generator()), images, atol=1e-6)
    strong = AugmentConfig(gamma=(1.0, 1.0), contrast=(0.5, 0.5), noise_std=0.0, bias_field=0.0)
    out = random_intensity(images, strong, torch.Generator())
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, (images - mean) * 0.5 + mean, atol=1e-6)
    full = AugmentConfig(contrast=(0.7, 1.3), noise_std=0.05, bias_field=0.5)
    a, b = (random_intensity(images, full, torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and not torch.allclose(a, images, atol=0.05)
    dark = torch.full((2, 1, 8, 8), -1.0)  # background stays background under the bias field
    assert torch.equal(random_intensity(dark, AugmentConfig(gamma=(1, 1), bias_field=0.5), torch.Generator()), dark)


def test_random_remap_changes_relative_brightness():
    """The random curve keeps the background dark and the range, is seeded, and (unlike gamma or
    contrast) can make a darker tissue brighter than a lighter one; strength 0 changes nothing."""
    from sdfsmis.data.augment import random_intensity, random_remap

    images = torch.tensor([-1.0, -0.4, 0.4])[None, None, None].repeat(256, 1, 1, 1)  # background, grey, bright
    assert torch.allclose(random_remap(images, 0.0, torch.Generator()), images, atol=1e-6)
    a, b = (random_remap(images, 1.0, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert torch.all(a[..., 0] == -1)
    flipped = (a[..., 1] > a[..., 2]).float().mean()
    assert 0.05 < flipped < 0.5, flipped  # gamma and contrast never swap them
    full = random_intensity(images, AugmentConfig(gamma=(1, 1), remap=1.0), torch.Generator().manual_seed(1))
    assert torch.allclose(full, a, atol=1e-6)
    with pytest.raises(ValueError):
        AugmentConfig(remap=1.5)
