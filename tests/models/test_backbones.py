"""The three backbone tiers (one code path) and widen_conv_in."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sdfsmis.errors import InputError
from sdfsmis.models.backbones import (
    Backbone,
    BackboneConfig,
    build_backbone,
    count_parameters,
    random_unet,
    save_tiny_dinov2,
    save_tiny_sd_checkpoint,
    unet_config,
    widen_conv_in,
)
from sdfsmis.models.image_encoders import Dinov2Encoder, VAEFeatureEncoder, masked_average


def _gray(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _run(bb: Backbone, n: int = 2) -> torch.Tensor:
    """Encode grey images, pool a VTCT-like condition, one UNet call at t = 999."""
    images = _gray(n, bb.image_size)
    z = bb.vae.encode_gray(images)
    assert z.shape == (n, 4, bb.latent_size, bb.latent_size)
    feats = bb.image_encoder.features(images)
    assert feats.shape[:2] == (n, bb.image_encoder.dim)
    pooled = masked_average(feats, (images > 0).float())
    cond = nn.functional.pad(pooled, (0, bb.cross_attention_dim - pooled.shape[-1]))[:, None] \
        if pooled.shape[-1] <= bb.cross_attention_dim else pooled[:, None, : bb.cross_attention_dim]
    out = bb.unet(z, torch.full((n,), 999), encoder_hidden_states=cond).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("tiny_vae", ["kl", "taesd"])
def test_tiny_tier(tiny_vae):
    bb = build_backbone(BackboneConfig(tier="tiny", tiny_vae=tiny_vae))
    assert bb.tier == "tiny" and bb.vae.kind == tiny_vae
    assert (bb.image_size, bb.latent_size, bb.cross_attention_dim) == (32, 4, 16)
    assert isinstance(bb.image_encoder, Dinov2Encoder)
    assert all(p.requires_grad for p in bb.unet.parameters()) and bb.unet.training
    assert not any(p.requires_grad for p in bb.vae.parameters())
    assert not any(p.requires_grad for p in bb.image_encoder.parameters())
    assert count_parameters(bb.unet) < 1_000_000
    out = _run(bb)
    # Seeded: the same config builds the same weights.
    torch.testing.assert_close(_run(build_backbone(BackboneConfig(tier="tiny", tiny_vae=tiny_vae))), out)


def test_sd_tier_loads_a_saved_checkpoint_through_from_pretrained(tmp_path):
    sd = save_tiny_sd_checkpoint(tmp_path / "sd", seed=7)
    dino = save_tiny_dinov2(tmp_path / "dino", seed=7)
    index = json.loads((sd / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (sd / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (sd / "vae" / "diffusion_pytorch_model.safetensors").is_file()

    bb = build_backbone(BackboneConfig(tier="sd", path=str(sd), image_encoder=str(dino), image_size=32))
    assert bb.tier == "sd" and bb.vae.kind == "kl" and bb.latent_size == 4 and bb.cross_attention_dim == 16
    assert isinstance(bb.image_encoder, Dinov2Encoder) and bb.image_encoder.dim == 32
    # The loaded weights are the saved ones.
    reference = random_unet(unet_config("tiny"), seed=7).state_dict()
    for key, value in bb.unet.state_dict().items():
        torch.testing.assert_close(value, reference[key])
    _run(bb)
    # image_encoder="vae": the VAE encoder's features, as the compact tier.
    vae_features = build_backbone(BackboneConfig(tier="sd", path=str(sd), image_encoder="vae", image_size=32))
    assert isinstance(vae_features.image_encoder, VAEFeatureEncoder)
    assert build_backbone(BackboneConfig(tier="sd", path=str(sd), image_encoder="vae")).latent_size == 32
    # Unset, it is the paper's DINOv2-small, a hub id: offline and uncached, an error naming the way out.
    with pytest.raises(InputError, match="facebook/dinov2-small.*model.backbone.image_encoder=DIR"):
        build_backbone(BackboneConfig(tier="sd", path=str(sd), image_size=32))


def test_sd_tier_bad_input(tmp_path):
    with pytest.raises(InputError, match="needs a diffusers folder"):
        build_backbone(BackboneConfig(tier="sd"))
    (tmp_path / "not-sd").mkdir()
    with pytest.raises(InputError, match="config.json"):
        build_backbone(BackboneConfig(tier="sd", path=str(tmp_path / "not-sd")))
    sd = save_tiny_sd_checkpoint(tmp_path / "sd")
    with pytest.raises(InputError, match="overrides"):
        build_backbone(BackboneConfig(tier="sd", path=str(sd), unet={"layers_per_block": 1}))
    with pytest.raises(InputError, match="unknown backbone tier"):
        build_backbone(BackboneConfig(tier="huge"))  # type: ignore[arg-type]


def test_compact_tier_builds_with_packaged_taesd():
    bb = build_backbone(BackboneConfig(tier="compact"))
    n_params = count_parameters(bb.unet)
    print(f"compact UNet parameters: {n_params:,}")
    assert 5_000_000 < n_params < 8_000_000
    assert bb.vae.kind == "taesd" and bb.latent_size == 32 and bb.cross_attention_dim == 256
    assert isinstance(bb.image_encoder, VAEFeatureEncoder) and bb.image_encoder.dim == 64
    # Attention only at the 16x16 and 8x8 levels.
    assert bb.unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    z = torch.zeros(1, 4, 32, 32)
    out = bb.unet(z, torch.tensor([999]), encoder_hidden_states=torch.zeros(1, 1, 256)).sample
    assert out.shape == z.shape


def test_unet_overrides_accept_json_lists():
    cfg = unet_config("tiny", {"block_out_channels": [8, 16], "cross_attention_dim": 8})
    assert cfg["block_out_channels"] == (8, 16)
    bb = build_backbone(BackboneConfig(tier="tiny", unet={"block_out_channels": [8, 16],
                                                          "cross_attention_dim": 8}))
    assert bb.cross_attention_dim == 8 and bb.unet.config.block_out_channels == (8, 16)


@pytest.mark.parametrize("factor,bias", [(2, True), (3, False)])
def test_widen_conv_in_keeps_the_response_to_a_repeated_input(factor, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, bias=bias)
    wide = widen_conv_in(conv, 4 * factor)
    assert wide.in_channels == 4 * factor and wide.out_channels == 6
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(wide(torch.cat([x] * factor, dim=1)), conv(x))
    torch.testing.assert_close(wide.weight[:, :4] * factor, conv.weight)
    assert wide.weight.requires_grad
    with pytest.raises(ValueError):
        widen_conv_in(conv, 6)


def test_widen_the_unet_conv_in():
    unet = random_unet(unet_config("tiny"), seed=0)
    old = unet.conv_in
    unet.conv_in = widen_conv_in(old, 8)
    z = torch.randn(1, 4, 4, 4)
    cond = torch.zeros(1, 1, 16)
    ref = nn.Conv2d.forward(old, z)
    torch.testing.assert_close(unet.conv_in(torch.cat([z, z], 1)), ref)
    assert unet(torch.cat([z, z], 1), torch.tensor([999]), encoder_hidden_states=cond).sample.shape == z.shape
