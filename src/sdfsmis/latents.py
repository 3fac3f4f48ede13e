"""Training on cached encodings: the frozen encoders run once per slice and once per (slice, mask).

The VAE encoder and the VTCT image encoder are frozen, so the encoding of a stored slice, or of
the mask of one supervoxel (or organ) on a slice, never changes during training.
``CachedEpisodeSampler`` wraps an :class:`~sdfsmis.data.episodes.EpisodeSampler`: it draws the same
episodes, but returns them as the cached inputs that ``model.training_loss`` accepts (see
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
adds the image-encoder features to files written without them). :meth:`CachedEpisodeSampler.save`
adds the masks encoded since (the trainer calls it at every checkpoint); files are replaced whole,
by rename, so concurrent runs never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

import sdfsmis
from sdfsmis import atomic
from sdfsmis.data.augment import random_grids, random_intensity, resample
from sdfsmis.errors import InputError


class CachedEpisodeSampler:
    """Episodes of ``sampler`` as cached encodings of ``model``'s frozen encoders (module docstring)."""

    def __init__(self, sampler: Any, model: nn.Module, chunk: int = 32, progress: bool = True,
                 store: str | Path | None = None, bf16: bool = False, bank: int = 0):
        self.sampler, self.model, self.chunk, self.progress = sampler, model, chunk, progress
        self.device = sampler.device
        self.bf16, self.bank = bf16, bank
        self._slices: dict[str, Tensor] | None = None
        self._mask_latents: dict[tuple[int, int], Tensor] = {}
        self._unsaved: set[tuple[int, int]] = set()
        self.store = None if store is None else Path(store) / self._store_name()

    def _autocast(self):
        """bf16 autocast for the frozen encoders when asked for (about 2x faster on CPUs with AVX-512
        BF16; ``benchmarks/cpu_precision.py``)."""
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _bank_keys(self) -> list[str]:
        """Store key suffixes of the intensity bank's copies: a hash of the intensity recipe + copy."""
        aug = self.sampler.config.augment
        parts = [aug.gamma, aug.contrast, aug.noise_std, aug.bias_field]
        if aug.remap:  # only when used: banks stored before the curve existed keep their keys
            parts.append(aug.remap)
        recipe = json.dumps(parts)
        tag = hashlib.sha256(recipe.encode()).hexdigest()[:8]
        return [f"@{tag}.{c}" for c in range(1, self.bank + 1)]

    def _store_name(self) -> str:
        """``<dataset>-<hash of what the encodings depend on>`` (module docstring)."""
        if self.sampler.root is None:
            raise InputError(None, "cache_dir needs episodes from a prepared dataset folder")
        h = hashlib.sha256((Path(self.sampler.root) / "dataset.json").read_bytes())
        h.update(json.dumps([sdfsmis.__version__, self.sampler.config.mode, self.sampler.config.image_size]).encode())
        if self.bf16:
            h.update(b"bf16")
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                h.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
        return f"{self.sampler.dataset.spec.name}-{h.hexdigest()[:16]}"

    @torch.no_grad()
    def _encode(self, fn, x: Tensor) -> Tensor:
        out = []
        for i in range(0, len(x), self.chunk):
            with self._autocast():
                z = fn(x[i: i + self.chunk].to(self.model.device))
            out.append(z.to(self.device, torch.float16))
        return torch.cat(out)  # outside autocast: it does not take float16 inputs on the CPU

    def _slice_encodings(self) -> dict[str, Tensor]:
        """Latents (and image-encoder features) of every training slice, computed (or read) once."""
        if self._slices is None:
            out: dict[str, list[Tensor]] = {"latents": [], "features": []}
            copies = ["", *self._bank_keys()]
            for sid in tqdm(self.sampler.train_ids, desc="encoding training slices", disable=not self.progress):
                stored = self._read(sid)
                missing = [c for c in copies if f"latents{c}" not in stored
                           or (self.model.uses_vtct and f"features{c}" not in stored)]
                if missing:
                    for c in missing:
                        stored |= self._encode_scan(sid, c)  # keeps the masks another run stored
                    if self.store is not None:
                        self._write(sid, stored)
                out["latents"].append(torch.stack([stored[f"latents{c}"] for c in copies], 1).to(self.device))
                if self.model.uses_vtct:
                    out["features"].append(torch.stack([stored[f"features{c}"] for c in copies], 1).to(self.device))
                rows = self.sampler.slice_range(sid)
                for (z, t), lat in zip(stored.get("mask_keys", torch.empty(0, 2)).tolist(),
                                       stored.get("mask_latents", [])):
                    self._mask_latents[(rows.start + z, t)] = lat.to(self.device)
            self._slices = {k: torch.cat(v) for k, v in out.items() if v}
        return self._slices

    @torch.no_grad()
    def _encode_scan(self, sid: str, copy: str = "") -> dict[str, Tensor]:
        """Latents (and features) of the scan's slices; for a bank copy (``copy`` from
        :meth:`_bank_keys`) of the slices after :func:`random_intensity`, seeded by scan and copy."""
        rows = self.sampler.slice_range(sid)
        images = self.sampler.slice_images[rows.start: rows.stop].float()[:, None]
        if copy:
            seed = int.from_bytes(hashlib.sha256(f"{sid}{copy}".encode()).digest()[:8], "little")
            gen = torch.Generator(device=images.device).manual_seed(seed)
            images = random_intensity(images, self.sampler.config.augment, gen)
        out: dict[str, list[Tensor]] = {f"latents{copy}": [], f"features{copy}": []}
        for i in range(0, len(images), self.chunk):
            with self._autocast():
                z, feats = self.model.encode_images_and_features(images[i: i + self.chunk].to(self.model.device))
            out[f"latents{copy}"].append(z.to("cpu", torch.float16))
            if feats is not None:
                out[f"features{copy}"].append(feats.to("cpu", torch.float16))
        return {k: torch.cat(v) for k, v in out.items() if v}

    def _read(self, sid: str) -> dict[str, Tensor]:
        path = None if self.store is None else self.store / f"{sid}.safetensors"
        return load_file(path) if path is not None and path.is_file() else {}

    def _write(self, sid: str, tensors: dict[str, Tensor]) -> None:
        """Replace the scan's file whole: write beside it, then rename."""
        self.store.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(self.store / f"{sid}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)

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
            stored = self._read(sid) or self._scan_tensors(sid)
            keys = stored.get("mask_keys", torch.empty(0, 2, dtype=torch.int64))
            have = set(map(tuple, keys.tolist()))
            new = [(i, t) for i, t in new if (i - rows.start, t) not in have]
            if new:
                lats = torch.stack([self._mask_latents[key].cpu() for key in new])
                stored["mask_keys"] = torch.cat([keys, torch.tensor([(i - rows.start, t) for i, t in new])])
                stored["mask_latents"] = torch.cat([stored["mask_latents"], lats]) if have else lats
                self._write(sid, stored)
        self._unsaved.clear()

    def _scan_tensors(self, sid: str) -> dict[str, Tensor]:
        """The scan's slice encodings under their store keys (copy 0 plain, then the bank's)."""
        rows = self.sampler.slice_range(sid)
        return {f"{k}{c}": v[rows.start: rows.stop, i].cpu() for k, v in self._slices.items()
                for i, c in enumerate(["", *self._bank_keys()])}

    def prefill(self) -> None:
        """Encode every mask an episode can draw (:meth:`EpisodeSampler.drawable_masks`) now, in
        chunks of ``chunk`` on all the threads torch may use, and store them as they come; training
        then never waits for the encoder."""
        self._slice_encodings()
        todo = [(self.sampler.slice_range(sid).start + z, t) for sid in self.sampler.train_ids
                for z, t in self.sampler.drawable_masks(sid).tolist()]
        todo = [key for key in todo if key not in self._mask_latents]
        step = self.chunk * 16
        for i in tqdm(range(0, len(todo), step), desc=f"encoding {len(todo)} masks", disable=not self.progress):
            idx, tgt = (np.asarray(v, np.int64) for v in zip(*todo[i: i + step]))
            self.mask_latents(idx, tgt)
            self.save()  # a stopped fill keeps what it encoded (masks come scan by scan)

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
        copy = torch.zeros_like(index_t)
        if self.bank:  # each slice as one of its intensity copies (0: as stored)
            copy = torch.randint(0, self.bank + 1, index_t.shape, generator=gen, device=gen.device).to(self.device)
        rows = {"latents": slices["latents"][index_t, copy].float(),
                "mask_latents": self.mask_latents(index, target).float(),
                "masks": self.sampler.masks(index, target)}
        if "features" in slices:
            rows["features"] = slices["features"][index_t, copy].float()
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
