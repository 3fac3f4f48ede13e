"""Frozen VTCT image encoders and masked_average."""

from __future__ import annotations

import pytest
import torch

from sdfsmis.errors import InputError
from sdfsmis.models.backbones import save_tiny_dinov2
from sdfsmis.models.image_encoders import (
    Dinov2Encoder,
    VAEFeatureEncoder,
    load_dinov2,
    masked_average,
    tiny_dinov2,
)
from sdfsmis.models.vae import load_taesd, tiny_autoencoder_kl


def _gray(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_masked_average_known_values_and_area_weighting():
    feats = torch.zeros(1, 2, 4, 4)
    feats[0, 0, :, :2] = 1.0  # channel 0: 1 on the left half, 0 on the right
    feats[0, 1] = 5.0
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, :16] = 1.0
    torch.testing.assert_close(masked_average(feats, mask), torch.tensor([[1.0, 5.0]]))
    # A mask covering columns 12..19 half-covers feature columns 1 and 2 (8 px each):
    # equal weight on both -> channel 0 averages to 0.5.
    mask = torch.zeros(1, 32, 32)  # [B, H, W] is accepted too
    mask[:, :, 12:20] = 1.0
    torch.testing.assert_close(masked_average(feats, mask), torch.tensor([[0.5, 5.0]]))


def test_masked_average_empty_mask_and_leading_dims():
    feats = torch.randn(2, 3, 5, 8, 8, generator=torch.Generator().manual_seed(0))  # [B, K, C, h, w]
    masks = torch.zeros(2, 3, 1, 16, 16)
    masks[0, 1, :, 4:12, 4:12] = 1.0
    out = masked_average(feats, masks)
    assert out.shape == (2, 3, 5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], torch.zeros(3, 5))  # empty masks -> zeros, not NaN
    torch.testing.assert_close(out[0, 1], feats[0, 1, :, 2:6, 2:6].mean(dim=(-2, -1)))
    with pytest.raises(ValueError):
        masked_average(feats, torch.ones(2, 1, 16, 16))


def test_taesd_features_are_the_trunk_before_the_final_conv():
    vae = load_taesd()
    enc = VAEFeatureEncoder(vae)
    assert enc.dim == 64 and all(not p.requires_grad for p in enc.parameters())
    x = _gray(1, 32)
    f = enc.features(x)
    assert f.shape == (1, 64, 4, 4)
    # The VAE's final conv applied to these features gives exactly the latents.
    torch.testing.assert_close(vae.model.encoder.layers[-1](f), vae.encode_gray(x), atol=1e-5, rtol=1e-5)
    # Its own copy: no tensor shared with the VAE.
    vae_ptrs = {p.data_ptr() for p in vae.parameters()}
    assert not vae_ptrs & {p.data_ptr() for p in enc.parameters()}


def test_kl_features_feed_the_posterior():
    vae = tiny_autoencoder_kl(seed=0)
    enc = VAEFeatureEncoder(vae)
    x = _gray(2, 32)
    f = enc.features(x)
    assert f.shape == (2, enc.dim, 4, 4) and enc.dim == 16
    moments = vae.model.quant_conv(vae.model.encoder.conv_out(f))
    torch.testing.assert_close(moments.chunk(2, dim=1)[0] * vae.scaling_factor, vae.encode_gray(x),
                               atol=1e-5, rtol=1e-5)


def test_tiny_dinov2_grid_and_resize():
    enc = tiny_dinov2(seed=0)
    assert isinstance(enc, Dinov2Encoder) and enc.dim == 32 and enc.image_size == 32
    assert all(not p.requires_grad for p in enc.parameters())
    f = enc.features(_gray(2, 32))
    assert f.shape == (2, 32, 4, 4) and torch.isfinite(f).all()
    # Other input sizes are resized to the configured size: same grid.
    assert enc.features(_gray(1, 64)).shape == (1, 32, 4, 4)
    # Different images give different features.
    assert not torch.allclose(f[0], f[1])


def test_dinov2_from_a_transformers_folder(tmp_path):
    folder = save_tiny_dinov2(tmp_path / "dino", seed=5)
    assert (folder / "config.json").is_file()
    loaded = load_dinov2(folder)
    x = _gray(1, 32)
    torch.testing.assert_close(loaded.features(x), tiny_dinov2(seed=5).features(x))
    assert load_dinov2(folder, image_size=48).features(x).shape == (1, 32, 6, 6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_dinov2(tmp_path / "empty")
