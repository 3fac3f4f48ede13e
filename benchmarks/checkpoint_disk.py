"""Disk per backbone tier: the saved model, a training checkpoint, and a whole run.

    python benchmarks/checkpoint_disk.py

Counts parameters without downloading or allocating anything large: the ``sd`` UNets are built on
PyTorch's ``meta`` device from the published SD-1.5 / SD-2.1 UNet configs; the ``compact`` model is
built for real. A saved model stores the trained UNet and the new layers (the frozen VAE and image
encoder are read from their folders); a checkpoint adds ``optimizer.pt`` (AdamW: two float32 moments
per trainable weight) and, with ``ema_decay > 0``, ``training_model/``. Sizes in GB = 1e9 bytes.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD_UNETS = {
    "sd (SD-1.5 UNet)": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd (SD-2.1 UNet)": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                             use_linear_projection=True),
}


def _sd_params(config: dict) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    # SD-FSMIS widens conv_in 4 -> 8 for the query and adds a support conv_in: 2 x 8 x 320 x 3 x 3 more.
    return sum(p.numel() for p in unet.parameters()) + 2 * 8 * 320 * 9


def _compact_params() -> int:
    from sdfsmis.models import BackboneConfig, ModelConfig, build
    from sdfsmis.models.io import saved_key_filter

    model = build(ModelConfig(method="sdfsmis", backbone=BackboneConfig(tier="compact", image_size=128)))
    saved = saved_key_filter(model)
    return sum(p.numel() for n, p in model.named_parameters() if saved(n))


def main() -> None:
    rows = [(name, _sd_params(cfg)) for name, cfg in SD_UNETS.items()] + [("compact", _compact_params())]
    gb = 1e9
    print("| tier | saved parameters | model/ fp32 | model/ fp16 | checkpoint (model + optimizer) "
          "| checkpoint, checkpoint_optimizer=false | same, checkpoint_fp16=true | run, keep_checkpoints=3 (defaults) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n in rows:
        model32, model16, optim = 4 * n / gb, 2 * n / gb, 8 * n / gb
        ckpt = model32 + optim
        run = 3 * ckpt + model32
        print(f"| {name} | {n / 1e6:.1f} M | {model32:.2f} GB | {model16:.2f} GB | {ckpt:.2f} GB | {model32:.2f} GB "
              f"| {model16:.2f} GB | {run:.1f} GB |")


if __name__ == "__main__":
    main()
