"""The inverse of diffusers' single-file conversion: a diffusers UNet and AutoencoderKL written in
the original SD single-file layout (``model.diffusion_model.*``, ``first_stage_model.*``), so that
tests can make tiny random checkpoints shaped like ``v1-5-pruned-emaonly.safetensors``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from sdfsmis import atomic
from sdfsmis.models.backbones import tiny_sd_modules
from sdfsmis.models.single_file import UNET_PREFIX, VAE_PREFIX

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _unet_key(key: str, per_block: int, attn_up: set[int]) -> str:
    n = per_block + 1
    head, _, tail = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{i * n + j + 1}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * n + j}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * n + per_block}.{2 if i in attn_up else 1}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def _vae_key(key: str, n_up: int) -> str:
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key


def to_original_layout(unet: Any, vae: Any) -> dict[str, Tensor]:
    """The state dicts of a diffusers UNet and AutoencoderKL in the original SD single-file layout
    (``model.diffusion_model.*``, ``first_stage_model.*``; VAE attention weights as 1x1 convs)."""
    ucfg = unet.config
    attn_up = {i for i, t in enumerate(ucfg.up_block_types) if "CrossAttn" in t}
    state = {UNET_PREFIX + _unet_key(k, int(ucfg.layers_per_block), attn_up): v.contiguous()
             for k, v in unet.state_dict().items()}
    n_up = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        name = _vae_key(key, n_up)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        state[VAE_PREFIX + name] = value.contiguous()
    return state


def save_tiny_sd_single_file(path: str | Path, seed: int = 0, layout: Literal["sd15", "sd21"] = "sd15") -> Path:
    """Write the UNet and VAE of ``save_tiny_sd_checkpoint(seed=seed, layout=layout)`` as one
    original-layout ``.safetensors`` file (as ``v1-5-pruned-emaonly.safetensors``). Returns it."""
    from safetensors.torch import save_file

    unet, vae = tiny_sd_modules(seed, layout)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), atomic.replacing(out) as tmp:
        save_file(to_original_layout(unet, vae), str(tmp))
    return out
