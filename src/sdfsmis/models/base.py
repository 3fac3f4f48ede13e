"""Shared machinery of the latent-diffusion segmenters (SD-FSMIS, DiffewS, SDSeg).

``LatentSegmenter``: the frozen VAE / image encoder and trainable UNet of a backbone, decoding of
predicted mask latents to probabilities, the threshold rule, parameter groups and save/load.

``FewShotSegmenter`` (SD-FSMIS and DiffewS): a one-step UNet at ``t = config.timestep`` that maps a
query latent to the query-mask latent, with an optional support branch batched with the query
(``[query; support]``, see ``processors``), the joint path for training and a fast path for
inference (``prepare_support`` once, ``predict_with_support`` for any number of queries).

Shapes: images [B, 1, H, W] in [-1, 1]; supports [B, K, 1, H, W]; masks {0, 1}; latents
[B, 4, H/8, W/8] in the scaled SD latent space; probabilities [B, 1, H, W] in [0, 1].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdfsmis.models.backbones import Backbone
from sdfsmis.models.config import ModelConfig, apply_threshold
from sdfsmis.models.io import load_pretrained, save_pretrained
from sdfsmis.models.processors import BranchContext, pad_channels


@dataclass
class SupportCache:
    """What queries need from one support set of K shots, computed once by ``prepare_support``.

    store: per-block tensors of the support branch (empty without a support branch);
    cond: cross-attention condition [1, T, D]; prototype: the QE support prototype [1, C] or None.
    """

    shots: int
    cond: Tensor
    store: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    prototype: Tensor | None = None


@dataclass
class EncodedEpisode:
    """Encoded episodes. z_qi [B, 4, h, w] (None in ``prepare_support``); z_si, z_sm [B, K, 4, h, w];
    support_masks [B, K, 1, H', W'] (any resolution); support_features [B, K, d, hf, wf] or None."""

    z_qi: Tensor | None
    z_si: Tensor
    z_sm: Tensor
    support_masks: Tensor
    support_features: Tensor | None = None

    @property
    def shots(self) -> int:
        return int(self.z_si.shape[1])


def _as_support(x: Tensor, name: str) -> Tensor:
    """[B, K, 1, H, W] (or [B, 1, H, W] meaning K = 1) -> [B, K, 1, H, W]."""
    if x.ndim == 4:
        x = x.unsqueeze(1)
    if x.ndim != 5 or x.shape[2] != 1:
        raise ValueError(f"{name} must be [B, K, 1, H, W], got {tuple(x.shape)}")
    return x


class LatentSegmenter(nn.Module):
    """Base: backbone modules, decoding, threshold rule, parameter groups, save/load.

    Subclasses set ``new_prefixes`` (parameter-name prefixes of the layers added to the backbone).
    """

    new_prefixes: tuple[str, ...] = ()
    #: Whether the prediction depends on the support (few-shot); SDSeg ignores it.
    uses_support: bool = False

    def __init__(self, config: ModelConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.unet = backbone.unet
        self.vae = backbone.vae
        self.image_encoder = backbone.image_encoder
        self.cross_attention_dim = backbone.cross_attention_dim
        self.latent_size = backbone.latent_size
        self.image_size = backbone.image_size
        self.latent_channels = backbone.latent_channels
        null = torch.zeros(1, 1, self.cross_attention_dim)
        if config.null_embedding == "learned":
            self.null_embedding = nn.Parameter(null)
        else:
            self.register_buffer("null_embedding", null, persistent=False)

    # -- small helpers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _timestep(self, t: int | None = None) -> Tensor:
        return torch.tensor(self.config.timestep if t is None else t, device=self.device, dtype=torch.long)

    def null_condition(self, n: int) -> Tensor:
        """The null cross-attention condition for ``n`` rows: [n, 1, D]."""
        return self.null_embedding.expand(n, -1, -1)

    def probabilities(self, z: Tensor) -> Tensor:
        """Predicted mask latents [B, 4, h, w] -> foreground probability [B, 1, 8h, 8w] in [0, 1]
        (decoded, averaged over the 3 channels, mapped from [-1, 1] to [0, 1]; ``FrozenVAE.decode_masks``)."""
        return self.vae.decode_masks(z.float()).float().add(1).div(2).clamp(0, 1)

    def threshold(self, prob: Tensor) -> Tensor:
        """Probabilities -> hard {0, 1} masks with the configured rule (``config.apply_threshold``)."""
        return apply_threshold(prob, self.config.threshold, self.config.threshold_value)

    @torch.no_grad()
    def segment(self, *args: Any, **kwargs: Any) -> Tensor:
        """Same inputs as ``forward``; returns hard {0, 1} float masks [B, 1, H, W]."""
        return self.threshold(self(*args, **kwargs))

    def encode_images(self, images: Tensor) -> Tensor:
        """[N, 1, H, W] in [-1, 1] -> [N, 4, H/8, W/8] (frozen VAE)."""
        return self.vae.encode_gray(images.float()).float()

    def encode_masks(self, masks: Tensor) -> Tensor:
        """[N, 1, H, W] in {0, 1} -> [N, 4, H/8, W/8] (frozen VAE on the mask mapped to [-1, 1])."""
        return self.vae.encode_masks(masks.float()).float()

    # -- speed -----------------------------------------------------------------------------------
    def compile_modules(self, mode: str = "default") -> None:
        """``torch.compile`` the UNet and the VAE's encoder and decoder in place (``mode`` as for
        ``torch.compile``); the model's calls are unchanged."""
        self.unet = torch.compile(self.unet, mode=mode, fullgraph=False)
        self.vae.model.encoder = torch.compile(self.vae.model.encoder, mode=mode)
        self.vae.model.decoder = torch.compile(self.vae.model.decoder, mode=mode)

    def frozen_modules_to(self, dtype: torch.dtype) -> None:
        """Cast the frozen VAE and image encoder to ``dtype`` (e.g. ``torch.bfloat16`` on a GPU)."""
        self.vae.to(dtype=dtype)
        self.image_encoder.to(dtype=dtype)

    # -- optimisation ----------------------------------------------------------------------------
    def parameter_groups(self, lr_backbone: float, lr_new: float) -> list[dict[str, Any]]:
        """AdamW groups: ``backbone`` (pretrained UNet / encoder weights, ``lr_backbone``) and ``new``
        (layers added by the method: input convs, SII, VTCT MLP, learned tokens; ``lr_new``).
        Frozen parameters are left out; empty groups are dropped."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "new": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["new" if name.startswith(self.new_prefixes) else "backbone"].append(p)
        lrs = {"backbone": lr_backbone, "new": lr_new}
        return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]

    # -- persistence (the work is done in sdfsmis.models.io, which never imports a method) ---------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (see ``sdfsmis.models.io``); ``dtype``
        (``torch.float16``) stores the floating-point weights in that type."""
        return save_pretrained(self, directory, dtype=dtype)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> LatentSegmenter:
        """Load a directory written by ``save_pretrained``; checks the method matches ``cls``."""
        model = load_pretrained(directory, device=device)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


class FewShotSegmenter(LatentSegmenter):
    """One-step few-shot segmenter with an optional support branch in the same UNet.

    Subclasses define ``has_support_branch`` (SII / KV fusion: the support runs through the UNet
    beside the query), ``uses_vtct`` (the condition comes from VTCT over frozen image-encoder
    features of the support, which ``encode_support`` then computes) and:
    ``support_condition(episode) -> (prototype [B, C] | None, cond [B, T, D])``,
    ``query_input(z_qi [B, 4, h, w], prototype) -> [B, Cq, h, w]`` and
    ``support_input(z_si [N, 4, h, w], z_sm [N, 4, h, w]) -> [N, Cs, h, w]``.
    """

    uses_support = True
    has_support_branch: bool = True
    uses_vtct: bool = False

    def __init__(self, config: ModelConfig, backbone: Backbone):
        super().__init__(config, backbone)
        self.ctx = BranchContext()

    # -- hooks for subclasses --------------------------------------------------------------------
    def support_condition(self, ep: EncodedEpisode) -> tuple[Tensor | None, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def query_input(self, z_qi: Tensor, prototype: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def support_input(self, z_si: Tensor, z_sm: Tensor) -> Tensor:
        return torch.cat([z_si, z_sm], dim=1)

    # -- encoding --------------------------------------------------------------------------------
    def encode_support(self, support_images: Tensor, support_masks: Tensor) -> EncodedEpisode:
        """[B, K, 1, H, W] images and masks -> EncodedEpisode without a query."""
        support_images = _as_support(support_images, "support_images")
        support_masks = _as_support(support_masks, "support_masks")
        b, k = support_images.shape[:2]
        z_si, feats = self.encode_images_and_features(support_images.flatten(0, 1))
        z_sm = self.encode_masks(support_masks.flatten(0, 1)).unflatten(0, (b, k))
        feats = None if feats is None else feats.unflatten(0, (b, k))
        return EncodedEpisode(None, z_si.unflatten(0, (b, k)), z_sm, support_masks.float(), feats)

    @torch.no_grad()
    def encode_images_and_features(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """[N, 1, H, W] in [-1, 1] -> (latents [N, 4, h, w], image-encoder features [N, d, hf, wf], or
        None for a method without features). Where the image encoder is the TAESD encoder's own trunk
        (the compact tier), the trunk runs once: the latents are its last layer on the features."""
        images = images.float()
        if not self.uses_vtct:
            return self.encode_images(images), None
        feats = self.image_encoder.features(images).float()
        head = self._latent_head
        if head is None:
            return self.encode_images(images), feats
        return head(feats.to(head.weight.dtype)).float(), feats

    @functools.cached_property
    def _latent_head(self) -> nn.Module | None:
        """The TAESD encoder's last layer when ``image_encoder`` is a ``VAEFeatureEncoder`` holding that
        encoder's trunk with the same weights, else None. Decided once, on first use (both are frozen)."""
        vae, enc = self.vae, self.image_encoder
        if vae.kind != "taesd" or getattr(enc, "kind", None) != "taesd":
            return None
        layers = vae.model.encoder.layers
        ours, theirs = enc.trunk.state_dict(), layers[:-1].state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            return None
        return layers[-1]

    def encode_episode(self, query_images: Tensor, support_images: Tensor, support_masks: Tensor) -> EncodedEpisode:
        """Query [B, 1, H, W], supports [B, K, 1, H, W] -> EncodedEpisode (frozen encoders, no gradients)."""
        if query_images.ndim != 4 or query_images.shape[1] != 1:
            raise ValueError(f"query_images must be [B, 1, H, W], got {tuple(query_images.shape)}")
        ep = self.encode_support(support_images, support_masks)
        if ep.z_si.shape[0] != query_images.shape[0]:
            raise ValueError(f"{query_images.shape[0]} queries but {ep.z_si.shape[0]} support sets")
        ep.z_qi = self.encode_images(query_images)
        return ep

    def episode_from_batch(self, batch: dict[str, Tensor]) -> EncodedEpisode:
        """A training batch -> EncodedEpisode. Either images (``query_images``, ``support_images``,
        ``support_masks``) or cached latents: ``query_latents`` [B, 4, h, w], ``support_latents`` and
        ``support_mask_latents`` [B, K, 4, h, w], ``support_masks`` [B, K, 1, H', W'] (any size) and,
        when the method uses image features, ``support_features`` [B, K, d, hf, wf] (else computed
        from ``support_images``)."""
        if "query_latents" not in batch:
            return self.encode_episode(batch["query_images"], batch["support_images"], batch["support_masks"])
        masks = _as_support(batch["support_masks"], "support_masks").float()
        feats = batch.get("support_features")
        feats = None if feats is None else feats.float()
        if self.uses_vtct and feats is None:
            imgs = _as_support(batch["support_images"], "support_images")
            feats = self.image_encoder.features(imgs.flatten(0, 1).float()).float().unflatten(0, imgs.shape[:2])
        return EncodedEpisode(batch["query_latents"].float(), batch["support_latents"].float(),
                       batch["support_mask_latents"].float(), masks, feats)

    # -- joint path ------------------------------------------------------------------------------
    def predict_latents(self, ep: EncodedEpisode) -> Tensor:
        """EncodedEpisode -> predicted query-mask latents [B, 4, h, w] (one UNet call, joint batch)."""
        assert ep.z_qi is not None
        b, k = ep.z_si.shape[:2]
        prototype, cond = self.support_condition(ep)
        zq = self.query_input(ep.z_qi, prototype)
        t = self._timestep()
        if not self.has_support_branch:
            self.ctx.set("replay")
            return self.unet(zq, t, encoder_hidden_states=cond).sample
        zs = self.support_input(ep.z_si.flatten(0, 1), ep.z_sm.flatten(0, 1))
        c = max(zq.shape[1], zs.shape[1])
        sample = torch.cat([pad_channels(zq, c), pad_channels(zs, c)])
        ehs = torch.cat([cond, cond.repeat_interleave(k, dim=0)])
        self.ctx.set("joint", n_query=b, shots=k)
        return self.unet(sample, t, encoder_hidden_states=ehs).sample[:b]

    def forward(self, query_images: Tensor, support_images: Tensor, support_masks: Tensor) -> Tensor:
        """Query [B, 1, H, W], supports [B, K, 1, H, W], masks [B, K, 1, H, W] -> probability
        [B, 1, H, W] in [0, 1]."""
        return self.probabilities(self.predict_latents(
            self.encode_episode(query_images, support_images, support_masks)))

    def training_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """MSE between the predicted and the true query-mask latent (``query_masks`` [B, 1, H, W] or
        cached ``query_mask_latents`` [B, 4, h, w]); see ``episode_from_batch`` for the inputs."""
        ep = self.episode_from_batch(batch)
        target = batch.get("query_mask_latents")
        if target is None:
            target = self.encode_masks(batch["query_masks"])
        return F.mse_loss(self.predict_latents(ep).float(), target.float())

    # -- fast path -------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_support(self, support_images: Tensor, support_masks: Tensor) -> SupportCache:
        """One support set: images and masks [K, 1, H, W] -> SupportCache (the support branch runs once)."""
        if support_images.ndim != 4 or support_images.shape != support_masks.shape:
            raise ValueError(f"prepare_support expects [K, 1, H, W] images and masks, got "
                             f"{tuple(support_images.shape)} and {tuple(support_masks.shape)}")
        ep = self.encode_support(support_images[None], support_masks[None])
        prototype, cond = self.support_condition(ep)
        store: dict[str, tuple[Tensor, Tensor]] = {}
        if self.has_support_branch:
            k = ep.shots
            zs = self.support_input(ep.z_si[0], ep.z_sm[0])
            self.ctx.set("record", shots=k)
            self.unet(zs, self._timestep(), encoder_hidden_states=cond.expand(k, -1, -1))
            store, self.ctx.store = self.ctx.store, {}
        return SupportCache(shots=ep.shots, cond=cond, store=store, prototype=prototype)

    @torch.no_grad()
    def predict_with_support(self, query_images: Tensor, cache: SupportCache) -> Tensor:
        """Queries [N, 1, H, W] sharing one prepared support -> probabilities [N, 1, H, W]."""
        return self.probabilities(self.predict_latents_with_support(self.encode_images(query_images), cache))

    def predict_latents_with_support(self, z_qi: Tensor, cache: SupportCache) -> Tensor:
        """Query latents [N, 4, h, w] + SupportCache -> predicted mask latents [N, 4, h, w]."""
        n = z_qi.shape[0]
        prototype = None if cache.prototype is None else cache.prototype.expand(n, -1)
        zq = self.query_input(z_qi, prototype)
        self.ctx.set("replay")
        self.ctx.store = cache.store
        try:
            return self.unet(zq, self._timestep(), encoder_hidden_states=cache.cond.expand(n, -1, -1)).sample
        finally:
            self.ctx.store = {}
