"""SDSeg (Lin et al., MICCAI 2024): supervised latent-diffusion segmentation with a one-step reverse.

- trainable vision encoder ``tau``: a copy of the VAE encoder (TAESD: its encoder; AutoencoderKL:
  encoder + quant conv -> posterior mean, scaled like the VAE latents) followed by a 1x1 conv
  (initialised to the identity) -> ``z_c`` [B, 4, h, w];
- UNet input ``concat(z_t, z_c)`` (8 channels): ``conv_in`` widened with the pretrained weights on the
  ``z_t`` channels and zeros on the ``z_c`` channels (SDSeg initialises the added weights to zero);
- epsilon-prediction with ``t ~ U{0, .., 999}`` on SD's ``scaled_linear`` DDPM schedule (diffusers
  ``DDPMScheduler.add_noise``); loss ``L1(eps_hat, eps) + lambda * L1(z0_hat, z0)`` with
  ``z0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``;
- inference: one UNet call from pure Gaussian noise at t = 999, ``z0_hat``, decode, channel average,
  threshold 0.5 (absolute 0 in [-1, 1]). The noise is drawn per image from ``generator`` when one is
  given, else it is one noise map seeded by ``config.noise_seed`` shared by all images, so the
  default prediction is deterministic and independent of batching;
- the cross-attention condition is the null embedding (SDSeg conditions by concatenation only);
- ``stability``: repeated inference with different noise; pairwise PSNR / SSIM / MS-SSIM (MONAI)
  between runs on probability maps ("score") and thresholded masks ("seg"). LPIPS needs pretrained
  networks that cannot be downloaded here and is reported as ``None``.

Not few-shot: ``forward(query_images, support_images=None, support_masks=None)`` ignores supports; the
fast-path methods exist for a uniform predictor interface.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor, nn

from sdfsmis.models.backbones import Backbone, build_backbone
from sdfsmis.models.base import LatentSegmenter, SupportCache
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.registry import register
from sdfsmis.models.vae import FrozenVAE

__all__ = ["ConditionEncoder", "SDSeg"]

PSNR_CAP_DB = 100.0  # PSNR reported for identical maps (MSE 0)


class ConditionEncoder(nn.Module):
    """Trainable copy of the VAE encoder + 1x1 conv: [B, 1, H, W] in [-1, 1] -> z_c [B, 4, H/8, W/8]."""

    def __init__(self, vae: FrozenVAE):
        super().__init__()
        self.kind = vae.kind
        c = vae.latent_channels
        if vae.kind == "taesd":
            self.encoder = copy.deepcopy(vae.model.encoder.layers)
            self.quant_conv = None
        else:
            self.encoder = copy.deepcopy(vae.model.encoder)
            qc = vae.model.quant_conv
            self.quant_conv = copy.deepcopy(qc) if qc is not None else None
        self.latent_channels = c
        self.scaling_factor = vae.scaling_factor
        self.shift_factor = vae.shift_factor
        self.proj = nn.Conv2d(c, c, kernel_size=1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            self.proj.bias.zero_()
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, images: Tensor) -> Tensor:
        x = images.expand(-1, 3, -1, -1).to(self.proj.weight.dtype)
        if self.kind == "taesd":
            z = self.encoder(x.add(1).div(2))
        else:
            h = self.encoder(x)
            if self.quant_conv is not None:
                h = self.quant_conv(h)
            z = (h[:, : self.latent_channels] - self.shift_factor) * self.scaling_factor
        return self.proj(z)


def _widen_zero(conv: nn.Conv2d, extra: int) -> nn.Conv2d:
    """``conv`` with ``extra`` more input channels whose weights are zero (bias and the rest copied)."""
    new = nn.Conv2d(conv.in_channels + extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


@register("sdseg")
class SDSeg(LatentSegmenter):
    """SDSeg. ``forward(query_images [B,1,H,W], ..., generator=None) -> probability [B,1,H,W]``."""

    new_prefixes = ("unet.conv_in.", "condition_encoder.proj.", "null_embedding")

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None):
        if config.method != "sdseg":
            raise ValueError(f"SDSeg needs method='sdseg', got {config.method!r}")
        super().__init__(config, backbone if backbone is not None else build_backbone(config.backbone))
        self.condition_encoder = ConditionEncoder(self.vae)
        self.unet.conv_in = _widen_zero(self.unet.conv_in, self.latent_channels)
        self.scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                                       beta_end=config.beta_end, beta_schedule=config.beta_schedule)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)

    # -- diffusion helpers -----------------------------------------------------------------------
    def _abar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t].view(-1, 1, 1, 1)

    def latent_estimate(self, z_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """z0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); t [B] or scalar."""
        a = self._abar(t.reshape(-1))
        return (z_t - (1 - a).sqrt() * eps) / a.sqrt()

    def denoise(self, z_t: Tensor, z_c: Tensor, t: Tensor) -> Tensor:
        """epsilon-prediction of the UNet for input concat(z_t, z_c) at timestep(s) t."""
        cond = self.null_condition(z_t.shape[0])
        return self.unet(torch.cat([z_t, z_c], dim=1), t, encoder_hidden_states=cond).sample

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator(device=self.device).manual_seed(self.config.noise_seed)

    # -- public API ------------------------------------------------------------------------------
    def initial_noise(self, shape: torch.Size, generator: torch.Generator | None = None) -> Tensor:
        """z_T of shape [B, 4, h, w]: drawn per image from ``generator``; without one, a single noise
        map seeded by ``config.noise_seed`` shared by every image, so that a prediction does not
        depend on which batch the image is in."""
        if generator is not None:
            return torch.randn(shape, generator=generator, device=generator.device).to(self.device)
        one = torch.randn((1, *shape[1:]), generator=self._generator(None), device=self.device)
        return one.expand(shape)

    def predict_latents(self, query_images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images [B, 1, H, W] -> z0_hat [B, 4, h, w]: one UNet call from pure noise at t = 999."""
        z_c = self.condition_encoder(query_images.float())
        noise = self.initial_noise(z_c.shape, generator).to(z_c.dtype)
        t = torch.full((z_c.shape[0],), self.config.timestep, device=z_c.device, dtype=torch.long)
        return self.latent_estimate(noise, self.denoise(noise, z_c, t), t)

    def forward(self, query_images: Tensor, support_images: Tensor | None = None, support_masks: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Query images [B, 1, H, W] -> probability [B, 1, H, W]; supports are ignored."""
        if query_images.ndim != 4 or query_images.shape[1] != 1:
            raise ValueError(f"query_images must be [B, 1, H, W], got {tuple(query_images.shape)}")
        return self.probabilities(self.predict_latents(query_images, generator))

    def training_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """L1(eps_hat, eps) + lambda L1(z0_hat, z0) with t ~ U{0..T-1}; ``batch`` needs ``query_images``
        and ``query_masks`` (or cached ``query_mask_latents``); supports are ignored."""
        images = batch["query_images"].float()
        z0 = batch.get("query_mask_latents")
        z0 = self.encode_masks(batch["query_masks"]) if z0 is None else z0.float()
        z_c = self.condition_encoder(images)
        b = z0.shape[0]
        gdev = generator.device if generator is not None else z0.device
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=gdev).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=gdev).to(z0)
        z_t = self.scheduler.add_noise(z0, noise, t)
        eps = self.denoise(z_t, z_c, t)
        z0_hat = self.latent_estimate(z_t, eps, t)
        latent_loss = F.l1_loss(z0_hat.float(), z0.float())
        return F.l1_loss(eps.float(), noise.float()) + self.config.latent_loss_weight * latent_loss

    @torch.no_grad()
    def prepare_support(self, support_images: Tensor, support_masks: Tensor) -> SupportCache:
        """Supports are not used by SDSeg; returns an empty cache for a uniform interface."""
        return SupportCache(shots=int(support_images.shape[0]), cond=self.null_condition(1))

    @torch.no_grad()
    def predict_with_support(self, query_images: Tensor, cache: SupportCache | None = None,
                             generator: torch.Generator | None = None) -> Tensor:
        """Queries [N, 1, H, W] -> probabilities [N, 1, H, W] (the cache is ignored)."""
        return self(query_images, generator=generator)

    @torch.no_grad()
    def stability(self, images: Tensor, n_runs: int = 5, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Instance-level stability (SDSeg Table 5): ``n_runs`` inferences of ``images`` [N, 1, H, W]
        with different noise; mean over image pairs of runs of PSNR (dB, capped at 100 for identical
        maps), SSIM and MS-SSIM (NaN when the images are too small for 5 scales) on probabilities
        ("score") and on thresholded masks ("seg"). LPIPS is ``None`` (no pretrained network here)."""
        if n_runs < 2:
            raise ValueError("stability needs n_runs >= 2")
        gen = self._generator(generator)
        probs = [self(images, generator=gen) for _ in range(n_runs)]
        result: dict[str, Any] = {"n_runs": n_runs, "n_images": int(images.shape[0]), "lpips": None}
        for kind, maps in (("score", probs), ("seg", [self.threshold(p) for p in probs])):
            result[kind] = pairwise_similarity(maps)
        return result


def pairwise_similarity(maps: list[Tensor]) -> dict[str, float]:
    """Mean PSNR / SSIM / MS-SSIM over all pairs of runs and all images: ``maps`` holds one
    ``[N, 1, H, W]`` tensor per run, values in [0, 1]."""
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric  # slow import, used here only

    psnr, ssim, msssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0), \
        MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0)
    values: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "ms_ssim": []}
    size = min(maps[0].shape[-2:])
    ms_ok = size > (11 - 1) * 2 ** 4
    for a, b in itertools.combinations(maps, 2):
        a, b = a.float().cpu(), b.float().cpu()
        values["psnr"].append(torch.nan_to_num(psnr(a, b).flatten(), posinf=PSNR_CAP_DB))
        values["ssim"].append(ssim(a, b).flatten())
        if ms_ok:
            values["ms_ssim"].append(msssim(a, b).flatten())
    return {k: (float(torch.cat(v).mean()) if v else math.nan) for k, v in values.items()}
