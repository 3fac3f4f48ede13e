"""Training on cached encodings: the frozen encoders run once per slice and once per (slice, mask).

The VAE encoder and the VTCT image encoder are frozen, so the encoding of a stored slice, or of
the mask of one supervoxel (or organ) on a slice, never changes during training. ``LatentCache``
wraps an :class:`~sdfsmis.data.episodes.EpisodeSampler`: it draws the same episodes, but returns
them as the cached inputs that ``model.training_loss`` accepts (see
``FewShotSegmenter.episode_from_batch``) instead of images:

- ``query_latents`` ``[B, 4, h, w]``, ``support_latents`` ``[B, K, 4, h, w]``: every training slice is
  encoded once, on first use;
- ``query_mask_latents`` / ``support_mask_latents``: each (slice, mask id) is encoded the first time
  an episode draws it and kept (float16), so later steps mostly skip the encoder;
- ``support_masks`` ``[B, K, 1, S, S]`` and, for methods with VTCT, ``support_features``.

This is what makes training on a CPU practical (the TAESD encoder costs far more than the compact
UNet there). The price: no image-space augmentation, since the cache holds the stored slices, so
``episodes.augment_which`` must be ``"none"``. Enabled with ``TrainConfig.cache_latents``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sdfsmis.errors import InputError


class LatentCache:
    """Episodes of ``sampler`` as cached encodings of ``model``'s frozen encoders (module docstring)."""

    def __init__(self, sampler: Any, model: nn.Module, chunk: int = 32, progress: bool = True):
        if sampler.config.augment_which != "none":
            raise InputError(None, "cache_latents needs episodes.augment_which=none: the cache holds "
                                   "encodings of the stored, unaugmented slices")
        self.sampler, self.model, self.chunk, self.progress = sampler, model, chunk, progress
        self.device = sampler.device
        self._slices: dict[str, Tensor] | None = None
        self._mask_latents: dict[tuple[int, int], Tensor] = {}

    @torch.no_grad()
    def _encode(self, fn, x: Tensor) -> Tensor:
        return torch.cat([fn(x[i: i + self.chunk].to(self.model.device)).to(self.device, torch.float16)
                          for i in range(0, len(x), self.chunk)])

    def _slice_encodings(self) -> dict[str, Tensor]:
        """Latents (and image-encoder features) of every training slice, computed once."""
        if self._slices is None:
            images = self.sampler.slice_images
            out: dict[str, list[Tensor]] = {"latents": [], "features": []}
            for i in tqdm(range(0, len(images), self.chunk), desc="encoding training slices",
                          disable=not self.progress):
                x = images[i: i + self.chunk].float()[:, None].to(self.model.device)
                z, feats = self.model.encode_images_and_features(x)
                out["latents"].append(z.to(self.device, torch.float16))
                if feats is not None:
                    out["features"].append(feats.to(self.device, torch.float16))
            self._slices = {k: torch.cat(v) for k, v in out.items() if v}
        return self._slices

    def mask_latents(self, index: np.ndarray, target: np.ndarray) -> Tensor:
        """float16 ``[M, 4, h, w]``: latents of the masks ``(index[i], target[i])``, encoding new ones."""
        keys = list(zip(index.tolist(), target.tolist()))
        new = [key for key in dict.fromkeys(keys) if key not in self._mask_latents]
        if new:
            idx, tgt = (np.asarray(v, np.int64) for v in zip(*new))
            encoded = self._encode(self.model.encode_masks, self.sampler.masks(idx, tgt))
            self._mask_latents.update(zip(new, encoded))
        return torch.stack([self._mask_latents[key] for key in keys])

    @property
    def cached_masks(self) -> int:
        return len(self._mask_latents)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The sampler's batch for ``generator`` as cached encodings (keys: module docstring)."""
        episodes = self.sampler.draw(batch_size, generator)
        index, target, _ = self.sampler.episode_rows(episodes)
        b, k = len(episodes), self.sampler.config.shots
        slices = self._slice_encodings()
        index_t = torch.from_numpy(index).to(self.device)
        z_img = slices["latents"][index_t]
        z_msk = self.mask_latents(index, target)
        batch = {"query_latents": z_img[:b], "query_mask_latents": z_msk[:b],
                 "support_latents": z_img[b:].unflatten(0, (b, k)),
                 "support_mask_latents": z_msk[b:].unflatten(0, (b, k)),
                 "support_masks": self.sampler.masks(index[b:], target[b:]).unflatten(0, (b, k))}
        if "features" in slices:
            batch["support_features"] = slices["features"][index_t[b:]].unflatten(0, (b, k))
        return batch
