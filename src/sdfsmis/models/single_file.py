"""Single-file Stable Diffusion checkpoints (``v1-5-pruned-emaonly.safetensors``), loaded offline.

diffusers' ``from_single_file`` converts a checkpoint in the original (LDM) key layout with the
architecture named by a diffusers config, which it fetches from the hub unless given ``config=``.
Here it is always given, so nothing is downloaded:

- ``BackboneConfig.single_file_config``: a diffusers-layout folder of the same architecture
  (``unet/config.json`` and ``vae/config.json``; weight files are not read), or by default
- the packaged configs of SD-1.5 and SD-2.1 (``assets/sd_configs/sd15``, ``sd21``: the published
  ``unet/`` and ``vae/`` configs of ``stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-2-1``),
  picked by diffusers' own ``infer_diffusers_model_type`` from the checkpoint's keys.

``sdfsmis.models.single_file_writer`` writes the inverse (tiny random checkpoints for tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from sdfsmis.errors import InputError

SD_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "sd_configs"
#: diffusers' model type of a single-file checkpoint -> packaged config folder.
PACKAGED_CONFIGS = {"v1": "sd15", "v2": "sd21"}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The state dict of a single-file checkpoint (``.safetensors``, or a pickled ``.ckpt``)."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # safetensors / pickle raise many types for a damaged file
        raise InputError(path, f"cannot read the single-file checkpoint: {' '.join(str(exc).split())}") from exc


def config_folder(path: Path, checkpoint: dict[str, Tensor] | None, override: str | Path | None) -> Path:
    """The diffusers config folder for the single file ``path``: ``override`` or a packaged one."""
    if override:
        folder = Path(override).expanduser()
        if not folder.is_dir():
            raise InputError(folder, "model.backbone.single_file_config: not a folder")
        return folder
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    model_type = infer_diffusers_model_type(checkpoint if checkpoint is not None else read_checkpoint(path))
    name = PACKAGED_CONFIGS.get(model_type)
    if name is None:
        raise InputError(path, f"a single-file {model_type!r} checkpoint: only SD-1.x and SD-2.x configs are "
                               "packaged; pass model.backbone.single_file_config=DIR (a diffusers folder of the "
                               "same architecture; its unet/ and vae/ config.json files suffice)")
    return SD_CONFIGS / name


def load_single_file(cls: Any, path: Path, subfolder: str | None, config: str | Path | None = None,
                     weights: bool = True) -> Any:
    """``cls`` (``UNet2DConditionModel`` / ``AutoencoderKL``) from the single file ``path``, its
    architecture from ``config_folder``; ``weights=False`` builds it from the config alone."""
    checkpoint = None if (config and not weights) else read_checkpoint(path)
    folder = config_folder(path, checkpoint, config)
    if not (folder / (subfolder or "") / "config.json").is_file():
        raise InputError(folder / (subfolder or ""), "no config.json: not a diffusers config folder")
    if not weights:
        return cls.from_config(cls.load_config(str(folder), subfolder=subfolder))
    return cls.from_single_file(checkpoint, config=str(folder), subfolder=subfolder, local_files_only=True)
