"""Building, saving and loading models.

``build_model(ModelConfig) -> model`` is the one call to get a model (``sdfsmis.models.build``).

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
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sdfsmis import __version__
from sdfsmis.errors import InputError
from sdfsmis.models.backbones import DEFAULT_IMAGE_ENCODER, Backbone, build_backbone
from sdfsmis.models.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXTERNAL_PREFIXES = ("vae.", "image_encoder.")


def build_model(cfg: ModelConfig, backbone: Backbone | None = None) -> nn.Module:
    """The model of ``cfg.method`` (``SDFSMIS``, ``DiffewS`` or ``SDSeg``) on ``cfg.backbone``
    (or on an already built ``backbone``)."""
    if cfg.method == "sdfsmis":
        from sdfsmis.models.sdfsmis import SDFSMIS

        return SDFSMIS(cfg, backbone)
    if cfg.method == "diffews":
        from sdfsmis.models.diffews import DiffewS

        return DiffewS(cfg, backbone)
    if cfg.method == "sdseg":
        from sdfsmis.models.sdseg import SDSeg

        return SDSeg(cfg, backbone)
    raise InputError(None, f"unknown method {cfg.method!r}")


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


def _saved_keys_filter(model: nn.Module):
    external = () if model.config.backbone.tier == "tiny" else EXTERNAL_PREFIXES
    return lambda key: not key.startswith(external)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_pretrained(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created); returns it.

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type, halving the file
    for shipping; ``load_pretrained`` casts them back to the model's float32."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    keep = _saved_keys_filter(model)
    state = {k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items() if keep(k)}
    meta = {"format": "pt", "sdfsmis_version": __version__, "method": model.config.method}
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=meta))
    text = json.dumps(portable_config(model.config), indent=2) + "\n"
    _write_atomic(out / CONFIG_NAME, lambda p: p.write_text(text))
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
    keep = _saved_keys_filter(model)
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
