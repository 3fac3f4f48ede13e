"""The ``sd`` tier's default VTCT is the paper's: DINOv2-small patch features of the support, pooled
under its mask, through the MLP into one text token of the UNet's cross-attention width.

A tiny random DINOv2 (``Dinov2Config`` with tiny sizes) is placed in a temporary Hugging Face cache
under the default's hub id, as after a download; the model is built with ``image_encoder`` unset,
saved, loaded, and segments a NIfTI pair. On a machine without that cache entry the saved model loads
with ``image_encoder_path`` pointing at a DINOv2 folder instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import nifti_pair
from transformers import AutoModel

from sdfsmis.errors import InputError
from sdfsmis.models.backbones import DINOV2_SMALL, BackboneConfig, build_backbone, save_tiny_dinov2, save_tiny_sd_checkpoint
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.image_encoders import Dinov2Encoder, VAEFeatureEncoder, masked_average
from sdfsmis.models.io import build_model, load_pretrained, save_pretrained
from sdfsmis.predict import predict

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding a tiny random DINOv2 under ``facebook/dinov2-small`` (offline)."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + DINOV2_SMALL.replace("/", "--"))
    save_tiny_dinov2(repo / "snapshots" / REVISION, seed=5)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_tier_defaults():
    """``compact``: its TAESD-trunk features (the ``sd`` default is the test below)."""
    assert isinstance(build_backbone(BackboneConfig(tier="compact", image_size=64)).image_encoder, VAEFeatureEncoder)


def test_sd_default_is_dinov2_small_build_save_load_predict(hub_cache, tmp_path):
    sd = save_tiny_sd_checkpoint(tmp_path / "sd15", seed=2, full=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(method="sdfsmis", backbone=BackboneConfig(tier="sd", path=str(sd), image_size=32)))
    enc = model.image_encoder
    assert isinstance(enc, Dinov2Encoder) and enc.dim == 32  # the tiny config's hidden size
    reference = Dinov2Encoder(AutoModel.from_pretrained(str(hub_cache / "snapshots" / REVISION)))
    img = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(enc.features(img), reference.features(img))
    # VTCT: prototype [B, 32] -> MLP -> one token [B, 1, cross_attention_dim]
    assert model.vtct.mlp[0].in_features == 32
    assert model.vtct.mlp[-1].out_features == model.cross_attention_dim
    support = torch.rand(1, 1, 1, 32, 32) * 2 - 1
    masks = torch.zeros(1, 1, 1, 32, 32)
    masks[..., 4:14, 4:14] = 1
    other = torch.zeros_like(masks)
    other[..., 18:30, 16:30] = 1
    feats = enc.features(support.flatten(0, 1)).unflatten(0, (1, 1))
    with torch.no_grad():
        e1 = model.vtct(masked_average(feats, masks).mean(dim=1))
        e2 = model.vtct(masked_average(feats, other).mean(dim=1))
    assert e1.shape == (1, 1, model.cross_attention_dim)
    assert not torch.allclose(e1, e2)  # the condition follows the support mask

    saved = save_pretrained(model, tmp_path / "model")
    assert json.loads((saved / "config.json").read_text())["backbone"]["image_encoder"] == DINOV2_SMALL
    loaded = load_pretrained(saved)
    q = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model.eval()(q, support, masks)
        torch.testing.assert_close(loaded(q, support, masks), expected)

    scans = nifti_pair(tmp_path / "in")
    (tmp_path / "out").mkdir()
    result = predict(scans["support"], scans["mask"], scans["query"], tmp_path / "out" / "a", checkpoint=saved,
                     progress=False, min_area_mm2=0.0, device="cpu")
    first = np.asarray(nib.load(result.segmentation).dataobj)

    # Another machine: no cache entry. The error names the override; the override loads the same weights.
    shutil.copytree(hub_cache / "snapshots" / REVISION, tmp_path / "dinov2-small")
    shutil.rmtree(hub_cache)
    with pytest.raises(InputError) as err:
        load_pretrained(saved)
    assert "--image-encoder-path" in str(err.value) and "\n" not in str(err.value)
    result = predict(scans["support"], scans["mask"], scans["query"], tmp_path / "out" / "b", checkpoint=saved,
                     progress=False, min_area_mm2=0.0, device="cpu", image_encoder_path=tmp_path / "dinov2-small")
    np.testing.assert_array_equal(np.asarray(nib.load(result.segmentation).dataobj), first)
