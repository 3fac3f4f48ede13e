"""Frozen VAE wrappers: TAESD (packaged weights, real slice round trip) and AutoencoderKL scaling."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdfsmis.errors import InputError
from sdfsmis.models.vae import (
    TAESD_ASSETS,
    FrozenVAE,
    load_autoencoder_kl,
    load_taesd,
    tiny_autoencoder_kl,
    tiny_autoencoder_kl_model,
    tiny_autoencoder_tiny,
)

DATA = Path(os.environ.get("SDFSMIS_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def taesd() -> FrozenVAE:
    return load_taesd()


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_packaged_taesd_is_frozen_float32_and_licensed(taesd):
    assert taesd.kind == "taesd" and taesd.latent_channels == 4 and taesd.downsample == 8
    params = list(taesd.parameters())
    assert sum(p.numel() for p in params) > 2_000_000
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in params)
    taesd.train()
    assert not taesd.training and not taesd.model.training
    licence = (TAESD_ASSETS / "LICENSE").read_text()
    assert "MIT License" in licence and "Ollin Boer Bohan" in licence


def test_taesd_wrapper_matches_diffusers_semantics(taesd):
    x = _images()
    z = taesd.encode(x)
    assert z.shape == (2, 4, 4, 4)
    # AutoencoderTiny.encode takes [-1, 1] and returns raw (already SD-scaled) latents.
    torch.testing.assert_close(z, taesd.model.encode(x).latents)
    # AutoencoderTiny.decode returns [-1, 1] images (unclamped); the wrapper clamps.
    out = taesd.decode(z)
    torch.testing.assert_close(out, taesd.model.decode(z).sample.clamp(-1, 1))
    assert out.min() >= -1 and out.max() <= 1


def test_taesd_gray_helpers(taesd):
    g = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = taesd.encode_gray(g)
    torch.testing.assert_close(z, taesd.encode(g.expand(-1, 3, -1, -1)))
    d = taesd.decode_gray(z)
    assert d.shape == (2, 1, 16, 16)
    torch.testing.assert_close(d, taesd.decode(z).mean(1, keepdim=True))
    m = (g > 0).float()
    torch.testing.assert_close(taesd.encode_masks(m), taesd.encode_gray(m * 2 - 1))


def _normalise(volume: np.ndarray) -> np.ndarray:
    """Protocol normalisation: z-score, clip to the 0.5/99.5 percentiles, map to [-1, 1]."""
    z = (volume - volume.mean()) / volume.std()
    lo, hi = np.percentile(z, [0.5, 99.5])
    return np.clip((z - lo) / (hi - lo), 0, 1) * 2 - 1


def test_taesd_round_trip_on_a_real_mri_slice(taesd):
    nib = pytest.importorskip("nibabel")
    image_file, label_file = DATA / "abd-mri" / "image_1.nii.gz", DATA / "abd-mri" / "label_1.nii.gz"
    if not image_file.is_file() or not label_file.is_file():
        pytest.skip(f"real data not found under {DATA}")
    volume = np.asarray(nib.load(image_file).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(label_file).dataobj)
    # The slice with the most organs (then the most foreground).
    k = max(range(label.shape[2]), key=lambda i: (len(np.unique(label[:, :, i])), (label[:, :, i] > 0).sum()))
    image = torch.from_numpy(_normalise(volume)[:, :, k].astype(np.float32))[None, None]
    present = [c for c in (1, 2, 3, 4) if (label[:, :, k] == c).any()]
    assert len(present) >= 3
    # The largest and the smallest organ of the slice (CPU time: two masks are enough).
    sizes = {c: int((label[:, :, k] == c).sum()) for c in present}
    organs = [max(sizes, key=sizes.get), min(sizes, key=sizes.get)]
    masks = torch.from_numpy(np.stack([(label[:, :, k] == c) for c in organs]).astype(np.float32))[:, None]

    recon = taesd.decode_gray(taesd.encode_gray(image))
    psnr = 10 * torch.log10(4.0 / ((recon - image) ** 2).mean())  # data range 2 in [-1, 1]
    assert psnr >= 25.0, float(psnr)

    decoded = (taesd.decode_gray(taesd.encode_masks(masks)) > 0).float()
    dice = 2 * (decoded * masks).sum((1, 2, 3)) / (decoded.sum((1, 2, 3)) + masks.sum((1, 2, 3)))
    assert float(dice.mean()) >= 0.97, dice.tolist()
    assert float(dice.min()) >= 0.95, dice.tolist()


def test_autoencoder_kl_wrapper_scaling():
    vae = tiny_autoencoder_kl(seed=0)
    assert vae.kind == "kl" and vae.downsample == 8 and vae.scaling_factor == pytest.approx(0.18215)
    assert all(not p.requires_grad for p in vae.parameters())
    x = _images()
    z = vae.encode(x)
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, vae.model.encode(x).latent_dist.mean * 0.18215)
    out = vae.decode(z)
    torch.testing.assert_close(out, vae.model.decode(z / 0.18215).sample.clamp(-1, 1))
    # The posterior mean is used: encoding is deterministic.
    torch.testing.assert_close(vae.encode(x), z)


def test_load_autoencoder_kl_from_a_diffusers_folder(tmp_path):
    tiny_autoencoder_kl_model(seed=3).save_pretrained(tmp_path / "sd" / "vae")
    x = _images(1)
    loaded = load_autoencoder_kl(tmp_path / "sd")  # subfolder "vae"
    direct = load_autoencoder_kl(tmp_path / "sd" / "vae")  # the folder itself
    reference = tiny_autoencoder_kl(seed=3)
    torch.testing.assert_close(loaded.encode(x), reference.encode(x))
    torch.testing.assert_close(direct.encode(x), reference.encode(x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_autoencoder_kl(tmp_path / "empty")


def test_tiny_autoencoder_tiny_shapes():
    vae = tiny_autoencoder_tiny(seed=0)
    assert vae.kind == "taesd" and vae.downsample == 8
    z = vae.encode(_images(1))
    assert z.shape == (1, 4, 4, 4)
    assert vae.decode(z).shape == (1, 3, 32, 32)


def test_taesd_bad_folders_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_taesd(tmp_path / "nowhere")
    (tmp_path / "taesd_encoder.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError):
        load_taesd(tmp_path)
