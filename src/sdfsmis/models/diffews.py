"""DiffewS (Zhu et al., NeurIPS 2024): few-shot segmentation by KV fusion in a latent-diffusion UNet.

- support branch: ``concat(z_si, z_sm)`` (8 channels) through its own input conv (the pretrained
  ``conv_in`` widened 4 -> 8 by tiling and halving);
- query branch: ``z_qi`` (4 channels) through the pretrained ``conv_in`` unchanged; in the joint
  batch ``[query; support]`` it is zero-padded to 8 channels and the query conv reads the first 4;
- KV fusion in every transformer block's self-attention: the query attends over
  ``[K_q; K_s1..K_sK]``, ``[V_q; V_s1..V_sK]`` with the block's own projections (no new
  parameters); support rows do plain self-attention;
- empty-text conditioning: SD's CLIP empty-prompt embedding needs a text encoder that the backbones
  do not load, so the condition is the null embedding of ``config.null_embedding`` (a fixed
  all-zero token [1, 1, D] by default, or a learned one);
- one UNet call at t = ``config.timestep`` (999) -> query-mask latent; loss MSE to ``E(M_q)``;
  relative threshold 0.25 x max by default.
"""

from __future__ import annotations

import copy

from torch import Tensor

from sdfsmis.models.backbones import Backbone, build_backbone, widen_conv_in
from sdfsmis.models.base import EncodedEpisode, FewShotSegmenter, SupportCache
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.processors import DualConvIn, install_kv_fusion
from sdfsmis.models.registry import register

__all__ = ["DiffewS", "SupportCache"]


@register("diffews")
class DiffewS(FewShotSegmenter):
    """DiffewS. Same public API as ``SDFSMIS``."""

    new_prefixes = ("unet.conv_in.support.", "null_embedding")

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None):
        if config.method != "diffews":
            raise ValueError(f"DiffewS needs method='diffews', got {config.method!r}")
        super().__init__(config, backbone if backbone is not None else build_backbone(config.backbone))
        pretrained = self.unet.conv_in
        self.unet.conv_in = DualConvIn(copy.deepcopy(pretrained), widen_conv_in(pretrained, 2 * self.latent_channels),
                                       self.ctx)
        self.kv_processors = install_kv_fusion(self.unet, self.ctx)

    def support_condition(self, ep: EncodedEpisode) -> tuple[Tensor | None, Tensor]:
        """No prototype; the null condition [B, 1, D]."""
        return None, self.null_condition(ep.z_si.shape[0])

    def query_input(self, z_qi: Tensor, prototype: Tensor | None) -> Tensor:
        return z_qi
