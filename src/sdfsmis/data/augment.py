"""Batched, seeded augmentation of 2-D slices in torch: random affine + elastic + gamma.

Every function works on a batch ``[B, C, H, W]`` on whatever device the tensors live on (CPU or GPU),
draws its random numbers from an explicit ``torch.Generator`` and applies, per batch element, one
geometric transform (affine composed with an elastic displacement) in a **single**
``torch.nn.functional.grid_sample`` pass over image and mask together, so the two stay aligned
exactly. Images are interpolated bilinearly; masks bilinearly and then thresholded at 0.5 (the
SSL-ALPNet recipe interpolates one-hot labels and rounds them, which is the same rule).

Why hand-written rather than MONAI transforms: MONAI's ``RandAffined`` / ``Rand2DElasticd`` draw
their parameters from a NumPy ``RandomState`` per sample and transform one sample at a time (and
the affine and the elastic part are two resampling passes). The episode sampler keeps every training
volume on the GPU and augments a whole batch of episodes per step; a batched transform whose
randomness comes from the training loop's ``torch.Generator`` keeps that on the device, in one
sampling pass, reproducible from one seed.

Parameters (``AugmentConfig`` defaults) are SSL-ALPNet's ``sabs_aug`` recipe (Ouyang et al., ECCV
2020, ``dataloaders/augutils.py`` / ``image_transforms.py``), which ADNet (Hansen et al., MedIA
2022) and the SD-FSMIS training set-up reuse:

- affine: rotation U(-5, 5) degrees, shift U(-5, 5) px per axis, shear U(-5, 5) degrees
  (matrix ``[[1, -sin a], [0, cos a]]``), isotropic scale U(0.9, 1.2);
- elastic: a displacement field of uniform noise in [-1, 1] per pixel and axis, smoothed with a
  Gaussian of sigma 5 px (kernel ``int(4 sigma) | 1`` = 21 taps, mirrored borders) and multiplied by
  alpha = 10, in pixels. Its standard deviation is only about 0.35 px: the recipe's elastic part is
  a gentle texture perturbation, the affine part does the large motion;
- gamma U(0.5, 1.5) on the image intensities mapped to [0, 1] (then mapped back to [-1, 1]).

Differences from the reference, on purpose: every part of the affine map is centred on the image
centre (SSL-ALPNet shears about the top-left corner, which adds up to ~22 px of shift at 256 px);
the transforms are composed into one resampling instead of two; pixels that come from outside the
image are filled with ``image_pad`` (-1, the darkest normalised value) instead of 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths. Pixel quantities refer to the size of the tensors being augmented."""

    rotate_deg: float = 5.0  # rotation drawn from U(-rotate_deg, rotate_deg)
    shift_px: float = 5.0  # shift per axis drawn from U(-shift_px, shift_px)
    shear_deg: float = 5.0  # shear angle drawn from U(-shear_deg, shear_deg)
    scale: tuple[float, float] = (0.9, 1.2)  # isotropic zoom drawn from U(lo, hi); >1 enlarges
    elastic_alpha: float = 10.0  # displacement multiplier (px); 0 disables the elastic part
    elastic_sigma: float = 5.0  # Gaussian smoothing of the displacement noise (px)
    gamma: tuple[float, float] = (0.5, 1.5)  # gamma drawn from U(lo, hi) on [0, 1] intensities
    flip: float = 0.0  # probability of a left-right mirror (before the affine map); 0 draws nothing
    contrast: tuple[float, float] = (1.0, 1.0)  # intensity bank: contrast about the slice mean, U(lo, hi)
    noise_std: float = 0.0  # intensity bank: Gaussian noise, standard deviation in [-1, 1] units
    bias_field: float = 0.0  # intensity bank: smooth multiplicative field exp(U(-b, b) x a low-order field)
    remap: float = 0.0  # intensity bank: a random non-monotonic intensity curve, mixed in with weight U(remap / 2, remap)
    image_pad: float = -1.0  # image value for pixels mapped from outside the slice
    mask_threshold: float = 0.5  # interpolated masks are binarised with ``> mask_threshold``

    def __post_init__(self) -> None:
        for name in ("rotate_deg", "shift_px", "shear_deg", "elastic_alpha", "elastic_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.flip <= 1 or not 0 <= self.remap <= 1 or self.noise_std < 0 or self.bias_field < 0:
            raise ValueError("AugmentConfig: flip and remap must be in [0, 1], noise_std and bias_field >= 0")
        for name in ("scale", "gamma", "contrast"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentConfig.{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if self.elastic_alpha > 0 and self.elastic_sigma <= 0:
            raise ValueError("AugmentConfig.elastic_sigma must be > 0 when elastic_alpha > 0")
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"AugmentConfig.mask_threshold must be in (0, 1), got {self.mask_threshold}")

    @classmethod
    def identity(cls) -> AugmentConfig:
        """Zero strength: ``augment`` then returns its inputs (up to float rounding)."""
        return cls(rotate_deg=0.0, shift_px=0.0, shear_deg=0.0, scale=(1.0, 1.0),
                   elastic_alpha=0.0, gamma=(1.0, 1.0))

    def scaled(self, factor: float) -> AugmentConfig:
        """The same recipe for tensors ``factor`` times the size (e.g. 1/8 for 32x32 latents of
        256x256 slices): shift and sigma scale with ``factor``, alpha with ``factor**2`` (the
        smoothed noise's amplitude goes as 1/sigma), so displacements shrink by ``factor``."""
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        return replace(self, shift_px=self.shift_px * factor, elastic_sigma=self.elastic_sigma * factor,
                       elastic_alpha=self.elastic_alpha * factor**2)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None,
             device: torch.device, extra: tuple[int, ...] = ()) -> Tensor:
    """U(lo, hi) samples of shape ``[n, *extra]`` drawn on the generator's device, moved to ``device``.

    Drawing where the generator lives lets a CPU generator drive GPU augmentation (and gives the same
    numbers whatever the target device)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand((n, *extra), generator=generator, device=gen_device, dtype=torch.float32)
    return (lo + (hi - lo) * u).to(device)


def affine_matrices(n: int, config: AugmentConfig, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Tensor:
    """``[n, 2, 3]`` random forward affine maps ``p_out = A (p_in - c) + c + t`` in pixels.

    Columns ``[A | t]``; coordinates are ``(x, y)`` = (column, row), ``c`` the image centre.
    ``A = scale * Shear @ Rotation @ Flip`` (``Flip`` = diag(-1, 1) with probability ``config.flip``,
    drawn last and only when ``flip > 0``, so recipes without flips draw the same numbers as before).
    """
    device = torch.device(device)
    rot = torch.deg2rad(_uniform(n, -config.rotate_deg, config.rotate_deg, generator, device))
    shift = _uniform(n, -config.shift_px, config.shift_px, generator, device, (2,))
    shear = torch.deg2rad(_uniform(n, -config.shear_deg, config.shear_deg, generator, device))
    scale = _uniform(n, config.scale[0], config.scale[1], generator, device)
    cos, sin = torch.cos(rot), torch.sin(rot)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    zeros, ones = torch.zeros_like(shear), torch.ones_like(shear)
    shear_m = torch.stack([torch.stack([ones, -torch.sin(shear)], -1),
                           torch.stack([zeros, torch.cos(shear)], -1)], -2)
    a = scale[:, None, None] * (shear_m @ rotation)
    if config.flip > 0:
        mirror = torch.where(_uniform(n, 0.0, 1.0, generator, device) < config.flip, -1.0, 1.0)
        a = a * torch.stack([mirror, torch.ones_like(mirror)], -1)[:, None, :]
    return torch.cat([a, shift[:, :, None]], dim=2)


def _gaussian_kernel(sigma: float, device: torch.device) -> Tensor:
    size = int(4 * sigma) | 1
    x = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma: float, device: torch.device) -> Tensor:
    """``[n, n]`` matrix ``B`` with ``B @ v`` = Gaussian blur of ``v`` with mirrored borders (reflect-101)."""
    k = _gaussian_kernel(sigma, device)
    pad = k.numel() // 2
    src = torch.arange(n, device=device)[:, None] + torch.arange(k.numel(), device=device)[None, :] - pad
    if n == 1:
        src = torch.zeros_like(src)
    else:
        period = 2 * (n - 1)
        src = src.remainder(period)
        src = torch.where(src > n - 1, period - src, src)
    out = torch.zeros(n, n, device=device, dtype=torch.float32)
    rows = torch.arange(n, device=device)[:, None].expand_as(src)
    return out.index_put_((rows.reshape(-1), src.reshape(-1)), k.expand_as(src).reshape(-1), accumulate=True)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[..., H, W]`` (kernel ``int(4 sigma) | 1`` taps, mirrored borders
    as OpenCV's default), done as two matrix products: fast on CPU and GPU alike."""
    h, w = x.shape[-2:]
    x = x.float()
    x = x @ _blur_matrix(w, sigma, x.device).T
    return _blur_matrix(h, sigma, x.device) @ x


def elastic_displacements(n: int, height: int, width: int, alpha: float, sigma: float,
                          generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> Tensor:
    """``[n, 2, H, W]`` displacement fields ``(dx, dy)`` in pixels: alpha * Gaussian(U(-1, 1) noise)."""
    device = torch.device(device)
    noise = _uniform(n, -1.0, 1.0, generator, device, (2, height, width))
    return gaussian_blur(noise, sigma) * alpha


def sampling_grid(matrices: Tensor, height: int, width: int, displacement: Tensor | None = None) -> Tensor:
    """``[n, H, W, 2]`` grid for ``grid_sample(align_corners=False)`` realising ``matrices``
    (forward maps, see :func:`affine_matrices`) after which ``displacement`` ``[n, 2, H, W]`` is
    applied: output pixel ``p`` reads the input at ``A^-1 (p + d(p) - c - t) + c``."""
    n, device = matrices.shape[0], matrices.device
    m = matrices.float()
    # centred pixel coordinates minus the shift; the normalised grid is then diag(2/W, 2/H) A^-1 q
    xs = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    ys = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    qx = xs.view(1, 1, width) - m[:, 0, 2].view(n, 1, 1)
    qy = ys.view(1, height, 1) - m[:, 1, 2].view(n, 1, 1)
    if displacement is not None:
        qx, qy = qx + displacement[:, 0], qy + displacement[:, 1]
    a00, a01, a10, a11 = (m[:, i, j].view(n, 1, 1) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    det = a00 * a11 - a01 * a10  # A^-1 = [[a11, -a01], [-a10, a00]] / det, written out (no solver call)
    gx = (a11 * qx - a01 * qy) * (2 / width) / det
    gy = (a00 * qy - a10 * qx) * (2 / height) / det
    return torch.stack([gx.expand(n, height, width), gy.expand(n, height, width)], dim=-1)


def warp(images: Tensor, masks: Tensor | None, grid: Tensor, image_pad: float = -1.0,
         mask_threshold: float = 0.5) -> tuple[Tensor, Tensor | None]:
    """Resample ``images`` ``[n, C, H, W]`` and ``masks`` ``[n, Cm, H, W]`` with one ``grid_sample``.

    Bilinear for both; masks are then binarised (``> mask_threshold``); outside pixels become
    ``image_pad`` for images and 0 for masks.
    """
    c = images.shape[1]
    x = images.float() - image_pad
    if masks is not None:
        x = torch.cat([x, masks.float()], dim=1)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    new_images = (out[:, :c] + image_pad).to(images.dtype)
    new_masks = None
    if masks is not None:
        new_masks = (out[:, c:] > mask_threshold).to(masks.dtype)
    return new_images, new_masks


def random_grids(n: int, height: int, width: int, config: AugmentConfig,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """``[n, H, W, 2]`` sampling grids of ``n`` random affine + elastic transforms drawn at H x W
    (pixel quantities of ``config`` refer to that size). Draws the affine parameters, then the elastic
    noise (when ``elastic_alpha > 0``)."""
    matrices = affine_matrices(n, config, generator, device)
    disp = None
    if config.elastic_alpha > 0:
        disp = elastic_displacements(n, height, width, config.elastic_alpha, config.elastic_sigma, generator, device)
    return sampling_grid(matrices, height, width, disp)


def resample(x: Tensor, grid: Tensor, padding_mode: str = "border") -> Tensor:
    """``x`` ``[n, C, h, w]`` read bilinearly through ``grid`` ``[n, H, W, 2]``, which may be drawn at
    another size: it is then area-averaged to h x w first. For the affine part that is exact (the
    mean of a block's normalised coordinates is the coordinate of the block's centre), so latents
    (h = H / 8) and feature maps follow the same transform as the slice. Returns ``x``'s dtype."""
    if grid.shape[1:3] != x.shape[-2:]:
        grid = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), x.shape[-2:]).permute(0, 2, 3, 1)
    out = F.grid_sample(x.float(), grid.float(), mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.to(x.dtype)


def random_gamma(images: Tensor, gamma: tuple[float, float], generator: torch.Generator | None = None) -> Tensor:
    """Per-element gamma ``U(gamma)`` on images in [-1, 1]: ``2 * ((x + 1) / 2) ** g - 1``."""
    g = _uniform(images.shape[0], gamma[0], gamma[1], generator, images.device)
    x01 = ((images.float() + 1) / 2).clamp(0, 1)
    shape = (-1,) + (1,) * (images.dim() - 1)
    return (x01.pow(g.view(shape)) * 2 - 1).to(images.dtype)


REMAP_KNOTS = 6  # control points of the random intensity curve of ``AugmentConfig.remap``


def random_remap(images: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Per element, a random intensity curve mixed into images in [-1, 1]: on [0, 1] intensities,
    ``(1 - w) * u + w * f(u)`` with ``w ~ U(strength / 2, strength)`` and ``f`` piecewise linear through
    ``REMAP_KNOTS`` evenly spaced knots with values ``U(0, 1)`` (the first 0: the background stays
    dark). ``f`` need not be monotonic, so tissues change their brightness *relative to each other*,
    as an organ does between MR scans (a spleen as bright as the kidneys in one T2 scan, as grey as
    the liver in the next), which no gamma or contrast change can imitate."""
    n = images.shape[0]
    w = _uniform(n, strength / 2, strength, generator, images.device)
    knots = _uniform(n, 0.0, 1.0, generator, images.device, (REMAP_KNOTS,))
    knots[:, 0] = 0.0
    u = ((images.float() + 1) / 2).clamp(0, 1).reshape(n, -1)
    pos = u * (REMAP_KNOTS - 1)
    lo = pos.floor().long().clamp(max=REMAP_KNOTS - 2)
    frac = pos - lo
    curve = knots.gather(1, lo) * (1 - frac) + knots.gather(1, lo + 1) * frac
    mixed = (1 - w[:, None]) * u + w[:, None] * curve
    return (mixed * 2 - 1).reshape(images.shape).to(images.dtype)


def random_intensity(images: Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> Tensor:
    """The intensity part of ``config`` on images ``[B, 1, H, W]`` in [-1, 1], one draw per element:
    the random curve of :func:`random_remap` (when ``config.remap > 0``), gamma, then contrast about
    the slice mean, a smooth multiplicative bias field (a random combination of 1, x, y, x^2, xy, y^2
    over the slice, exponentiated) and Gaussian noise; clipped to [-1, 1]. This is what the intensity
    bank of cached training encodings applies (:mod:`sdfsmis.latents`): MR bias fields, scanner
    contrast, noise and the tissues' relative brightness differ between patients."""
    n, _, h, w = images.shape
    if config.remap > 0:
        images = random_remap(images, config.remap, generator)
    x = random_gamma(images, config.gamma, generator).float()
    c = _uniform(n, config.contrast[0], config.contrast[1], generator, x.device).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    if config.bias_field > 0:
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                                indexing="ij")
        basis = torch.stack([torch.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys])  # [6, H, W]
        coef = _uniform(n, -config.bias_field, config.bias_field, generator, x.device, (6,)) / 2
        field = torch.exp(torch.einsum("nk,khw->nhw", coef, basis))[:, None]
        x = (x + 1) * field - 1  # multiplies the [0, 2] intensities, background stays dark
    if config.noise_std > 0:
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
        x = x + config.noise_std * noise
    return x.clamp(-1, 1).to(images.dtype)


def augment(images: Tensor, masks: Tensor | None = None, config: AugmentConfig = AugmentConfig(),
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """Random affine + elastic (one shared resampling for image and mask) + gamma on the image.

    images: ``[B, C, H, W]`` in [-1, 1]; masks: ``[B, Cm, H, W]`` in {0, 1} or None. Each batch
    element gets its own transform; image and mask of an element get the same one. Returns tensors
    of the input shapes, dtypes and device. Draws, in this order: affine parameters, elastic noise
    (when ``elastic_alpha > 0``), gammas.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    if masks is not None and (masks.dim() != 4 or masks.shape[0] != images.shape[0]
                              or masks.shape[-2:] != images.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    n, _, h, w = images.shape
    if n == 0:
        return images, masks
    grid = random_grids(n, h, w, config, generator, images.device)
    images, masks = warp(images, masks, grid, config.image_pad, config.mask_threshold)
    images = random_gamma(images, config.gamma, generator)
    return images, masks


__all__ = [
    "AugmentConfig", "affine_matrices", "augment", "elastic_displacements", "gaussian_blur",
    "random_gamma", "random_intensity", "random_remap", "random_grids", "resample", "sampling_grid", "warp",
]
