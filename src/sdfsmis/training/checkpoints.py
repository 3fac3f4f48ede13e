"""Checkpoints of a training run: ``checkpoints/step_XXXXXXX/`` written atomically with the weights,
the optimizer and scheduler, the RNG states and the config; finding the one to resume from; and
starting a run from a saved model (``init_from``)."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sdfsmis import atomic
from sdfsmis.errors import InputError
from sdfsmis.training.config import RESUME_MUST_MATCH, TrainConfig, config_to_dict, save_config
from sdfsmis.training.ema import averaged

log = logging.getLogger("sdfsmis.train")
CHECKPOINT_PREFIX = "step_"


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
        with averaged(ema, params):
            model.save_pretrained(tmp / "model", **as_dtype)
        if cfg.checkpoint_optimizer:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        save_config(cfg, tmp / "config.json")
        state = {"step": step, "time": time.time()}
        if foreground is not None:  # what the model marked on the fixed check batch
            state["foreground"] = dict(foreground)
        (tmp / "state.json").write_text(json.dumps(state) + "\n")

    final = atomic.write_dir(root / _step_dir_name(step), write)
    atomic.write_text(root / "latest", final.name + "\n")
    for old in _complete_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_point(cfg: TrainConfig) -> tuple[Path | None, int]:
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
    differ = [k for k in RESUME_MUST_MATCH if saved.get(k, defaults.get(k)) != current.get(k)]
    if differ:
        raise InputError(saved_path, f"cannot resume: the checkpoint was trained with different "
                                     f"{', '.join(differ)}; use another out_dir, resume=no, or "
                                     f"init_from={ckpt} (its weights, a fresh optimizer)")
    step = int(json.loads((ckpt / "state.json").read_text())["step"])
    if saved.get("iterations") != cfg.iterations:
        log.info("resuming at step %d a run planned for %s steps, now iterations=%d: the learning-rate "
                 "schedule follows the new length", step, saved.get("iterations"), cfg.iterations)
    return ckpt, step


def load_weights(model: nn.Module, folder: Path) -> None:
    """Copy the weights saved by ``save_pretrained`` in ``folder`` into ``model`` (exactly)."""
    saved = type(model).from_pretrained(folder)
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved


def resolve_init_from(value: str) -> Path:
    """The model directory named by ``init_from``: ``"bundled"`` (the packaged model), a folder
    written by ``save_pretrained``, or a run or checkpoint folder (its ``model/``); see
    ``sdfsmis.models.io.model_dir``."""
    from sdfsmis.models.io import model_dir

    return model_dir(value if value == "bundled" else Path(value).expanduser().resolve(), option="init_from")


def init_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Load ``cfg.init_from``'s weights into ``model`` (same architecture required)."""
    from sdfsmis.models.io import load_config as load_model_config

    path = resolve_init_from(cfg.init_from)
    saved_cfg = load_model_config(path)
    if saved_cfg.method != cfg.model.method or saved_cfg.backbone.tier != cfg.model.backbone.tier:
        raise InputError(path / "config.json", f"init_from holds a {saved_cfg.method} model on the "
                         f"{saved_cfg.backbone.tier} tier; set model.method={saved_cfg.method} "
                         f"model.backbone.tier={saved_cfg.backbone.tier} (and the rest of its model config)")
    try:
        load_weights(model, path)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise InputError(path / "config.json", "init_from: the model config differs from this run's "
                         f"model.* settings ({first[0].strip()}); copy its model config") from None
    log.info("starting from the weights of %s with a fresh optimizer (init_from)", path)


def restore_optimisation(ckpt: Path, start: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Optimizer and scheduler state and the RNG states of checkpoint ``ckpt`` (at step ``start``); a
    checkpoint without optimizer state (``checkpoint_optimizer=false``) gets a fresh optimizer and
    the schedule stepped to ``start``."""
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
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
