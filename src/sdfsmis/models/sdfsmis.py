"""SD-FSMIS: Support Information Injection (SII), Query Enhancement (QE) and the
Visual-to-Textual Condition Translator (VTCT) on a latent-diffusion UNet, one step at t = 999.

Per episode (query I_q, supports I_s^k with masks M_s^k, k = 1..K):

- frozen VAE: ``z_qi = E(I_q)``, ``z_si = E(I_s)``, ``z_sm = E(M_s)`` (pseudo-RGB in [-1, 1]);
- support latent ``z_s = concat(z_si, z_sm)`` (8 channels) through its own input conv (the
  pretrained ``conv_in`` widened 4 -> 8 by tiling and halving);
- QE: ``P_s`` = masked average of ``z_si`` under ``M_s`` (resized to the latent grid, area-weighted;
  K shots: the mean of the K prototypes); ``P_q`` = mean of the ``z_qi`` vectors whose cosine
  similarity to ``P_s`` exceeds ``qe_tau``, or ``P_s`` when none does (counted in ``qe_fallbacks``
  out of ``qe_calls``); ``z_q = concat(z_qi, broadcast(P_q))`` through the query input conv (also
  widened 4 -> 8);
- SII in every transformer block (``processors.SIIProcessor``; K shots: tokens concatenated);
- VTCT: frozen image encoder -> masked average under ``M_s`` (K shots: mean of the K prototypes) ->
  trainable MLP -> ``E`` [B, 1, D], the condition of every cross-attention (query and support rows);
- the UNet output at t = 999 is the predicted query-mask latent; loss MSE to ``E(M_q)``.

Ablation switches (``ModelConfig``):

- ``sii=False``: no support branch in the UNet at all (support reaches the query only via QE / VTCT);
- ``qe=False``: the query input is ``z_qi`` alone through the *unwidened* pretrained 4-channel
  ``conv_in`` (in the joint batch it is zero-padded to 8 channels and the query conv reads only the
  first 4), i.e. no prototype channels at all rather than a zero prototype;
- ``vtct=False``: every cross-attention gets the null embedding (``config.null_embedding``: a fixed
  all-zero token, or a learned one; SD's CLIP empty-prompt embedding needs a text encoder that the
  backbones do not load).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdfsmis.models.backbones import Backbone, build_backbone, widen_conv_in
from sdfsmis.models.base import EncodedEpisode, FewShotSegmenter, SupportCache
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.image_encoders import masked_average
from sdfsmis.models.processors import DualConvIn, install_sii, make_sii_layers
from sdfsmis.models.registry import register

__all__ = ["SDFSMIS", "VTCT", "SupportCache", "query_enhancement", "support_prototype"]


def support_prototype(z_si: Tensor, support_masks: Tensor) -> Tensor:
    """Masked average of support latents. z_si [B, K, C, h, w], masks [B, K, 1, H, W] -> [B, C]
    (the mean over the K shots of each shot's prototype; an empty mask gives a zero prototype)."""
    return masked_average(z_si, support_masks).mean(dim=1)


def query_enhancement(z_qi: Tensor, p_s: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """QE prototype of the query (paper eq. 3).

    z_qi [B, C, h, w], p_s [B, C] -> (P_q [B, C], fallback [B] bool). ``P_q`` is the mean of the
    query latent vectors whose cosine similarity to ``p_s`` is > ``tau``; where no position passes,
    ``P_q = p_s`` and ``fallback`` is True.
    """
    cos = F.cosine_similarity(z_qi, p_s[:, :, None, None].to(z_qi.dtype), dim=1, eps=1e-8)  # [B, h, w]
    sel = (cos > tau).to(z_qi.dtype).unsqueeze(1)
    count = sel.sum(dim=(1, 2, 3))
    p_q = (z_qi * sel).sum(dim=(2, 3)) / count.clamp_min(1.0)[:, None]
    fallback = count == 0
    return torch.where(fallback[:, None], p_s.to(p_q.dtype), p_q), fallback


class VTCT(nn.Module):
    """Trainable MLP: image prototype [B, d_img] -> implicit text embedding [B, 1, D]."""

    def __init__(self, d_img: int, d_text: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_text
        self.mlp = nn.Sequential(nn.Linear(d_img, hidden), nn.GELU(), nn.Linear(hidden, d_text))

    def forward(self, prototype: Tensor) -> Tensor:
        return self.mlp(prototype).unsqueeze(1)


@register("sdfsmis")
class SDFSMIS(FewShotSegmenter):
    """SD-FSMIS. ``forward(query [B,1,H,W], support_images [B,K,1,H,W], support_masks [B,K,1,H,W])
    -> probability [B,1,H,W]``; fast path ``prepare_support`` / ``predict_with_support``."""

    new_prefixes = ("unet.conv_in.", "sii_layers.", "vtct.", "null_embedding")

    def __init__(self, config: ModelConfig, backbone: Backbone | None = None):
        if config.method != "sdfsmis":
            raise ValueError(f"SDFSMIS needs method='sdfsmis', got {config.method!r}")
        super().__init__(config, backbone if backbone is not None else build_backbone(config.backbone))
        self.has_support_branch = config.sii
        self.uses_vtct = config.vtct
        c = self.latent_channels
        pretrained = self.unet.conv_in
        query_conv = widen_conv_in(pretrained, 2 * c) if config.qe else copy.deepcopy(pretrained)
        support_conv = widen_conv_in(pretrained, 2 * c) if config.sii else None
        if config.sii:
            self.sii_layers = make_sii_layers(self.unet)  # copies attn1/norm1 before processors change
        self.unet.conv_in = DualConvIn(query_conv, support_conv, self.ctx)
        self.sii_processors = install_sii(self.unet, self.sii_layers, self.ctx) if config.sii else []
        if config.vtct:
            with torch.random.fork_rng(devices=[]):  # seeded like the backbone, whatever the global RNG
                torch.manual_seed(config.backbone.seed)
                self.vtct = VTCT(self.image_encoder.dim, self.cross_attention_dim, config.vtct_hidden)
        self.register_buffer("qe_calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("qe_fallbacks", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def qe_fallback_rate(self) -> float:
        """Fraction of QE calls (one per query) that fell back to the support prototype."""
        calls = int(self.qe_calls)
        return int(self.qe_fallbacks) / calls if calls else 0.0

    def reset_qe_counters(self) -> None:
        self.qe_calls.zero_()
        self.qe_fallbacks.zero_()

    def support_condition(self, ep: EncodedEpisode) -> tuple[Tensor | None, Tensor]:
        """(P_s [B, 4] or None without QE, condition E [B, 1, D])."""
        b = ep.z_si.shape[0]
        prototype = support_prototype(ep.z_si, ep.support_masks) if self.config.qe else None
        if self.config.vtct:
            assert ep.support_features is not None
            p_e = masked_average(ep.support_features, ep.support_masks).mean(dim=1)  # [B, d_img]
            cond = self.vtct(p_e)
        else:
            cond = self.null_condition(b)
        return prototype, cond

    def query_input(self, z_qi: Tensor, prototype: Tensor | None) -> Tensor:
        """z_qi [B, 4, h, w] -> z_q = concat(z_qi, broadcast(P_q)) [B, 8, h, w] (QE), or z_qi."""
        if not self.config.qe:
            return z_qi
        assert prototype is not None
        with torch.no_grad():
            p_q, fallback = query_enhancement(z_qi, prototype, self.config.qe_tau)
            self.qe_calls += fallback.numel()
            self.qe_fallbacks += fallback.sum()
        return torch.cat([z_qi, p_q[:, :, None, None].expand_as(z_qi)], dim=1)
