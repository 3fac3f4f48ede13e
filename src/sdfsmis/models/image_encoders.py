"""Frozen image encoders for the Visual-to-Textual Condition Translator (VTCT), one interface.

Every encoder has ``.dim`` (feature channels) and
``features(images [B, 1, H, W] in [-1, 1]) -> [B, dim, h, w]`` (a spatial feature map).

- ``Dinov2Encoder``: DINOv2 via ``transformers`` (patch tokens reshaped to a grid; the grey image is
  replicated to 3 channels, mapped to [0, 1], resized to ``image_size`` and ImageNet-normalised).
- ``VAEFeatureEncoder``: the frozen VAE encoder's last feature map before its final conv, at 1/8
  resolution (TAESD: 64 channels; AutoencoderKL: ``block_out_channels[-1]``). The ``compact`` tier's
  default (the ``sd`` tier defaults to DINOv2-small, as the paper).
- ``tiny_dinov2`` / ``save_tiny_dinov2`` (in ``backbones``): a tiny random DINOv2 for tests.

``masked_average`` pools a feature map under a binary mask; VTCT and the QE prototype use it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

from sdfsmis.errors import InputError
from sdfsmis.models.vae import FrozenVAE, freeze

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _gray_to_rgb(images: Tensor) -> Tensor:
    """[B, 1, H, W] or [B, H, W] -> [B, 3, H, W] (channel replicated)."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1, H, W], got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class ImageEncoder(nn.Module):
    """Base class: a frozen encoder with ``dim`` and ``features``; stays in eval mode."""

    dim: int
    name: str = "image-encoder"

    def train(self, mode: bool = True) -> ImageEncoder:  # noqa: D102
        super().train(False)
        return self

    def features(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        """[B, 1, H, W] in [-1, 1] -> [B, dim, h, w]."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


class Dinov2Encoder(ImageEncoder):
    """DINOv2 (``Dinov2Model`` or ``Dinov2WithRegistersModel``) patch features.

    Images are resized to ``image_size`` (a multiple of the patch size) so the grid is
    ``image_size / patch_size`` on each side (16x16 for 224 and patch 14).
    """

    name = "dinov2"

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        if image_size is None:
            image_size = min(224, int(cfg.image_size))
        image_size = max(self.patch_size, image_size // self.patch_size * self.patch_size)
        self.image_size = image_size
        self.dim = int(cfg.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.model = freeze(model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """[B, 1, H, W] in [-1, 1] -> [B, hidden, S/p, S/p] with S = ``image_size``."""
        x = _gray_to_rgb(images).float().add(1).div(2)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        tokens = self.model(pixel_values=x.to(dtype)).last_hidden_state[:, self.num_prefix_tokens:]
        g = self.image_size // self.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], self.dim, g, g).float()


class VAEFeatureEncoder(ImageEncoder):
    """The frozen VAE encoder's feature map before its final conv, at 1/8 resolution.

    Holds its own (frozen) copy of the encoder trunk, so it shares no tensors with the VAE.
    TAESD: ``encoder.layers[:-1]`` on the [0, 1] image -> 64 channels. AutoencoderKL: ``conv_in``,
    down blocks, mid block, norm and activation -> ``block_out_channels[-1]`` channels.
    """

    name = "vae-features"

    def __init__(self, vae: FrozenVAE):
        super().__init__()
        self.kind = vae.kind
        if vae.kind == "taesd":
            trunk = copy.deepcopy(vae.model.encoder.layers[:-1])
            self.dim = int(vae.model.encoder.layers[-1].in_channels)
        else:
            assert isinstance(vae.model, AutoencoderKL)
            enc = vae.model.encoder
            trunk = nn.Sequential(copy.deepcopy(enc.conv_in), *copy.deepcopy(enc.down_blocks),
                                  copy.deepcopy(enc.mid_block), copy.deepcopy(enc.conv_norm_out),
                                  copy.deepcopy(enc.conv_act))
            self.dim = int(enc.conv_out.in_channels)
        self.trunk = freeze(trunk)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """[B, 1, H, W] in [-1, 1] -> [B, dim, H/8, W/8]."""
        x = _gray_to_rgb(images)
        x = x.to(next(self.trunk.parameters()).dtype)
        if self.kind == "taesd":
            x = x.add(1).div(2)
        return self.trunk(x.contiguous(memory_format=torch.channels_last)).float().contiguous()


def load_dinov2(path_or_id: str | Path, image_size: int | None = None) -> Dinov2Encoder:
    """A DINOv2 encoder from a transformers folder or hub id (``AutoModel.from_pretrained``)."""
    from transformers import AutoModel

    from sdfsmis.models.weights import check_local

    check_local(path_or_id, "image encoder folder")
    local = Path(path_or_id).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise InputError(local, "no config.json: not a transformers DINOv2 folder")
    try:
        model = AutoModel.from_pretrained(str(path_or_id))
    except (OSError, ValueError) as exc:
        hint = ""
        if not local.exists():
            hint = (" (a hub id that is neither in the Hugging Face cache nor downloadable here: pass a "
                    "local DINOv2 folder as model.backbone.image_encoder=DIR, or --image-encoder-path DIR "
                    "for a saved model; model.backbone.image_encoder=vae uses the VAE encoder's features)")
        reason = " ".join(str(exc).split())
        raise InputError(path_or_id, f"cannot load the DINOv2 image encoder: {reason}{hint}") from exc
    if not hasattr(model.config, "patch_size") or "dinov2" not in model.config.model_type:
        raise InputError(path_or_id, f"expected a DINOv2 model, got model_type={model.config.model_type!r}")
    return Dinov2Encoder(model.float(), image_size=image_size)


def tiny_dinov2_config():
    """A tiny random ``Dinov2Config`` (hidden 32, 2 layers, patch 8, 32x32 images)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, image_size=32, patch_size=8)


def tiny_dinov2_model(seed: int = 0) -> nn.Module:
    """The raw tiny random ``Dinov2Model`` (seeded, unfrozen)."""
    from transformers import Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(tiny_dinov2_config())


def tiny_dinov2(seed: int = 0) -> Dinov2Encoder:
    """A tiny random DINOv2 encoder for tests: 32x32 inputs -> [B, 32, 4, 4]."""
    return Dinov2Encoder(tiny_dinov2_model(seed))


def _resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Area-weighted resize of [N, 1, H, W] soft masks to ``size`` (values stay in [0, 1])."""
    h, w = masks.shape[-2:]
    if (h, w) == tuple(size):
        return masks
    if h % size[0] == 0 and w % size[1] == 0:
        return F.interpolate(masks, size=size, mode="area")
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def masked_average(features: Tensor, masks: Tensor, eps: float = 1e-6) -> Tensor:
    """Mask-weighted mean of a feature map.

    features: [..., C, h, w]; masks: [..., 1, H, W] or [..., H, W] with the same leading dims, values
    in [0, 1]. The mask is resized to (h, w) area-weighted (``area`` when the sizes divide, else
    antialiased bilinear). Returns [..., C]. An empty mask (total weight below ``eps``) gives a zero
    vector rather than NaN.
    """
    lead = features.shape[:-3]
    c, h, w = features.shape[-3:]
    if masks.ndim == features.ndim - 1:
        masks = masks.unsqueeze(-3)
    if masks.shape[:-3] != lead or masks.shape[-3] != 1:
        raise ValueError(f"masks {tuple(masks.shape)} do not match features {tuple(features.shape)}")
    f = features.reshape(-1, c, h, w)
    m = _resize_masks(masks.reshape(-1, 1, *masks.shape[-2:]).to(f.dtype), (h, w))
    total = m.sum(dim=(-2, -1))  # [N, 1]
    pooled = (f * m).sum(dim=(-2, -1)) / total.clamp_min(eps)
    pooled = torch.where(total > eps, pooled, torch.zeros_like(pooled))
    return pooled.reshape(*lead, c)
