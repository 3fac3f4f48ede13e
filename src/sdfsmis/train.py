"""The training stage: episodic training of a segmentation model with HF ``accelerate``.

``load_config(file, overrides) -> TrainConfig`` builds a typed config from a JSON/TOML file plus
``key.sub=value`` overrides; ``train(cfg) -> Path`` runs it and returns the final model folder.

Layout of ``out_dir``::

    config.json                      the resolved TrainConfig of the run
    log.csv                          step, loss, lr (the largest group's), lr_backbone, lr_new,
                                     grad_norm, sec_per_step, episodes_per_s
    sittings.csv                     one row per sitting (a run, or each part of a resumed one):
                                     steps, wall time, median step time, iterations/s, peak memory
    loss.png                         loss curve (rewritten at every checkpoint and at the end)
    validation.csv                   what the optional validation hook returned
    checkpoints/latest               text file naming the newest complete checkpoint
    checkpoints/step_0001000/        model/ (save_pretrained), optimizer.pt (optimizer + scheduler),
                                     rng.pt, state.json (step), config.json; with ``ema_decay``
                                     also training_model/ (the raw weights) and ema.pt
    model/                           the final model (save_pretrained), loadable by the predictor

With ``ema_decay > 0`` the trainer keeps an exponential moving average of the trainable weights
(``diffusers.training_utils.EMAModel``: decay ``min(ema_decay, (1 + n) / (10 + n))`` after ``n``
optimizer steps) and every ``model/`` (checkpoints, the final model) and validation hold the
average; training continues from the raw weights in ``training_model/``.

Determinism and exact resume: the episodes of step ``s`` come from a generator seeded with
``(seed, s, process, micro-batch)`` and the global torch RNG (noise, dropout inside the model) is
reseeded from the same tuple before every forward pass, so nothing depends on what happened before
step ``s`` except the weights and the optimizer/scheduler state, which the checkpoints hold
exactly. A run interrupted after step ``k`` and resumed from an earlier checkpoint ends with the
same weights as an uninterrupted run, bit for bit, given the same hardware, thread count and
process count (``deterministic=true`` additionally asks torch for deterministic GPU kernels).

Usage: ``sdfsmis train --config FILE [key.sub=value ...]`` (e.g. ``iterations=2000
model.backbone.tier=compact data=a,b``); rerunning the same command resumes. Multi-GPU (or
multi-process CPU): ``accelerate launch [--num_processes N] -m sdfsmis.cli train --config FILE``.
Each process draws its own episodes (seeded by its rank), so the global batch is
``batch_size x gradient_accumulation_steps x num_processes``; the learning-rate schedule counts
optimizer steps and does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from sdfsmis.data.episodes import EpisodeConfig
from sdfsmis.errors import InputError
from sdfsmis.models.config import ModelConfig
from sdfsmis.typed_config import apply_override, from_dict, to_plain

log = logging.getLogger(__name__)

#: Backbone tiers whose UNet is trained from scratch (and gets ``optim.lr_scratch``).
SCRATCH_TIERS = ("compact", "tiny")
LOG_COLUMNS = ("step", "loss", "lr", "lr_backbone", "lr_new", "grad_norm", "sec_per_step", "episodes_per_s")
SITTING_COLUMNS = ("start_step", "end_step", "wall_s", "median_step_s", "iterations_per_s",
                   "peak_memory_mib", "memory", "device", "processes")
CHECKPOINT_PREFIX = "step_"


# --------------------------------------------------------------------------------------- config
@dataclass
class OptimConfig:
    """AdamW and learning-rate schedule (paper recipe by default).

    ``lr_backbone`` is for a pretrained UNet, ``lr_new`` for new layers (VTCT MLP, SII attention,
    widened input convs), ``lr_scratch`` replaces ``lr_backbone`` when the backbone tier is one whose
    UNet starts from random weights (compact, tiny). ``schedule`` is a ``diffusers`` scheduler name
    (constant, constant_with_warmup, linear, cosine, ...). ``grad_clip <= 0`` disables clipping.
    """

    weight_decay: float = 1e-2
    lr_backbone: float = 1e-5
    lr_new: float = 5e-5
    lr_scratch: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    """Everything a training run needs; saved (resolved) as ``config.json`` beside every checkpoint.

    ``data`` lists prepared-dataset folders (several: episodes are drawn from each with equal
    probability). ``train_scans="fold"`` trains on the scans outside ``episodes.fold`` (or on
    ``episodes.train_scan_ids``); ``"all"`` on every scan of every dataset (a general model that is
    not evaluated by cross-validation). ``episodes.image_size`` must equal the model's working
    size (256 for ``sd``/``compact``, 32 for ``tiny``). ``resume`` is ``"auto"`` (the latest
    checkpoint in ``out_dir`` if any), ``"no"``, or the path of a checkpoint folder.
    ``mixed_precision="bf16"`` autocasts on a GPU and on the CPU (about 1.5x faster on a CPU with
    AVX-512 BF16, ``benchmarks/cpu_precision.py``; ``"no"`` keeps fp32). ``num_workers > 0``
    draws episodes in DataLoader worker processes (with a CPU sampler). ``time_limit_s > 0`` ends
    training after that many seconds of this process (checkpoint and final model at the step
    reached; the learning-rate schedule still follows ``iterations``). ``cache_latents`` feeds the
    model cached encodings of its frozen encoders (``sdfsmis.latents``; needs ``num_workers=0``;
    augmentation is then geometric only, applied to the encodings): much faster where encoding
    dominates, e.g. on a CPU. ``cache_dir`` keeps those encodings on disk, shared by every run on
    the same prepared data and encoders (other folds, resumed runs; ``sdfsmis.latents``).
    ``cache_bank = N`` also encodes N intensity-augmented copies of every slice (gamma, contrast,
    bias field, noise of ``episodes.augment``) and draws each episode image from one of them;
    ``cache_prefill`` encodes every drawable mask before the first step, in batches on all threads.
    ``init_from`` (a saved model directory, or ``"bundled"`` for the packaged model) starts a new run
    from those weights with a fresh optimizer (fine-tuning; the model config must describe the same
    architecture); a resumed run takes its weights from the checkpoint instead.
    ``checkpoint_optimizer=false`` leaves the optimizer state out of checkpoints (an SD-1.5
    checkpoint shrinks from about 10.3 GB to 3.4 GB, benchmarks/checkpoint_disk.py; resuming then
    starts a fresh optimizer) and
    ``checkpoint_fp16=true`` stores the checkpoints' weights in float16 (half again; a resumed run
    continues from the rounded weights). The final ``model/`` is always float32.
    """

    data: list[str] = field(default_factory=list)
    train_scans: Literal["fold", "all"] = "fold"
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    iterations: int = 15000
    seed: int = 42
    mixed_precision: Literal["no", "bf16"] = "bf16"
    gradient_checkpointing: bool = False
    deterministic: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    validate_every: int = 0
    out_dir: str = "runs/train"
    num_workers: int = 0
    resume: str = "auto"
    time_limit_s: float = 0.0
    cache_latents: bool = False
    cache_dir: str = ""
    cache_bank: int = 0
    cache_prefill: bool = False
    ema_decay: float = 0.0
    init_from: str = ""
    checkpoint_optimizer: bool = True
    checkpoint_fp16: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "iterations", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.validate_every < 0 or self.time_limit_s < 0:
            raise ValueError("num_workers, validate_every and time_limit_s must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.cache_latents and self.num_workers:
            raise ValueError("cache_latents needs num_workers=0 (the cache lives beside the model)")
        if (self.cache_dir or self.cache_bank or self.cache_prefill) and not self.cache_latents:
            raise ValueError("cache_dir, cache_bank and cache_prefill need cache_latents=true")
        if self.cache_bank < 0:
            raise ValueError(f"cache_bank must be >= 0, got {self.cache_bank}")
        if self.cache_latents and self.model.method == "sdseg":
            raise ValueError("cache_latents does not apply to model.method=sdseg: its condition "
                             "encoder is trained, so every step needs the images")


#: Sections that must match when resuming from a checkpoint written by another config: what the run
#: learns from and with. ``optim`` too: the checkpoint's optimizer state holds its learning rates,
#: which would silently win over new ones; ``cache_latents`` / ``cache_bank`` change the encodings
#: and the random stream of the episodes. ``iterations`` may change (a run extended or shortened; the
#: learning-rate schedule follows the new length from the resumed step, and the console says so).
_RESUME_MUST_MATCH = ("data", "train_scans", "episodes", "model", "batch_size",
                      "gradient_accumulation_steps", "seed", "optim", "cache_latents", "cache_bank")


def config_to_dict(cfg: TrainConfig) -> dict:
    """The config as a JSON-able nested dict (what ``config.json`` holds)."""
    return to_plain(cfg)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a JSON (``.json``) or TOML (``.toml``) config, apply ``key.sub=value`` overrides.

    Missing keys take the defaults (the paper's recipe). Relative ``data``, ``out_dir``,
    ``cache_dir`` and ``init_from`` paths are resolved against the current directory. Raises
    ``InputError`` naming the file on bad input (an experiment plan names run_experiments.py).
    """
    source = Path(path) if path is not None else None
    tree: dict = {}
    if source is not None:
        if not source.is_file():
            raise InputError(source, "config file does not exist")
        try:
            if source.suffix.lower() == ".toml":
                tree = tomllib.loads(source.read_text())
            else:
                tree = json.loads(source.read_text())
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise InputError(source, f"cannot parse config: {err}") from err
        if not isinstance(tree, dict):
            raise InputError(source, "config must be a JSON object / TOML table")
        if "runs" in tree and "base" in tree:
            raise InputError(source, "this is an experiment plan (keys 'base' and 'runs'), not a training "
                                     f"config: run it with 'python scripts/run_experiments.py {source}'")
    try:
        for override in overrides:
            apply_override(tree, TrainConfig, override)
        cfg = from_dict(TrainConfig, tree)
    except ValueError as err:
        raise InputError(source, str(err)) from err
    cfg.data = [str(Path(p).expanduser().resolve()) for p in cfg.data]
    cfg.out_dir = str(Path(cfg.out_dir).expanduser().resolve())
    if cfg.cache_dir:
        cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().resolve())
    if cfg.init_from and cfg.init_from != "bundled":
        cfg.init_from = str(Path(cfg.init_from).expanduser().resolve())
    return cfg


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    _write_json_atomic(Path(path), config_to_dict(cfg))


# ------------------------------------------------------------------------------ seeding and data
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
        from sdfsmis.latents import LatentCache

        if model is None:
            raise ValueError("cache_latents needs the model whose encoders fill the cache")
        bf16 = cfg.mixed_precision == "bf16"
        samplers = [LatentCache(s, model, progress=progress, store=cfg.cache_dir or None, bf16=bf16,
                                bank=cfg.cache_bank) for s in samplers]
        if cfg.cache_prefill:
            for s in samplers:
                s.prefill()
    return MixedSampler(samplers)


def _sampler_generator(sampler: Any, seed: int) -> torch.Generator:
    gen = torch.Generator(device=getattr(sampler, "device", "cpu"))
    return gen.manual_seed(seed)


class _EpisodeStream(torch.utils.data.IterableDataset):
    """Batches for micro-steps ``start, start+1, ...``; micro-step ``i`` = (step, micro) seeded alone,
    so worker ``w`` of ``n`` yields ``i = w, w+n, ...`` and the DataLoader's round robin keeps order."""

    def __init__(self, sampler: Any, cfg: TrainConfig, rank: int, start: int, stop: int):
        self.sampler, self.cfg, self.rank, self.start, self.stop = sampler, cfg, rank, start, stop

    def batch(self, index: int) -> dict[str, Tensor]:
        step, micro = divmod(index, self.cfg.gradient_accumulation_steps)
        gen = _sampler_generator(self.sampler, step_seed(self.cfg.seed, step, self.rank, micro, 0))
        return self.sampler.sample(self.cfg.batch_size, gen)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(self.start + worker, self.stop, n):
            yield self.batch(index)


class _LossModule(nn.Module):
    """``forward(batch) = model.training_loss(batch)``: lets DDP and autocast see the loss call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.training_loss(batch)


# ------------------------------------------------------------------------------------ checkpoints
def _step_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def _complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders (holding state.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [d for d in ckpt_root.iterdir() if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX)
            and d.name[len(CHECKPOINT_PREFIX):].isdigit() and (d / "state.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint named by ``checkpoints/latest`` (or the newest complete one), else ``None``."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "state.json").is_file():
            return target
    found = _complete_checkpoints(root)
    return found[-1] if found else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` (replacing an older one) with renames only."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_dir_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder with ``write(tmp)`` and rename it to ``final``; on any error
    the temporary folder is removed and ``final`` is left as it was."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextlib.contextmanager
def _averaged(ema: Any | None, params: Sequence[Tensor]) -> Iterator[None]:
    """Inside the block the model holds the EMA weights (without ``ema``: unchanged)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, cfg: TrainConfig, keep: int, ema: Any | None = None,
                    params: Sequence[Tensor] = (), foreground: Mapping[str, float] | None = None) -> Path:
    """Write ``checkpoints/step_XXXXXXX/`` atomically, point ``latest`` at it, keep the last ``keep``.
    With ``ema`` (over ``params``), ``model/`` holds the averaged weights and ``training_model/`` the raw."""
    root = out_dir / "checkpoints"

    # models without the dtype option (stand-ins) are called as before
    as_dtype = {"dtype": torch.float16} if cfg.checkpoint_fp16 else {}

    def write(tmp: Path) -> None:
        if ema is not None:
            model.save_pretrained(tmp / "training_model", **as_dtype)
            torch.save(ema.state_dict(), tmp / "ema.pt")
        with _averaged(ema, params):
            model.save_pretrained(tmp / "model", **as_dtype)
        if cfg.checkpoint_optimizer:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        save_config(cfg, tmp / "config.json")
        state = {"step": step, "time": time.time()}
        if foreground is not None:  # what the model marked on the fixed check batch
            state["foreground"] = dict(foreground)
        (tmp / "state.json").write_text(json.dumps(state) + "\n")

    final = _write_dir_atomic(root / _step_dir_name(step), write)
    pointer_tmp = root / f".latest.tmp{os.getpid()}"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / "latest")
    for old in _complete_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_point(cfg: TrainConfig) -> tuple[Path | None, int]:
    """(checkpoint folder to resume from or ``None``, its step) following ``cfg.resume``."""
    ckpt: Path | None = None
    if cfg.resume not in ("auto", "no"):
        ckpt = Path(cfg.resume)
        if not (ckpt / "state.json").is_file():
            raise InputError(ckpt, "not a complete checkpoint folder (no state.json)")
    elif cfg.resume == "auto":
        ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is None:
        return None, 0
    saved_path = ckpt / "config.json"
    saved, current = json.loads(saved_path.read_text()), config_to_dict(cfg)
    defaults = config_to_dict(TrainConfig())  # keys older checkpoints do not have yet
    differ = [k for k in _RESUME_MUST_MATCH if saved.get(k, defaults.get(k)) != current.get(k)]
    if differ:
        raise InputError(saved_path, f"cannot resume: the checkpoint was trained with different "
                                     f"{', '.join(differ)}; use another out_dir, resume=no, or "
                                     f"init_from={ckpt} (its weights, a fresh optimizer)")
    step = int(json.loads((ckpt / "state.json").read_text())["step"])
    if saved.get("iterations") != cfg.iterations:
        log.info("resuming at step %d a run planned for %s steps, now iterations=%d: the learning-rate "
                 "schedule follows the new length", step, saved.get("iterations"), cfg.iterations)
    return ckpt, step


def _load_weights(model: nn.Module, folder: Path) -> None:
    """Copy the weights saved by ``save_pretrained`` in ``folder`` into ``model`` (exactly)."""
    saved = type(model).from_pretrained(folder)
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved


#: A model whose predicted foreground is below this fraction of the true foreground "marks nothing".
EMPTY_FRACTION = 0.05


#: ``step_seed`` role of the checkpoints' check batch (training batches use five indices, never this).
CHECK_STREAM = 7


def check_batch(sampler: Any, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The fixed batch the checkpoints' empty-model check runs on: ``cfg.batch_size`` episodes drawn
    with a seed of their own, outside the training stream, the same at every checkpoint of the run
    (and after a resume), so that the checks compare like with like."""
    batch = sampler.sample(cfg.batch_size, _sampler_generator(sampler, step_seed(cfg.seed, CHECK_STREAM)))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def foreground_check(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float] | None:
    """How much the model marks on an episode batch, with its own threshold rule: predicted and
    true foreground pixels and the highest probability; ``None`` for models without the latent
    path (stand-ins). Eval mode, global RNG untouched."""
    needed = ("episode_from_batch", "predict_latents", "probabilities", "threshold")
    if not all(hasattr(model, name) for name in needed):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            prob = model.probabilities(model.predict_latents(model.episode_from_batch(dict(batch))))
            if "query_masks" in batch:
                truth = batch["query_masks"].float() > 0.5
            else:
                truth = model.probabilities(batch["query_mask_latents"].float()) > 0.5
    finally:
        model.train(was_training)
    marked = float(model.threshold(prob).sum())
    true = float(truth.sum())
    return {"predicted_px": marked, "true_px": true, "max_probability": float(prob.max())}


def warn_if_empty(check: Mapping[str, float] | None, where: str) -> bool:
    """Log a warning where ``check`` says the model marks (almost) nothing; True if it did."""
    if not check or check["true_px"] <= 0 or check["predicted_px"] >= EMPTY_FRACTION * check["true_px"]:
        return False
    log.warning("%s: the model marks almost nothing on a fixed batch of training episodes (%d px predicted for %d "
                "true, highest probability %.3f): it is not usable yet; train longer, raise the learning "
                "rate, or start from a trained model (init_from=bundled)", where, check["predicted_px"],
                check["true_px"], check["max_probability"])
    return True


def resolve_init_from(value: str) -> Path:
    """The model directory named by ``init_from``: ``"bundled"`` (the packaged model) or a folder
    written by ``save_pretrained`` (a run's ``model/`` or a checkpoint's ``model/``)."""
    from sdfsmis.predict import DEFAULT_MODEL_DIR

    path = DEFAULT_MODEL_DIR if value == "bundled" else Path(value).expanduser().resolve()
    if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "model"  # a checkpoint folder
    elif (path / "model" / "model.safetensors").is_file():
        path = path / "model"  # a run folder (its config.json is the training config)
    if not (path / "model.safetensors").is_file():
        raise InputError(path, "init_from: not a saved model directory (no model.safetensors); use "
                               "'bundled', a run's model/ folder or a checkpoint folder")
    return path


def _init_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Load ``cfg.init_from``'s weights into ``model`` (same architecture required)."""
    from sdfsmis.models.io import load_config as load_model_config

    path = resolve_init_from(cfg.init_from)
    saved_cfg = load_model_config(path)
    if saved_cfg.method != cfg.model.method or saved_cfg.backbone.tier != cfg.model.backbone.tier:
        raise InputError(path / "config.json", f"init_from holds a {saved_cfg.method} model on the "
                         f"{saved_cfg.backbone.tier} tier; set model.method={saved_cfg.method} "
                         f"model.backbone.tier={saved_cfg.backbone.tier} (and the rest of its model config)")
    try:
        _load_weights(model, path)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise InputError(path / "config.json", "init_from: the model config differs from this run's "
                         f"model.* settings ({first[0].strip()}); copy its model config") from None
    log.info("starting from the weights of %s with a fresh optimizer (init_from)", path)


# ----------------------------------------------------------------------------------------- logs
def _truncate_log(path: Path, after_step: int) -> None:
    """Drop rows logged after ``after_step`` (work lost by an interruption) from a CSV log."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= after_step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    os.replace(tmp, path)


def _append_row(path: Path, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append ``row``; a log started with other columns (an older run resumed) keeps its own."""
    new = not path.is_file()
    if not new:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        columns = header or columns
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in columns})


def plot_loss(log_csv: str | Path, png: str | Path) -> Path | None:
    """Loss (and its running mean) against step from ``log.csv`` to ``png``; ``None`` if no rows."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    log_csv, png = Path(log_csv), Path(png)
    if not log_csv.is_file():
        return None
    with log_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("loss")]
    if not rows:
        return None
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    smooth = np.array([loss[max(0, i - 9): i + 1].mean() for i in range(len(loss))])
    from matplotlib.ticker import FuncFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.95)
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="running mean (10 logs)")
    if np.all(loss > 0):
        ax.set_yscale("log")  # plain tick labels: mathtext ones are slow to lay out
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    tmp = png.with_name(f".{png.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# ---------------------------------------------------------------------------------------- train
def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    tier = getattr(getattr(cfg.model, "backbone", None), "tier", None)
    lr_backbone = cfg.optim.lr_scratch if tier in SCRATCH_TIERS else cfg.optim.lr_backbone
    groups = []
    for group in model.parameter_groups(lr_backbone, cfg.optim.lr_new):
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            groups.append({**group, "params": params})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def _default_model_factory() -> Callable[[ModelConfig], nn.Module]:
    import sdfsmis.models as models

    build = getattr(models, "build", None)
    if build is None:
        from sdfsmis.models.io import build_model as build
    return build


def _allow_new_precision(precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    ``mixed_precision``; clear that state (not the distributed set-up) so that several runs with
    different precisions can follow each other in one process (tests, notebooks)."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    for target in (getattr(model, "unet", None), model):
        if target is not None and hasattr(target, "enable_gradient_checkpointing"):
            target.enable_gradient_checkpointing()
            return
    log.warning("gradient_checkpointing requested but the model has no UNet that supports it")


def train(cfg: TrainConfig, *, progress: bool = True, max_steps: int | None = None,
          validate: Callable[[nn.Module, int], Mapping[str, float] | None] | None = None,
          model_factory: Callable[[ModelConfig], nn.Module] | None = None,
          sampler_factory: Callable[[TrainConfig, torch.device], Any] | None = None) -> Path:
    """Train ``cfg.model`` on episodes from ``cfg.data``; returns ``out_dir/model``.

    Resumes from the latest checkpoint in ``out_dir`` (``resume="auto"``) or ``cfg.resume``.
    ``max_steps`` stops after that global step without a final save (an interruption; returns the
    latest checkpoint folder, or ``out_dir`` if none). ``validate(model, step)`` runs every
    ``validate_every`` steps on the main process in eval mode without gradients; the floats it
    returns go to ``validation.csv``. ``model_factory`` (default ``sdfsmis.models.build``) and
    ``sampler_factory`` (default ``build_sampler``) can be replaced, e.g. in tests. A run that fails
    before its first checkpoint (bad data, a config the model refuses) removes the ``out_dir`` it
    created, so a config error leaves nothing behind.
    """
    out_dir = Path(cfg.out_dir)
    fresh = not out_dir.exists()
    try:
        return _train(cfg, progress=progress, max_steps=max_steps, validate=validate,
                      model_factory=model_factory, sampler_factory=sampler_factory)
    except (InputError, ValueError):
        if fresh and latest_checkpoint(out_dir) is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, *, progress: bool, max_steps: int | None, validate: Callable | None,
           model_factory: Callable | None, sampler_factory: Callable | None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    if model_factory is None:
        model_factory = _default_model_factory()
    if sampler_factory is None:
        def sampler_factory(c: TrainConfig, d: torch.device) -> MixedSampler:
            return build_sampler(c, d, progress=progress, model=model)  # the model built below
    entered = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    precision = cfg.mixed_precision
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    _allow_new_precision(precision)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch use gloo on CPUs
        mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    rank = accelerator.process_index
    ckpt_root = out_dir / "checkpoints"

    ckpt, start = _resume_point(cfg)

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(exist_ok=True)
        for stale in [*ckpt_root.glob(".tmp-*"), *out_dir.glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        save_config(cfg, out_dir / "config.json")
        _truncate_log(out_dir / "log.csv", start)
        _truncate_log(out_dir / "validation.csv", start)
    accelerator.wait_for_everyone()

    # model (frozen random parts of test tiers are seeded), optimizer, scheduler
    torch.manual_seed(cfg.seed)
    model = model_factory(cfg.model)
    if ckpt is not None:
        raw = ckpt / "training_model"
        _load_weights(model, raw if raw.is_dir() else ckpt / "model")
    elif cfg.init_from:
        _init_weights(model, cfg)
    size = getattr(model, "image_size", None)
    if size is not None and size != cfg.episodes.image_size:
        raise InputError(None, f"episodes.image_size={cfg.episodes.image_size} but the model works "
                               f"at {size} px: set episodes.image_size={size}")
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model.to(accelerator.device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay,
                                  fused=True if accelerator.device.type == "cuda" else None)
    scheduler = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.iterations)
    if ckpt is not None:
        if (ckpt / "optimizer.pt").is_file():
            state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping the schedule without optimizer steps
                for _ in range(start):
                    scheduler.step()
            log.warning("%s holds no optimizer state (checkpoint_optimizer=false): the optimizer "
                        "starts afresh at step %d", ckpt, start)
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
        log.info("resuming from %s (step %d of %d)", ckpt, start, cfg.iterations)
    loss_module, optimizer = accelerator.prepare(_LossModule(model), optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    ema = None
    if cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=cfg.ema_decay)
        if ckpt is not None and (ckpt / "ema.pt").is_file():
            ema.load_state_dict(torch.load(ckpt / "ema.pt", map_location=accelerator.device, weights_only=False))
        elif ckpt is not None:
            log.info("no ema.pt in %s: the average starts from the resumed weights", ckpt)

    stop = cfg.iterations if max_steps is None else min(cfg.iterations, max_steps)
    accum = cfg.gradient_accumulation_steps
    sampler = sampler_factory(cfg, accelerator.device if cfg.num_workers == 0
                              else torch.device("cpu")) if start < stop else None
    stream = _EpisodeStream(sampler, cfg, rank, start * accum, stop * accum)
    if cfg.num_workers > 0 and start < stop:
        batches: Iterator = iter(torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False))
    else:
        batches = iter(stream)

    episodes_per_step = cfg.batch_size * accum * accelerator.num_processes
    bar = tqdm(total=cfg.iterations, initial=start, disable=not (progress and main),
               desc="train", dynamic_ncols=True)
    window_loss = torch.zeros((), device=accelerator.device)
    window_steps, window_start, grad_norm = 0, time.perf_counter(), float("nan")
    window_seconds: list[float] = []  # mean step time of each logged window of this sitting
    step, started, out_of_time = start, time.perf_counter(), False
    for step in range(start + 1, stop + 1):
        for micro in range(accum):
            batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(batches).items()}
            torch.manual_seed(step_seed(cfg.seed, step - 1, rank, micro, 1))
            with accelerator.accumulate(loss_module):
                loss = loss_module(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
                    grad_norm = accelerator.clip_grad_norm_(trainable, clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None and accelerator.sync_gradients:
                    ema.step(trainable)
            window_loss += loss.detach().float() / accum
        scheduler.step()
        window_steps += 1
        bar.update(1)

        out_of_time = _out_of_time(cfg, started, accelerator)
        if out_of_time:
            log.info("time limit of %.0f s reached at step %d", cfg.time_limit_s, step)
            stop = step
        if step % cfg.log_every == 0 or step == stop:
            mean_loss = accelerator.reduce(window_loss, "mean").item() / window_steps
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
            seconds = (time.perf_counter() - window_start) / window_steps
            window_seconds.append(seconds)
            lr = max(g["lr"] for g in optimizer.param_groups)
            if main:
                _append_row(out_dir / "log.csv", LOG_COLUMNS, {
                    "step": step, "loss": f"{mean_loss:.6g}", "lr": f"{lr:.6g}",
                    **{f"lr_{g['name']}": f"{g['lr']:.6g}" for g in optimizer.param_groups if "name" in g},
                    "grad_norm": f"{float(grad_norm):.6g}", "sec_per_step": f"{seconds:.4g}",
                    "episodes_per_s": f"{episodes_per_step / seconds:.4g}"})
            bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.2g}")
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()

        paused = time.perf_counter()  # validation and checkpoints do not count as step time
        if validate is not None and cfg.validate_every and step % cfg.validate_every == 0:
            if main:
                with _averaged(ema, trainable):
                    _run_validation(validate, accelerator, loss_module, out_dir, step)
            accelerator.wait_for_everyone()
        if step % cfg.checkpoint_every == 0 or step == cfg.iterations or out_of_time:
            if main:
                if hasattr(sampler, "save_cache"):
                    sampler.save_cache()
                unwrapped = accelerator.unwrap_model(loss_module).model
                with _averaged(ema, trainable):
                    check = foreground_check(unwrapped, check_batch(sampler, cfg, accelerator.device))
                warn_if_empty(check, f"checkpoint at step {step}")
                save_checkpoint(out_dir, step, unwrapped, optimizer, scheduler, cfg, cfg.keep_checkpoints,
                                ema, trainable, foreground=check)
                plot_loss(out_dir / "log.csv", out_dir / "loss.png")
            accelerator.wait_for_everyone()
        window_start += time.perf_counter() - paused
        if out_of_time:
            break
    bar.close()
    if main and step > start:
        _append_row(out_dir / "sittings.csv", SITTING_COLUMNS,
                    _sitting_row(start, step, time.perf_counter() - entered, window_seconds, accelerator))

    if stop < cfg.iterations and not out_of_time:
        return latest_checkpoint(out_dir) or out_dir
    final = out_dir / "model"
    if main:
        def write(tmp: Path) -> None:
            with _averaged(ema, trainable):
                accelerator.unwrap_model(loss_module).model.save_pretrained(tmp)
            save_config(cfg, tmp / "train_config.json")

        _write_dir_atomic(final, write)
        plot_loss(out_dir / "log.csv", out_dir / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _sitting_row(start: int, end: int, wall_s: float, window_seconds: Sequence[float],
                 accelerator: Any) -> dict[str, Any]:
    """What ``sittings.csv`` records of one sitting. The wall time runs from the call of ``train`` (model
    build, data loading and encoding included) to the last step; the median step time is over the
    logged windows. Peak memory: the CUDA allocator's peak on a GPU, the process's peak resident set
    on a CPU."""
    device = accelerator.device
    if device.type == "cuda":
        name, kind = torch.cuda.get_device_name(device), "cuda_allocated"
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource  # Unix; ru_maxrss is in KiB on Linux

        name, kind = "cpu", "process_rss"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = float(np.median(window_seconds)) if window_seconds else float("nan")
    return {"start_step": start, "end_step": end, "wall_s": f"{wall_s:.1f}", "median_step_s": f"{median:.4g}",
            "iterations_per_s": f"{1 / median:.4g}", "peak_memory_mib": f"{peak:.0f}", "memory": kind,
            "device": name, "processes": accelerator.num_processes}


def _out_of_time(cfg: TrainConfig, started: float, accelerator: Any) -> bool:
    """True once ``cfg.time_limit_s`` has passed (on any process, so that all stop together)."""
    if cfg.time_limit_s <= 0:
        return False
    over = time.perf_counter() - started > cfg.time_limit_s
    if accelerator.num_processes == 1:
        return over
    return bool(accelerator.reduce(torch.tensor(float(over), device=accelerator.device), "max").item())


def _run_validation(validate: Callable, accelerator: Any, loss_module: nn.Module, out_dir: Path,
                    step: int) -> None:
    model = accelerator.unwrap_model(loss_module).model
    model.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            result = validate(model, step)
    finally:
        model.train()
    if result:
        row = {"step": step, **{k: f"{float(v):.6g}" for k, v in result.items()}}
        _append_row(out_dir / "validation.csv", list(row), row)
