"""The three backbone tiers through one code path.

A backbone is a (trainable) diffusers ``UNet2DConditionModel``, a frozen VAE (``FrozenVAE``) and a
frozen image encoder for VTCT (``ImageEncoder``):

- ``sd``: Stable Diffusion 1.x/2.x from a diffusers folder or hub id (``unet/`` and ``vae/``
  subfolders, ``from_pretrained``) + the paper's VTCT encoder, DINOv2-small (``facebook/dinov2-small``,
  a hub id that resolves from the Hugging Face cache; or a transformers folder given as
  ``image_encoder``).
- ``compact``: the packaged TAESD + a small SD-layout UNet built from ``COMPACT_UNET`` (trained from
  scratch by the project) + TAESD-encoder features, the compact tier's own choice: a 128-256 px CPU
  model with no second network to load (or DINOv2 when ``image_encoder`` is given).
- ``tiny``: random tiny UNet, tiny random AutoencoderKL (or AutoencoderTiny) and a tiny random DINOv2;
  seconds on a CPU, for tests.

``build_backbone(BackboneConfig(...)) -> Backbone``. Models work at ``image_size`` (256 for ``sd`` and
``compact``, 32 for ``tiny``) and latents of ``latent_size = image_size / 8``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from sdfsmis import atomic
from sdfsmis.errors import InputError
from sdfsmis.models.image_encoders import (
    Dinov2Encoder,
    ImageEncoder,
    VAEFeatureEncoder,
    load_dinov2,
    tiny_dinov2,
    tiny_dinov2_model,
)
from sdfsmis.models.vae import (
    FrozenVAE,
    load_autoencoder_kl,
    load_taesd,
    tiny_autoencoder_kl,
    tiny_autoencoder_kl_model,
    tiny_autoencoder_tiny,
)
from sdfsmis.models.weights import diffusers_from_pretrained

Tier = Literal["sd", "compact", "tiny"]
TIERS: tuple[str, ...] = ("sd", "compact", "tiny")

#: The compact UNet: SD block layout, attention only at 16x16 and 8x8 (for a 32x32 latent).
#: 6.5 M parameters with channels (32, 64, 128); (64, 128, 256) gives 24.8 M and costs about twice
#: the CPU time per step, so the narrower one is the CPU default (override via ``unet``).
#: 8 norm groups keep 4-16 channels per group at these widths.
COMPACT_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=256,
    attention_head_dim=8,
    norm_num_groups=8,
)

#: The tiny test UNet: two levels, attention at the lower one and in the mid block.
TINY_UNET: dict[str, Any] = dict(
    sample_size=4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)

DEFAULT_IMAGE_SIZE = {"sd": 256, "compact": 256, "tiny": 32}
#: DINOv2-small, the image encoder of the SD-FSMIS paper's VTCT (384-d patch features).
DINOV2_SMALL = "facebook/dinov2-small"
#: The VTCT image encoder of each tier when ``BackboneConfig.image_encoder`` is ``None``.
DEFAULT_IMAGE_ENCODER = {"sd": DINOV2_SMALL, "compact": "vae", "tiny": "tiny-dinov2"}


@dataclass
class BackboneConfig:
    """What to build.

    tier: ``sd`` | ``compact`` | ``tiny``.
    path: ``sd``: diffusers folder or hub id (required); ``compact``: a TAESD folder (default: the
        packaged weights); ``tiny``: unused.
    image_encoder: a DINOv2 transformers folder or hub id, ``"vae"`` (the frozen VAE encoder's
        features) or ``"tiny-dinov2"``; ``None`` picks the tier's default (``sd``: DINOv2-small as in
        the paper, ``compact``: ``"vae"``, ``tiny``: ``"tiny-dinov2"``); a saved model's
        ``config.json`` records the encoder it was built with (``models.io.portable_config``).
    image_encoder_size: input size for DINOv2 (default 224, or the config's size if smaller).
    unet: overrides of the ``compact`` / ``tiny`` UNet config (not allowed for ``sd``).
    image_size: working image size (default 256; ``tiny``: 32); the latent is ``image_size / 8``.
    tiny_vae: ``kl`` (tiny AutoencoderKL) or ``taesd`` (tiny AutoencoderTiny) for the tiny tier.
    seed: seeds the random initialisation of the ``compact`` / ``tiny`` modules.
    single_file_config: where ``path`` is a single-file SD checkpoint, a diffusers folder of the same
        architecture (its ``unet/`` and ``vae/`` ``config.json``); ``None``: the packaged SD-1.5 /
        SD-2.1 configs, picked from the checkpoint's keys (``sdfsmis.models.single_file``).
    """

    tier: Tier = "compact"
    path: str | None = None
    image_encoder: str | None = None
    image_encoder_size: int | None = None
    unet: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    tiny_vae: Literal["kl", "taesd"] = "kl"
    seed: int = 0
    single_file_config: str | None = None


@dataclass
class Backbone:
    """A built backbone. ``unet`` trains; ``vae`` and ``image_encoder`` are frozen."""

    unet: UNet2DConditionModel
    vae: FrozenVAE
    image_encoder: ImageEncoder
    cross_attention_dim: int
    latent_size: int
    tier: str = "compact"
    config: BackboneConfig | None = None

    @property
    def image_size(self) -> int:
        """The working image size (``latent_size`` times the VAE downsampling)."""
        return self.latent_size * self.vae.downsample

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    def to(self, *args: Any, **kwargs: Any) -> Backbone:
        """Move all three modules (``Module.to`` arguments); returns ``self``."""
        for m in (self.unet, self.vae, self.image_encoder):
            m.to(*args, **kwargs)
        return self


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def unet_config(tier: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved UNet config of the ``compact`` or ``tiny`` tier with ``overrides`` applied."""
    base = {"compact": COMPACT_UNET, "tiny": TINY_UNET}.get(tier)
    if base is None:
        raise ValueError(f"no built-in UNet config for tier {tier!r}")
    cfg = dict(base)
    for key, value in (overrides or {}).items():
        cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def random_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised ``UNet2DConditionModel`` from ``config`` (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config)


def _resolve_tier(cfg: BackboneConfig) -> str:
    if cfg.tier not in TIERS:
        raise InputError(None, f"unknown backbone tier {cfg.tier!r}; choose one of {', '.join(TIERS)}")
    return cfg.tier


def _build_unet(cfg: BackboneConfig, tier: str, weights: bool = True) -> UNet2DConditionModel:
    if tier == "sd":
        if cfg.unet:
            raise InputError(cfg.path, "UNet overrides apply to the compact and tiny tiers only")
        local = Path(cfg.path).expanduser()
        if local.is_dir() and not (local / "unet" / "config.json").is_file():
            raise InputError(local / "unet", "no config.json: not a diffusers Stable Diffusion folder")
        return diffusers_from_pretrained(UNet2DConditionModel, cfg.path, "unet", "UNet", weights=weights,
                                         single_file_config=cfg.single_file_config)
    return random_unet(unet_config(tier, cfg.unet), seed=cfg.seed)


def _build_vae(cfg: BackboneConfig, tier: str) -> FrozenVAE:
    if tier == "sd":
        return load_autoencoder_kl(cfg.path, subfolder="vae", single_file_config=cfg.single_file_config)
    if tier == "compact":
        return load_taesd(cfg.path)
    return tiny_autoencoder_kl(cfg.seed) if cfg.tiny_vae == "kl" else tiny_autoencoder_tiny(cfg.seed)


def _build_image_encoder(cfg: BackboneConfig, tier: str, vae: FrozenVAE) -> ImageEncoder:
    choice = cfg.image_encoder or DEFAULT_IMAGE_ENCODER[tier]
    if choice == "vae":
        return VAEFeatureEncoder(vae)
    if choice == "tiny-dinov2":
        enc = tiny_dinov2(cfg.seed)
        if cfg.image_encoder_size:
            enc = type(enc)(enc.model, image_size=cfg.image_encoder_size)
        return enc
    return load_dinov2(choice, image_size=cfg.image_encoder_size)


def build_backbone(cfg: BackboneConfig, unet_weights: bool = True) -> Backbone:
    """Build the UNet, the frozen VAE and the frozen image encoder of ``cfg.tier``.

    The UNet comes in train mode with float32 weights; the VAE and image encoder are frozen and in
    eval mode. ``cfg.image_encoder=None`` means the tier's default (``DEFAULT_IMAGE_ENCODER``).
    ``unet_weights=False`` reads only the ``sd`` UNet's ``config.json`` (a saved model
    holds its own trained UNet, so only the frozen parts come from the SD folder). Raises
    ``InputError`` for an unknown tier, a missing or malformed checkpoint folder.
    """
    tier = _resolve_tier(cfg)
    if tier == "sd" and not cfg.path:
        raise InputError(None, "the sd tier needs a diffusers folder, single-file checkpoint or hub id "
                               "(model.backbone.path=PATH_OR_ID)")
    unet = _build_unet(cfg, tier, weights=unet_weights)
    vae = _build_vae(cfg, tier)
    image_encoder = _build_image_encoder(cfg, tier, vae)
    if int(unet.config.in_channels) != vae.latent_channels:
        raise InputError(cfg.path, f"UNet in_channels={unet.config.in_channels} does not match the "
                                   f"VAE's {vae.latent_channels} latent channels")
    image_size = cfg.image_size or DEFAULT_IMAGE_SIZE[tier]
    if image_size % vae.downsample:
        raise InputError(None, f"image_size {image_size} is not a multiple of {vae.downsample}")
    cross = unet.config.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    unet.train()
    return Backbone(unet=unet, vae=vae, image_encoder=image_encoder, cross_attention_dim=int(cross),
                    latent_size=image_size // vae.downsample, tier=tier, config=cfg)


def random_sd_backbone(device: str | torch.device = "cpu", seed: int = 0) -> Backbone:
    """An ``sd``-tier backbone with the shapes of Stable Diffusion 1.5 and random weights: the
    860 M-parameter UNet (256 px, latent 32), its AutoencoderKL and a DINOv2-small image encoder.
    For speed and memory measurements without the weights (``benchmarks/speed.py``)."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768)  # the SD 1.5 layout
        kl = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=256, scaling_factor=0.18215)
        dino = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                        intermediate_size=1536, patch_size=14, image_size=518))
    return Backbone(unet=unet, vae=FrozenVAE(kl), image_encoder=Dinov2Encoder(dino), cross_attention_dim=768,
                    latent_size=32, tier="sd", config=BackboneConfig(tier="sd", path="random"))


def widen_conv_in(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs (a multiple of ``conv.in_channels``).

    The weights are tiled ``r = in_channels / conv.in_channels`` times along the input channels and
    divided by ``r``, so the widened conv applied to ``concat([x] * r)`` equals ``conv(x)``
    (Marigold / DiffewS initialisation). The bias is copied unchanged.
    """
    if conv.groups != 1:
        raise ValueError("widen_conv_in supports groups=1 only")
    if in_channels % conv.in_channels:
        raise ValueError(f"in_channels {in_channels} is not a multiple of {conv.in_channels}")
    r = in_channels // conv.in_channels
    new = nn.Conv2d(in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight.repeat(1, r, 1, 1) / r)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(conv.bias.requires_grad)
    return new


#: SD-2.x UNets use linear projections in their transformer blocks and per-level head counts.
_SD21_UNET = dict(use_linear_projection=True, attention_head_dim=(2, 4))


def _save_tiny_text_parts(out: Path, layout: str, seed: int) -> None:
    """Tiny random ``text_encoder/`` (CLIP), ``tokenizer/`` (CLIP BPE) and ``scheduler/`` of a
    Stable Diffusion folder: unused by the project, present as in every real SD folder."""
    from diffusers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=1000, max_position_embeddings=77,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                            hidden_act="gelu" if layout == "sd21" else "quick_gelu"))
    text.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    words = ["<|startoftext|>", "<|endoftext|>", "a</w>", "scan</w>", "liver</w>", "!"]
    vocab_dir = out / "tokenizer"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    (vocab_dir / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                  pad_token="!" if layout == "sd21" else "<|endoftext|>").save_pretrained(str(vocab_dir))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if layout == "sd21":
        DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, **common).save_pretrained(str(out / "scheduler"))
    else:
        PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **common).save_pretrained(str(out / "scheduler"))


def tiny_sd_modules(seed: int = 0, layout: Literal["sd15", "sd21"] = "sd15") -> tuple[UNet2DConditionModel, Any]:
    """The tiny random UNet and AutoencoderKL of ``save_tiny_sd_checkpoint`` (seeded)."""
    unet = random_unet(unet_config("tiny", _SD21_UNET if layout == "sd21" else None), seed=seed)
    return unet, tiny_autoencoder_kl_model(seed)


def save_tiny_sd_checkpoint(directory: str | Path, seed: int = 0, layout: Literal["sd15", "sd21"] = "sd15",
                            full: bool = False, variant: str | None = None) -> Path:
    """Write a tiny random Stable-Diffusion-format diffusers folder (``unet/``, ``vae/``,
    ``model_index.json``) that the ``sd`` tier loads with ``from_pretrained``. Returns the folder.

    ``layout="sd21"`` gives the SD-2.x UNet layout (linear projections, per-level head counts,
    v-prediction scheduler); ``full=True`` adds ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/`` as in a downloaded SD folder; ``variant="fp16"`` stores only fp16 variant
    weight files (``diffusion_pytorch_model.fp16.safetensors``)."""
    import diffusers

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    unet, vae = tiny_sd_modules(seed, layout)
    if variant == "fp16":
        unet, vae = unet.half(), vae.half()
    unet.save_pretrained(out / "unet", safe_serialization=True, variant=variant)
    vae.save_pretrained(out / "vae", safe_serialization=True, variant=variant)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if full:
        _save_tiny_text_parts(out, layout, seed)
        scheduler = "DDIMScheduler" if layout == "sd21" else "PNDMScheduler"
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                     scheduler=["diffusers", scheduler], safety_checker=[None, None],
                     feature_extractor=[None, None], requires_safety_checker=False)
    atomic.write_json(out / "model_index.json", index)
    return out


def save_tiny_dinov2(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random DINOv2 transformers folder (``config.json`` + safetensors)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tiny_dinov2_model(seed).save_pretrained(str(out), safe_serialization=True)
    return out
