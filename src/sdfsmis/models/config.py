"""Typed model configuration: one dataclass for the three methods (no subclasses for numbers).

``ModelConfig`` is what ``sdfsmis.models.build`` takes and what ``save_pretrained`` writes to
``config.json`` (``dataclasses.asdict``); ``ModelConfig.from_dict`` reads it back.

Threshold rules (applied to the foreground probability ``p`` in [0, 1], i.e. the decoded mask
averaged over its 3 channels and mapped from [-1, 1] to [0, 1]):

- ``"absolute"``: ``p > (value + 1) / 2`` with ``value`` given in the decoder's [-1, 1] range
  (default 0.0, i.e. ``p > 0.5``; SD-FSMIS and SDSeg).
- ``"relative"``: ``p > value * max(p)`` per image (DiffewS, default ``value`` 0.25). An image whose
  maximum is 0 gives an empty mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from torch import Tensor

from sdfsmis.errors import InputError
from sdfsmis.models.backbones import BackboneConfig

Method = Literal["sdfsmis", "diffews", "sdseg"]
METHODS: tuple[str, ...] = ("sdfsmis", "diffews", "sdseg")
ThresholdRule = Literal["absolute", "relative"]

#: Threshold rule of each method when ``ModelConfig.threshold`` is left at ``None``.
DEFAULT_THRESHOLD: dict[str, tuple[str, float]] = {
    "sdfsmis": ("absolute", 0.0),
    "diffews": ("relative", 0.25),
    "sdseg": ("absolute", 0.0),
}
DEFAULT_VALUE: dict[str, float] = {"absolute": 0.0, "relative": 0.25}


@dataclass
class ModelConfig:
    """Everything that defines a segmentation model.

    method: ``sdfsmis`` | ``diffews`` | ``sdseg``.
    backbone: the UNet / VAE / image-encoder tier (``BackboneConfig``).
    sii, qe, vtct: SD-FSMIS ablation switches (Support Information Injection, Query Enhancement,
        Visual-to-Textual Condition Translator); ignored by the other methods.
    qe_tau: cosine-similarity threshold of QE (0.7).
    timestep: the UNet timestep of the one-step methods (999).
    threshold / threshold_value: the rule turning probabilities into masks (``None``: the method's
        default, see the module docstring); resolved in ``__post_init__``.
    vtct_hidden: hidden width of the VTCT MLP (``None``: ``cross_attention_dim``).
    null_embedding: the cross-attention condition where no VTCT embedding exists (DiffewS, SDSeg,
        SD-FSMIS with ``vtct=False``): ``"zero"`` (a fixed all-zero token [1, 1, D]) or
        ``"learned"`` (a trainable token initialised to zero).
    beta_start, beta_end, beta_schedule, num_train_timesteps: SDSeg's DDPM noise schedule (SD's
        ``scaled_linear`` 0.00085 -> 0.012 over 1000 steps).
    latent_loss_weight: SDSeg's lambda for ``L1(z0_hat, z0)`` (1.0).
    noise_seed: seed of SDSeg's inference noise when no generator is given.
    """

    method: Method = "sdfsmis"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sii: bool = True
    qe: bool = True
    vtct: bool = True
    qe_tau: float = 0.7
    timestep: int = 999
    threshold: ThresholdRule | None = None
    threshold_value: float | None = None
    vtct_hidden: int | None = None
    null_embedding: Literal["zero", "learned"] = "zero"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    latent_loss_weight: float = 1.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if self.method not in METHODS:
            raise InputError(None, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.threshold is None:
            self.threshold, default_value = DEFAULT_THRESHOLD[self.method]
            if self.threshold_value is None:
                self.threshold_value = default_value
        if self.threshold not in DEFAULT_VALUE:
            raise InputError(None, f"unknown threshold rule {self.threshold!r}; use 'absolute' or 'relative'")
        if self.threshold_value is None:
            self.threshold_value = DEFAULT_VALUE[self.threshold]
        if self.null_embedding not in ("zero", "learned"):
            raise InputError(None, f"null_embedding must be 'zero' or 'learned', got {self.null_embedding!r}")
        if not 0 <= self.timestep < self.num_train_timesteps:
            raise InputError(None, f"timestep {self.timestep} outside [0, {self.num_train_timesteps})")
        if not -1.0 <= self.qe_tau <= 1.0:
            raise InputError(None, f"qe_tau {self.qe_tau} is not a cosine similarity")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``dataclasses.asdict``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys raise ``InputError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(None, f"unknown model config keys: {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("backbone"), dict):
            bknown = {f.name for f in fields(BackboneConfig)}
            bad = set(data["backbone"]) - bknown
            if bad:
                raise InputError(None, f"unknown backbone config keys: {sorted(bad)}")
            data["backbone"] = BackboneConfig(**data["backbone"])
        return cls(**data)


def apply_threshold(prob: Tensor, rule: str, value: float) -> Tensor:
    """Foreground probabilities [..., H, W] in [0, 1] -> hard {0, 1} float masks (same shape).

    ``absolute``: ``prob > (value + 1) / 2`` (``value`` in [-1, 1]); ``relative``:
    ``prob > value * max(prob)`` over the last two dims of each image (empty if the max is 0).
    """
    if rule == "absolute":
        return (prob > (value + 1.0) / 2.0).to(prob.dtype)
    if rule == "relative":
        peak = prob.amax(dim=(-2, -1), keepdim=True)
        return ((prob > value * peak) & (peak > 0)).to(prob.dtype)
    raise ValueError(f"unknown threshold rule {rule!r}")


__all__ = ["METHODS", "ModelConfig", "apply_threshold"]
