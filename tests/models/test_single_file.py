"""Single-file SD checkpoints (``v1-5-pruned-emaonly.safetensors``-style) load offline through
diffusers' ``from_single_file`` with a local config, to the same weights as the diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdfsmis.errors import InputError
from sdfsmis.models.backbones import BackboneConfig, build_backbone, save_tiny_sd_checkpoint
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.io import build_model, load_pretrained, save_pretrained
from sdfsmis.models.single_file import SD_CONFIGS, config_folder
from sdfsmis.models.single_file_writer import save_tiny_sd_single_file


def _weights_removed(folder):
    for f in folder.rglob("*.safetensors"):
        f.unlink()
    return folder


@pytest.mark.parametrize("layout", ["sd15", "sd21"])
def test_single_file_loads_like_the_diffusers_folder(layout, tmp_path):
    single = save_tiny_sd_single_file(tmp_path / "v1-5-pruned-emaonly.safetensors", seed=4, layout=layout)
    folder = save_tiny_sd_checkpoint(tmp_path / "folder", seed=4, layout=layout)
    reference = build_backbone(BackboneConfig(tier="sd", path=str(folder), image_encoder="vae", image_size=32))
    configs = _weights_removed(save_tiny_sd_checkpoint(tmp_path / "configs", seed=0, layout=layout))
    cfg = BackboneConfig(tier="sd", path=str(single), image_encoder="vae", image_size=32,
                         single_file_config=str(configs))
    bb = build_backbone(cfg)
    for ours, ref in ((bb.unet, reference.unet), (bb.vae.model, reference.vae.model)):
        expected = ref.state_dict()
        assert set(ours.state_dict()) == set(expected)
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=key)
    # A saved model on a single file reloads (the UNet from the model, the VAE from the file).
    torch.manual_seed(0)
    model = build_model(ModelConfig(method="sdfsmis", backbone=cfg))
    saved = save_pretrained(model, tmp_path / "model")
    assert json.loads((saved / "config.json").read_text())["backbone"]["single_file_config"] == str(configs.resolve())
    loaded = load_pretrained(saved)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_packaged_configs_are_picked_from_the_checkpoint_keys(tmp_path):
    v2_key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    assert config_folder(tmp_path / "x.safetensors", {v2_key: torch.empty(640, 1024)}, None) == SD_CONFIGS / "sd21"
    assert config_folder(tmp_path / "x.safetensors", {v2_key: torch.empty(640, 768)}, None) == SD_CONFIGS / "sd15"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD_CONFIGS / "sd15"), subfolder="unet"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the published SD-1.5 UNet
    assert unet.config.cross_attention_dim == 768
    # A tiny file is taken for SD-1.x: without its own config, the mismatch is one error naming the key.
    single = save_tiny_sd_single_file(tmp_path / "tiny.safetensors", seed=1)
    with pytest.raises(InputError, match="single_file_config=DIR") as err:
        build_backbone(BackboneConfig(tier="sd", path=str(single), image_encoder="vae", image_size=32))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not a folder"):
        build_backbone(BackboneConfig(tier="sd", path=str(single), single_file_config=str(tmp_path / "none")))
