"""Where training episodes come from: one sampler per prepared dataset, mixed uniformly, optionally
over cached encodings (``sdfsmis.latents``), and the stream of batches of each micro-step, seeded by
``(seed, step, process, micro-batch)`` alone so that a resumed run draws what an uninterrupted one
draws."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sdfsmis.errors import InputError
from sdfsmis.training.config import TrainConfig


def step_seed(seed: int, *indices: int) -> int:
    """A 63-bit seed derived from ``(seed, *indices)`` (independent streams per step/rank/role)."""
    state = np.random.SeedSequence([seed, *indices]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class MixedSampler:
    """Episodes from several samplers: each episode picks a sampler uniformly (with ``generator``)."""

    def __init__(self, samplers: Sequence[Any]):
        if not samplers:
            raise ValueError("no episode samplers")
        self.samplers = list(samplers)
        self.device = getattr(self.samplers[0], "device", torch.device("cpu"))

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
        if len(self.samplers) == 1:
            return self.samplers[0].sample(batch_size, generator)
        which = torch.randint(len(self.samplers), (batch_size,), generator=generator,
                              device=generator.device).tolist()
        parts = [self.samplers[i].sample(which.count(i), generator)
                 for i in range(len(self.samplers)) if which.count(i)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def save_cache(self) -> None:
        """Write what the samplers' on-disk latent caches (``TrainConfig.cache_dir``) are missing."""
        for s in self.samplers:
            if hasattr(s, "save"):
                s.save()


def build_sampler(cfg: TrainConfig, device: torch.device | str = "cpu", progress: bool = True,
                  model: nn.Module | None = None) -> MixedSampler:
    """One episode sampler per prepared dataset in ``cfg.data``, mixed uniformly; with
    ``cfg.cache_latents``, each yields cached encodings of ``model``'s frozen encoders."""
    from sdfsmis.data.episodes import EpisodeSampler
    from sdfsmis.data.prepared import PreparedDataset

    if not cfg.data:
        raise InputError(None, "no training data: set data=[PREPARED_DIR, ...]")
    samplers = []
    for path in cfg.data:
        dataset = PreparedDataset(path)
        episodes = cfg.episodes
        if cfg.train_scans == "all":
            episodes = dataclasses.replace(episodes, train_scan_ids=tuple(dataset.scan_ids))
        samplers.append(EpisodeSampler(dataset, episodes, device=device, progress=progress))
    if cfg.cache_latents:
        from sdfsmis.latents import CachedEpisodeSampler

        if model is None:
            raise ValueError("cache_latents needs the model whose encoders fill the cache")
        bf16 = cfg.mixed_precision == "bf16"
        samplers = [CachedEpisodeSampler(s, model, progress=progress, store=cfg.cache_dir or None, bf16=bf16,
                                bank=cfg.cache_bank) for s in samplers]
        if cfg.cache_prefill:
            for s in samplers:
                s.prefill()
    return MixedSampler(samplers)


def sampler_generator(sampler: Any, seed: int) -> torch.Generator:
    gen = torch.Generator(device=getattr(sampler, "device", "cpu"))
    return gen.manual_seed(seed)


#: ``step_seed`` role of the checkpoints' check batch (training batches use five indices, never this).
CHECK_STREAM = 7


def check_batch(sampler: Any, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The fixed batch the checkpoints' empty-model check runs on: ``cfg.batch_size`` episodes drawn
    with a seed of their own, outside the training stream, the same at every checkpoint of the run
    (and after a resume), so that the checks compare like with like."""
    batch = sampler.sample(cfg.batch_size, sampler_generator(sampler, step_seed(cfg.seed, CHECK_STREAM)))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class EpisodeStream(torch.utils.data.IterableDataset):
    """Batches for micro-steps ``start, start+1, ...``; micro-step ``i`` = (step, micro) seeded alone,
    so worker ``w`` of ``n`` yields ``i = w, w+n, ...`` and the DataLoader's round robin keeps order."""

    def __init__(self, sampler: Any, cfg: TrainConfig, rank: int, start: int, stop: int):
        self.sampler, self.cfg, self.rank, self.start, self.stop = sampler, cfg, rank, start, stop

    def batch(self, index: int) -> dict[str, Tensor]:
        step, micro = divmod(index, self.cfg.gradient_accumulation_steps)
        gen = sampler_generator(self.sampler, step_seed(self.cfg.seed, step, self.rank, micro, 0))
        return self.sampler.sample(self.cfg.batch_size, gen)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(self.start + worker, self.stop, n):
            yield self.batch(index)
