"""Training configuration: the typed ``TrainConfig`` (with ``OptimConfig``), reading it from a
JSON / TOML file plus ``key.sub=value`` overrides, and writing the resolved config."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdfsmis import atomic
from sdfsmis.data.episodes import EpisodeConfig
from sdfsmis.errors import InputError
from sdfsmis.models.config import ModelConfig
from sdfsmis.typed_config import apply_override, from_dict, to_plain

#: Backbone tiers whose UNet is trained from scratch (and gets ``optim.lr_scratch``).
SCRATCH_TIERS = ("compact", "tiny")


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
RESUME_MUST_MATCH = ("data", "train_scans", "episodes", "model", "batch_size",
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


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    atomic.write_json(path, config_to_dict(cfg))
