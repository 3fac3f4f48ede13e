"""Saving and loading models (building one is ``sdfsmis.models.registry.build_model``, exported as
``sdfsmis.models.build``; this module reaches the method classes only through that registry).

Every tool finds and loads a model folder here: :func:`model_dir` (``bundled``, a model folder, a
training run or a checkpoint), :func:`load_model` (with the ``--threshold`` override of
:func:`parse_threshold` and the few-shot check ``predict`` needs).

A saved model is a directory with

- ``model.safetensors``: every parameter and persistent buffer of the model except those of the
  frozen external modules (``vae.*``, ``image_encoder.*``), which ``build_backbone`` re-creates from
  the paths in the config (packaged TAESD, an SD folder, a DINOv2 folder). For the ``tiny`` tier the
  frozen modules are random, so they are saved too;
- ``config.json``: the resolved ``ModelConfig`` (``dataclasses.asdict``), written last. Local
  ``backbone.path`` / ``backbone.image_encoder`` paths are stored absolute, so the model loads from
  any working directory; ``load_pretrained(..., backbone_path=, image_encoder_path=)`` (CLI
  ``--backbone-path`` / ``--image-encoder-path``) points a moved model at the SD / DINOv2 folders.

Loading an ``sd``-tier model reads only the frozen parts (VAE, image encoder) and the UNet's
``config.json`` from the SD folder; the trained UNet comes from ``model.safetensors``.

Both files are written to temporary names and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sdfsmis import __version__, atomic
from sdfsmis.errors import InputError
from sdfsmis.models.backbones import DEFAULT_IMAGE_ENCODER, build_backbone
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.registry import build_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXTERNAL_PREFIXES = ("vae.", "image_encoder.")
#: The model shipped in the package, named ``bundled`` wherever a model folder is asked for.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "model"


def _absolute(value: str | None) -> str | None:
    """A local path made absolute; hub ids and the named encoders (``vae``, ...) unchanged."""
    if not value or value in ("vae", "tiny-dinov2"):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def portable_config(cfg: ModelConfig) -> dict:
    """``cfg.to_dict()`` with local backbone / image-encoder paths made absolute and the tier's
    default image encoder written out (the model records the encoder it was built with)."""
    data = cfg.to_dict()
    data["backbone"]["path"] = _absolute(data["backbone"]["path"])
    bb = data["backbone"]
    bb["image_encoder"] = _absolute(bb["image_encoder"] or DEFAULT_IMAGE_ENCODER.get(bb["tier"]))
    data["backbone"]["single_file_config"] = _absolute(data["backbone"]["single_file_config"])
    return data


def saved_key_filter(model: nn.Module) -> Callable[[str], bool]:
    """Whether a ``state_dict`` key of ``model`` is saved in ``model.safetensors``: all but the frozen
    external modules (``vae.*``, ``image_encoder.*``), which the ``tiny`` tier saves too."""
    external = () if model.config.backbone.tier == "tiny" else EXTERNAL_PREFIXES
    return lambda key: not key.startswith(external)


def save_pretrained(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created); returns it.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type, halving the file
    for shipping; ``load_pretrained`` casts them back to the model's float32."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    keep = saved_key_filter(model)
    state = {k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items() if keep(k)}
    meta = {"format": "pt", "sdfsmis_version": __version__, "method": model.config.method}
    with atomic.replacing(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata=meta)
    atomic.write_json(out / CONFIG_NAME, portable_config(model.config))
    return out


def load_config(directory: str | Path) -> ModelConfig:
    """The ``ModelConfig`` saved in ``directory``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise InputError(path, "not found (not a saved model directory)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read model config ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "model config is not a JSON object")
    try:
        return ModelConfig.from_dict(data)
    except InputError as exc:
        raise InputError(path, exc.problem) from exc
    except TypeError as exc:
        raise InputError(path, f"invalid model config ({exc})") from exc


def _build_for_loading(cfg: ModelConfig, config_path: Path) -> nn.Module:
    """The model of ``cfg`` with its frozen parts loaded and its UNet built from config alone
    (``sd`` tier); a backbone that cannot be loaded is an error naming ``config_path``."""
    bb = cfg.backbone
    try:
        backbone = build_backbone(bb, unet_weights=False) if bb.tier == "sd" else None
    except InputError as exc:
        raise InputError(config_path, f"cannot load the model's backbone (backbone.path={bb.path!r}, "
                                      f"backbone.image_encoder={bb.image_encoder!r}): {exc}; pass "
                                      "--backbone-path DIR / --image-encoder-path DIR (or edit those "
                                      "keys in this file)") from None
    return build_model(cfg, backbone)


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu", *,
                    backbone_path: str | Path | None = None,
                    image_encoder_path: str | Path | None = None) -> nn.Module:
    """Rebuild the model of ``directory/config.json`` and load ``model.safetensors``; eval mode.

    ``backbone_path`` / ``image_encoder_path`` replace the saved ``backbone.path`` /
    ``backbone.image_encoder`` (a model moved to another machine, an SD folder moved)."""
    directory = Path(directory)
    cfg = load_config(directory)
    if backbone_path is not None:
        cfg.backbone.path = str(backbone_path)
    if image_encoder_path is not None:
        cfg.backbone.image_encoder = str(image_encoder_path)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(weights, "not found (not a saved model directory)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise InputError(weights, f"cannot read weights ({exc})") from exc
    model = _build_for_loading(cfg, directory / CONFIG_NAME)
    keep = saved_key_filter(model)
    expected = {k for k in model.state_dict() if keep(k)}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise InputError(weights, f"weights do not match the config: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InputError(weights, f"weights do not match the config: {exc}") from exc
    return model.to(device).eval()


def model_dir(name: str | Path | None, option: str = "--checkpoint", also: Sequence[str] = ()) -> Path:
    """The saved-model folder that ``name`` stands for: ``None`` or ``"bundled"`` (the packaged
    model), a folder written by ``save_pretrained``, or a training run or checkpoint folder (its
    ``model/``). InputError naming the folder (and ``option``, the setting that named it, and the
    other values ``also`` it accepts) otherwise."""
    if name is None or str(name) == "bundled":
        path = BUNDLED_MODEL_DIR
        if not (path / CONFIG_NAME).is_file():
            raise InputError(path, f"no trained default model is bundled yet; pass {option} DIR")
        return path
    path = Path(name).expanduser()
    choices = ", ".join([*(repr(a) for a in also), "'bundled'"])
    hint = f"use {choices}, a model folder, a training run or a checkpoint"
    if not path.is_dir():
        raise InputError(path, f"{option}: model folder does not exist; {hint}")
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise InputError(path, f"{option}: not a trained model directory (no {CONFIG_NAME} with {WEIGHTS_NAME}, "
                           f"here or in model/); {hint}")


def parse_threshold(text: str) -> tuple[str, float]:
    """``RULE:VALUE`` (``absolute:-0.5``, ``relative:0.25``) -> (rule, value); InputError if malformed."""
    rule, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = None
    if rule not in ("absolute", "relative") or number is None:
        raise InputError(None, f"--threshold {text!r}: expected absolute:V (V in [-1, 1]) or relative:F")
    return rule, number


def load_model(name: str | Path | None, device: str | torch.device = "cpu", *,
               backbone_path: str | Path | None = None, image_encoder_path: str | Path | None = None,
               threshold: tuple[str, float] | None = None, few_shot: bool = False,
               option: str = "--checkpoint", also: Sequence[str] = ()) -> nn.Module:
    """The one way the tools load a model: :func:`model_dir` + :func:`load_pretrained`, in eval mode.

    ``threshold`` (rule, value; :func:`parse_threshold`) replaces the saved threshold rule.
    ``few_shot=True`` refuses a model that does not segment by its support (SDSeg ignores the
    support; ``predict`` needs one that uses it). Every failure is an InputError naming the folder.
    """
    path = model_dir(name, option, also)
    # Built on one thread: a model is many tiny operations on which a second thread only waits
    # (2-core CPU under load: 0.2 s on one thread, 0.5-2.2 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_pretrained(path, device=device, backbone_path=backbone_path,
                                image_encoder_path=image_encoder_path)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise InputError(path, f"cannot load the model ({type(err).__name__}: {err})") from None
    finally:
        torch.set_num_threads(threads)
    if few_shot and not getattr(model, "uses_support", False):
        raise InputError(path, f"{type(model).__name__} does not segment by the support (not a few-shot "
                               "model); use an SD-FSMIS or DiffewS model")
    if threshold is not None:
        rule, value = threshold
        model.config.threshold, model.config.threshold_value = rule, float(value)
    return model.eval()
