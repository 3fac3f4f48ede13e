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
UNet there). Enabled with ``TrainConfig.cache_latents``.

Augmentation (``episodes.augment_which`` ``"one"`` or ``"both"``, as in the sampler) moves from the
pixels to the encodings (DESIGN §7): the geometric part of ``episodes.augment`` (affine + elastic)
is drawn at the slice size and applied, as one transform per augmented slice, to its image latent,
its mask latent, its image-encoder features (by :func:`~sdfsmis.data.augment.resample`, bilinear,
border padding) and its pixel mask (bilinear, then binarised, as the sampler does). The gamma part
has no counterpart on encodings and is left out. Warping a latent is not the same as encoding the
warped slice (bilinear interpolation smooths it a little), but image and mask latents move together,
which is what the support-to-query transfer has to learn.

With ``store`` (``TrainConfig.cache_dir``), the encodings are also kept on disk, one safetensors file
per scan, under a folder named after the dataset and a hash of what they depend on (the prepared
dataset's ``dataset.json``, the episode mode, the image size, the frozen encoder weights). Every run
with the same hash reads them: the other folds of a cross-validation, a resumed run, a general model
on the same dataset, the SD-FSMIS ablation variants and DiffewS on the same backbone (a run with VTCT
adds the image-encoder features to files written without them). :meth:`LatentCache.save` adds the masks encoded since (the trainer calls it at
every checkpoint); files are replaced whole, by rename, so concurrent runs never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

import sdfsmis
from sdfsmis.data.augment import random_grids, resample
from sdfsmis.errors import InputError


class LatentCache:
    """Episodes of ``sampler`` as cached encodings of ``model``'s frozen encoders (module docstring)."""

    def __init__(self, sampler: Any, model: nn.Module, chunk: int = 32, progress: bool = True,
                 store: str | Path | None = None):
        self.sampler, self.model, self.chunk, self.progress = sampler, model, chunk, progress
        self.device = sampler.device
        self._slices: dict[str, Tensor] | None = None
        self._mask_latents: dict[tuple[int, int], Tensor] = {}
        self._unsaved: set[tuple[int, int]] = set()
        self.store = None if store is None else Path(store) / self._store_name()

    def _store_name(self) -> str:
        """``<dataset>-<hash of what the encodings depend on>`` (module docstring)."""
        if self.sampler.root is None:
            raise InputError(None, "cache_dir needs episodes from a prepared dataset folder")
        h = hashlib.sha256((Path(self.sampler.root) / "dataset.json").read_bytes())
        h.update(json.dumps([sdfsmis.__version__, self.sampler.config.mode, self.sampler.config.image_size]).encode())
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                h.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
        return f"{self.sampler.dataset.spec.name}-{h.hexdigest()[:16]}"

    @torch.no_grad()
    def _encode(self, fn, x: Tensor) -> Tensor:
        return torch.cat([fn(x[i: i + self.chunk].to(self.model.device)).to(self.device, torch.float16)
                          for i in range(0, len(x), self.chunk)])

    def _slice_encodings(self) -> dict[str, Tensor]:
        """Latents (and image-encoder features) of every training slice, computed (or read) once."""
        if self._slices is None:
            out: dict[str, list[Tensor]] = {"latents": [], "features": []}
            for sid in tqdm(self.sampler.train_ids, desc="encoding training slices", disable=not self.progress):
                stored = self._read(sid)
                if "latents" not in stored or (self.model.uses_features and "features" not in stored):
                    stored |= self._encode_scan(sid)  # keeps the masks another run stored
                    if self.store is not None:
                        self._write(sid, stored)
                out["latents"].append(stored["latents"].to(self.device))
                if self.model.uses_features:
                    out["features"].append(stored["features"].to(self.device))
                rows = self.sampler.slice_range(sid)
                for (z, t), lat in zip(stored.get("mask_keys", torch.empty(0, 2)).tolist(),
                                       stored.get("mask_latents", [])):
                    self._mask_latents[(rows.start + z, t)] = lat.to(self.device)
            self._slices = {k: torch.cat(v) for k, v in out.items() if v}
        return self._slices

    @torch.no_grad()
    def _encode_scan(self, sid: str) -> dict[str, Tensor]:
        rows = self.sampler.slice_range(sid)
        images = self.sampler.slice_images[rows.start: rows.stop]
        out: dict[str, list[Tensor]] = {"latents": [], "features": []}
        for i in range(0, len(images), self.chunk):
            z, feats = self.model.encode_images_and_features(images[i: i + self.chunk].float()[:, None]
                                                             .to(self.model.device))
            out["latents"].append(z.to("cpu", torch.float16))
            if feats is not None:
                out["features"].append(feats.to("cpu", torch.float16))
        return {k: torch.cat(v) for k, v in out.items() if v}

    def _read(self, sid: str) -> dict[str, Tensor]:
        path = None if self.store is None else self.store / f"{sid}.safetensors"
        return load_file(path) if path is not None and path.is_file() else {}

    def _write(self, sid: str, tensors: dict[str, Tensor]) -> None:
        """Replace the scan's file whole: write beside it, then rename."""
        self.store.mkdir(parents=True, exist_ok=True)
        tmp = self.store / f".{sid}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.store / f"{sid}.safetensors")

    def save(self) -> None:
        """Add the masks encoded since the last save to the store's files, merged with what other
        runs wrote there meanwhile. Without a store, nothing to do."""
        if self.store is None:
            return
        for sid in self.sampler.train_ids:
            rows = self.sampler.slice_range(sid)
            new = [(i, t) for i, t in self._unsaved if i in rows]
            if not new:
                continue
            stored = self._read(sid) or {k: v[rows.start: rows.stop].cpu() for k, v in self._slices.items()}
            keys = stored.get("mask_keys", torch.empty(0, 2, dtype=torch.int64))
            have = set(map(tuple, keys.tolist()))
            new = [(i, t) for i, t in new if (i - rows.start, t) not in have]
            if new:
                lats = torch.stack([self._mask_latents[key].cpu() for key in new])
                stored["mask_keys"] = torch.cat([keys, torch.tensor([(i - rows.start, t) for i, t in new])])
                stored["mask_latents"] = torch.cat([stored["mask_latents"], lats]) if have else lats
                self._write(sid, stored)
        self._unsaved.clear()

    def mask_latents(self, index: np.ndarray, target: np.ndarray) -> Tensor:
        """float16 ``[M, 4, h, w]``: latents of the masks ``(index[i], target[i])``, encoding new ones."""
        keys = list(zip(index.tolist(), target.tolist()))
        new = [key for key in dict.fromkeys(keys) if key not in self._mask_latents]
        if new:
            idx, tgt = (np.asarray(v, np.int64) for v in zip(*new))
            encoded = self._encode(self.model.encode_masks, self.sampler.masks(idx, tgt))
            self._mask_latents.update(zip(new, encoded))
            self._unsaved.update(new)
        return torch.stack([self._mask_latents[key] for key in keys])

    @property
    def cached_masks(self) -> int:
        return len(self._mask_latents)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The sampler's batch for ``generator`` as cached encodings (keys: module docstring), with
        the episodes' augmented slices warped (module docstring)."""
        gen = self.sampler.generator if generator is None else generator
        episodes = self.sampler.draw(batch_size, gen)
        index, target, flags = self.sampler.episode_rows(episodes)
        b, k = len(episodes), self.sampler.config.shots
        slices = self._slice_encodings()
        index_t = torch.from_numpy(index).to(self.device)
        rows = {"latents": slices["latents"][index_t].float(),
                "mask_latents": self.mask_latents(index, target).float(),
                "masks": self.sampler.masks(index, target)}
        if "features" in slices:
            rows["features"] = slices["features"][index_t].float()
        chosen = torch.from_numpy(np.nonzero(flags)[0]).to(self.device)
        if len(chosen):
            size = self.sampler.config.image_size
            grid = random_grids(len(chosen), size, size, self.sampler.config.augment, gen, self.device)
            threshold = self.sampler.config.augment.mask_threshold
            for key, x in rows.items():
                if key == "masks":  # outside -> background, then binarised as the sampler does
                    x[chosen] = resample(x[chosen], grid, "zeros").gt(threshold).float()
                else:
                    x[chosen] = resample(x[chosen], grid)
        batch = {"query_latents": rows["latents"][:b], "query_mask_latents": rows["mask_latents"][:b],
                 "support_latents": rows["latents"][b:].unflatten(0, (b, k)),
                 "support_mask_latents": rows["mask_latents"][b:].unflatten(0, (b, k)),
                 "support_masks": rows["masks"][b:].unflatten(0, (b, k))}
        if "features" in rows:
            batch["support_features"] = rows["features"][b:].unflatten(0, (b, k))
        return batch
