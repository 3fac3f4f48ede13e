"""The training stage: episodic training of a segmentation model with HF ``accelerate``.

``load_config(file, overrides) -> TrainConfig`` builds a typed config from a JSON/TOML file plus
``key.sub=value`` overrides; ``train(cfg) -> Path`` runs it and returns the final model folder.
This module holds the training loop; the rest is in ``sdfsmis.training``: ``config`` (the typed
config, loading and saving it), ``sampling`` (episode samplers and the seeded batch stream),
``checkpoints`` (writing, finding and resuming checkpoints, ``init_from``), ``ema`` (the weight
average) and ``records`` (``log.csv``, ``invocations.csv``, the loss plot, the foreground check).

Layout of ``out_dir``::

    config.json                      the resolved TrainConfig of the run
    log.csv                          step, loss, lr (the largest group's), lr_backbone, lr_new,
                                     grad_norm, sec_per_step, episodes_per_s
    invocations.csv                  one row per call of ``train`` (a run, or each part of a resumed
                                     one): steps, wall time, median step time, iterations/s, peak memory
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

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdfsmis import atomic
from sdfsmis.errors import InputError
from sdfsmis.models.config import ModelConfig
from sdfsmis.training.checkpoints import (
    CHECKPOINT_PREFIX,
    init_weights,
    latest_checkpoint,
    load_weights,
    resolve_init_from,
    restore_optimisation,
    resume_point,
    save_checkpoint,
)
from sdfsmis.training.config import (
    SCRATCH_TIERS,
    OptimConfig,
    TrainConfig,
    config_to_dict,
    load_config,
    save_config,
)
from sdfsmis.training.ema import averaged, make_ema
from sdfsmis.training.records import (
    EMPTY_FRACTION,
    INVOCATION_COLUMNS,
    LOG_COLUMNS,
    LossWindow,
    append_row,
    foreground_check,
    invocation_row,
    plot_loss,
    run_validation,
    truncate_log,
    warn_if_empty,
)
from sdfsmis.training.sampling import EpisodeStream, MixedSampler, build_sampler, check_batch, step_seed

__all__ = [
    "CHECKPOINT_PREFIX", "EMPTY_FRACTION", "INVOCATION_COLUMNS", "LOG_COLUMNS", "SCRATCH_TIERS", "MixedSampler",
    "OptimConfig", "TrainConfig", "build_sampler", "config_to_dict", "foreground_check", "latest_checkpoint",
    "load_config", "plot_loss", "resolve_init_from", "save_checkpoint", "save_config", "step_seed", "train",
    "warn_if_empty",
]

log = logging.getLogger(__name__)


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
    from tqdm.auto import tqdm

    entered = time.perf_counter()
    out_dir, accelerator = Path(cfg.out_dir), _accelerator(cfg)
    main, rank, accum = accelerator.is_main_process, accelerator.process_index, cfg.gradient_accumulation_steps
    ckpt, start = resume_point(cfg)
    if main:
        _open_out_dir(cfg, out_dir, start)
    accelerator.wait_for_everyone()
    model, optimizer, scheduler = _model_and_optimiser(cfg, model_factory, ckpt, start, accelerator.device)
    loss_module, optimizer = accelerator.prepare(_LossModule(model), optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    ema = make_ema(trainable, cfg.ema_decay, ckpt, accelerator.device)

    stop = cfg.iterations if max_steps is None else min(cfg.iterations, max_steps)
    if sampler_factory is None:
        def sampler_factory(c: TrainConfig, d: torch.device) -> MixedSampler:
            return build_sampler(c, d, progress=progress, model=model)
    sampler = sampler_factory(cfg, accelerator.device if cfg.num_workers == 0
                              else torch.device("cpu")) if start < stop else None
    batches = _batches(EpisodeStream(sampler, cfg, rank, start * accum, stop * accum), cfg, start < stop)
    window = LossWindow(accelerator, cfg.batch_size * accum * accelerator.num_processes)
    bar = tqdm(total=cfg.iterations, initial=start, disable=not (progress and main), desc="train",
               dynamic_ncols=True)
    step, started, out_of_time, grad_norm = start, time.perf_counter(), False, float("nan")
    for step in range(start + 1, stop + 1):
        for micro in range(accum):
            batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(batches).items()}
            torch.manual_seed(step_seed(cfg.seed, step - 1, rank, micro, 1))
            loss, norm = _micro_step(accelerator, loss_module, batch, optimizer, trainable, ema, cfg.optim.grad_clip)
            grad_norm = grad_norm if norm is None else norm
            window.add(loss / accum)
        scheduler.step()
        window.steps += 1
        bar.update(1)
        out_of_time = _out_of_time(cfg, started, accelerator)
        if out_of_time:
            log.info("time limit of %.0f s reached at step %d", cfg.time_limit_s, step)
            stop = step
        if step % cfg.log_every == 0 or step == stop:
            window.write(out_dir / "log.csv" if main else None, step, optimizer, grad_norm, bar)
        with window.paused():  # validation and checkpoints do not count as step time
            if validate is not None and cfg.validate_every and step % cfg.validate_every == 0:
                if main:
                    with averaged(ema, trainable):
                        run_validation(validate, accelerator, loss_module, out_dir, step)
                accelerator.wait_for_everyone()
            if step % cfg.checkpoint_every == 0 or step == cfg.iterations or out_of_time:
                if main:
                    _checkpoint(cfg, out_dir, step, accelerator.unwrap_model(loss_module).model,
                                check_batch(sampler, cfg, accelerator.device), sampler, optimizer, scheduler, ema, trainable)
                accelerator.wait_for_everyone()
        if out_of_time:
            break
    bar.close()
    if main and step > start:
        append_row(out_dir / "invocations.csv", INVOCATION_COLUMNS,
                   invocation_row(start, step, time.perf_counter() - entered, window.seconds, accelerator))

    if stop < cfg.iterations and not out_of_time:
        return latest_checkpoint(out_dir) or out_dir
    return _final_model(cfg, out_dir, accelerator, accelerator.unwrap_model(loss_module).model, ema, trainable)


# ------------------------------------------------------------------------------ pieces of the loop
class _LossModule(nn.Module):
    """``forward(batch) = model.training_loss(batch)``: lets DDP and autocast see the loss call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.training_loss(batch)


def _accelerator(cfg: TrainConfig) -> Any:
    """The ``accelerate.Accelerator`` of the run (precision, accumulation, determinism)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    _allow_new_precision(cfg.mixed_precision)
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun / accelerate launch use gloo on CPUs
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _open_out_dir(cfg: TrainConfig, out_dir: Path, start: int) -> None:
    """Create ``out_dir``, remove temporaries of killed runs, write ``config.json`` and drop the log
    rows after the step resumed from."""
    ckpt_root = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root.mkdir(exist_ok=True)
    for stale in [*ckpt_root.glob(".tmp-*"), *out_dir.glob(".tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    save_config(cfg, out_dir / "config.json")
    truncate_log(out_dir / "log.csv", start)
    truncate_log(out_dir / "validation.csv", start)


def _model_and_optimiser(cfg: TrainConfig, model_factory: Callable | None, ckpt: Path | None, start: int,
                         device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The model (frozen random parts of test tiers seeded by ``cfg.seed``; weights from the
    checkpoint or ``init_from``), its AdamW optimizer and learning-rate schedule, resumed from ``ckpt``."""
    from diffusers.optimization import get_scheduler

    if model_factory is None:
        from sdfsmis.models import build as model_factory
    torch.manual_seed(cfg.seed)
    model = model_factory(cfg.model)
    if ckpt is not None:
        raw = ckpt / "training_model"
        load_weights(model, raw if raw.is_dir() else ckpt / "model")
    elif cfg.init_from:
        init_weights(model, cfg)
    size = getattr(model, "image_size", None)
    if size is not None and size != cfg.episodes.image_size:
        raise InputError(None, f"episodes.image_size={cfg.episodes.image_size} but the model works "
                               f"at {size} px: set episodes.image_size={size}")
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay,
                                  fused=True if device.type == "cuda" else None)
    scheduler = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.iterations)
    if ckpt is not None:
        restore_optimisation(ckpt, start, optimizer, scheduler)
        log.info("resuming from %s (step %d of %d)", ckpt, start, cfg.iterations)
    return model, optimizer, scheduler


def _batches(stream: EpisodeStream, cfg: TrainConfig, any_left: bool) -> Iterator[dict[str, Tensor]]:
    """The stream's batches, drawn in ``cfg.num_workers`` DataLoader workers when there are any."""
    if cfg.num_workers > 0 and any_left:
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                                persistent_workers=False))
    return iter(stream)


def _micro_step(accelerator: Any, loss_module: nn.Module, batch: dict[str, Tensor],
                optimizer: torch.optim.Optimizer, trainable: list[Tensor], ema: Any | None,
                grad_clip: float) -> tuple[Tensor, Tensor | None]:
    """Forward, backward and (on the last micro-batch of a step) the clipped optimizer step and the
    EMA update; returns the loss and the gradient norm (``None`` when no optimizer step was taken)."""
    norm = None
    with accelerator.accumulate(loss_module):
        loss = loss_module(batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and accelerator.sync_gradients:
            ema.step(trainable)
    return loss, norm


def _checkpoint(cfg: TrainConfig, out_dir: Path, step: int, model: nn.Module, check: Mapping[str, Any],
                sampler: Any, optimizer: torch.optim.Optimizer, scheduler: Any, ema: Any | None,
                trainable: list[Tensor]) -> None:
    """Save the samplers' new cached encodings, check what the model marks on the fixed ``check``
    batch, write the checkpoint and redraw the loss plot (main process)."""
    if hasattr(sampler, "save_cache"):
        sampler.save_cache()
    with averaged(ema, trainable):
        marked = foreground_check(model, check)
    warn_if_empty(marked, f"checkpoint at step {step}")
    save_checkpoint(out_dir, step, model, optimizer, scheduler, cfg, cfg.keep_checkpoints, ema, trainable,
                    foreground=marked)
    plot_loss(out_dir / "log.csv", out_dir / "loss.png")


def _final_model(cfg: TrainConfig, out_dir: Path, accelerator: Any, model: nn.Module, ema: Any | None,
                 trainable: list[Tensor]) -> Path:
    """Write ``out_dir/model`` (the averaged weights with EMA, and ``train_config.json``)."""
    final = out_dir / "model"
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            with averaged(ema, trainable):
                model.save_pretrained(tmp)
            save_config(cfg, tmp / "train_config.json")

        atomic.write_dir(final, write)
        plot_loss(out_dir / "log.csv", out_dir / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


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


def _out_of_time(cfg: TrainConfig, started: float, accelerator: Any) -> bool:
    """True once ``cfg.time_limit_s`` has passed (on any process, so that all stop together)."""
    if cfg.time_limit_s <= 0:
        return False
    over = time.perf_counter() - started > cfg.time_limit_s
    if accelerator.num_processes == 1:
        return over
    return bool(accelerator.reduce(torch.tensor(float(over), device=accelerator.device), "max").item())
