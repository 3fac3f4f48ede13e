"""Mask latents decode through TAESD's windowed path exactly as through the whole decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfsmis.models.mask_decoding import WindowedMaskDecoder, receptive_radius
from sdfsmis.models.vae import FrozenVAE, load_taesd, tiny_autoencoder_kl


@pytest.fixture(scope="module")
def taesd() -> FrozenVAE:
    return load_taesd()


def _disc(size: int, cy: int, cx: int, r: int) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size]
    return torch.from_numpy(((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32))


def _masks(size: int = 128) -> torch.Tensor:
    """Small organ, two far-apart blobs, an organ on the image edge, an empty mask: [4, 1, size, size]."""
    two = (_disc(size, 30, 30, 8) + _disc(size, 95, 100, 6)).clamp(max=1)
    return torch.stack([_disc(size, 60, 70, 10), two, _disc(size, 64, 2, 12), torch.zeros(size, size)])[:, None]


def test_receptive_radius_of_the_taesd_stages(taesd):
    layers = list(taesd.model.decoder.layers)
    last_up = max(i for i, m in enumerate(layers) if isinstance(m, torch.nn.Upsample))
    # upsample x2, conv, block of 3 convs, output conv: 5 pixels at full resolution -> 3 before it
    assert receptive_radius(layers[last_up:]) == 3
    assert receptive_radius([torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)]) is None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_windowed_decode_matches_the_whole_decoder(taesd, precision):
    torch.manual_seed(0)
    z = taesd.encode_masks(_masks()) + 0.05 * torch.randn(4, 4, 16, 16)
    decoder = taesd._mask_decoder
    assert isinstance(decoder, WindowedMaskDecoder)
    windows = decoder.windows
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        full = taesd.decode_gray(z).float()
        fast = taesd.decode_masks(z).float()
    assert decoder.windows > windows  # the windowed path ran
    assert fast.shape == full.shape == (4, 1, 128, 128)
    np.testing.assert_array_equal(fast.numpy() > -0.75, full.numpy() > -0.75)  # same masks at p > 0.125
    assert float((fast - full).abs().max()) < 0.06  # background: the decoded empty mask, within p 0.03
    hit = full > -0.9  # where the mask is, the windowed values are the decoder's own
    assert float((fast - full).abs()[hit].max()) < (1e-4 if precision == "fp32" else 0.02)


def test_a_mask_filling_the_slice_is_decoded_whole(taesd):
    big = torch.ones(1, 1, 128, 128)
    big[..., :4, :] = 0
    z = taesd.encode_masks(big)
    whole = taesd._mask_decoder.whole
    with torch.inference_mode():
        np.testing.assert_allclose(taesd.decode_masks(z).numpy(), taesd.decode_gray(z).numpy(), atol=1e-6)
    assert taesd._mask_decoder.whole == whole + 1


def test_other_autoencoders_decode_masks_whole():
    vae = tiny_autoencoder_kl()
    z = torch.randn(2, 4, 4, 4)
    np.testing.assert_allclose(vae.decode_masks(z).numpy(), vae.decode_gray(z).numpy(), atol=1e-6)
