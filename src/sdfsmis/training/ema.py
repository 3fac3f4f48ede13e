"""The exponential moving average of the trainable weights (``ema_decay > 0``): diffusers'
``EMAModel``, resumed from ``ema.pt``, and a context in which the model holds the averaged weights
(what checkpoints' ``model/``, the final model and validation see)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("sdfsmis.train")


def make_ema(params: Sequence[Tensor], decay: float, ckpt: Path | None, device: torch.device) -> Any | None:
    """``EMAModel`` over ``params`` (``None`` when ``decay`` is 0), resumed from ``ckpt/ema.pt``
    when the checkpoint has one."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=decay)
    if ckpt is not None and (ckpt / "ema.pt").is_file():
        ema.load_state_dict(torch.load(ckpt / "ema.pt", map_location=device, weights_only=False))
    elif ckpt is not None:
        log.info("no ema.pt in %s: the average starts from the resumed weights", ckpt)
    return ema


@contextlib.contextmanager
def averaged(ema: Any | None, params: Sequence[Tensor]) -> Iterator[None]:
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
