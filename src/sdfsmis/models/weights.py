"""Pretrained weights on disk or on the hub: telling a local path from a hub id, and loading a
diffusers module from a folder, an fp16-variant folder or a single-file checkpoint. Used by the VAE,
the image encoders and the backbones, below all three."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdfsmis.errors import InputError


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def is_local_path(path_or_id: str | Path) -> bool:
    """True where ``path_or_id`` is meant as a local path (it exists, is absolute or starts with
    ``.``/``~``), so a missing one fails at once instead of being looked up as a hub id."""
    text = str(path_or_id)
    return Path(text).exists() or text.startswith((".", "~", "/")) or Path(text).suffix in SINGLE_FILE_SUFFIXES


def check_local(path_or_id: str | Path, what: str) -> None:
    """InputError naming ``path_or_id`` where it is meant as a local path that does not exist."""
    if is_local_path(path_or_id) and not Path(str(path_or_id)).expanduser().exists():
        raise InputError(path_or_id, f"{what} does not exist")


def _variant(folder: Path) -> str | None:
    """``"fp16"`` where a diffusers model folder holds only fp16 variant weights, else ``None``."""
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir()]
    plain = any(n.startswith("diffusion_pytorch_model.") and n.count(".") == 1 for n in names)
    fp16 = any(n.startswith("diffusion_pytorch_model.fp16.") for n in names)
    return "fp16" if fp16 and not plain else None


def diffusers_from_pretrained(cls: Any, path_or_id: str | Path, subfolder: str | None, what: str,
                              weights: bool = True, single_file_config: str | Path | None = None) -> Any:
    """``cls.from_pretrained(path_or_id, subfolder)`` in float32 with diffusers' own loaders:

    - a folder holding only fp16 variant files (``diffusion_pytorch_model.fp16.safetensors``) loads
      with ``variant="fp16"``;
    - a single-file checkpoint (``v1-5-pruned-emaonly.safetensors``) goes through
      ``cls.from_single_file`` with a local config (``single_file_config`` or a packaged SD-1.5 /
      SD-2.1 one; ``sdfsmis.models.single_file``), so nothing is downloaded;
    - ``weights=False`` builds the module from its ``config.json`` alone (random weights that the
      caller replaces, e.g. the UNet of a saved model).
    """
    text = str(path_or_id)
    local = Path(text).expanduser()
    check_local(path_or_id, what)
    try:
        if local.is_file():
            if local.suffix not in SINGLE_FILE_SUFFIXES:
                raise InputError(local, f"expected a diffusers folder or a single-file checkpoint "
                                        f"({', '.join(SINGLE_FILE_SUFFIXES)})")
            from sdfsmis.models.single_file import load_single_file

            model = load_single_file(cls, local, subfolder, single_file_config, weights=weights)
        elif not weights:
            model = cls.from_config(cls.load_config(text, subfolder=subfolder))
        else:
            target = local / subfolder if subfolder else local
            model = cls.from_pretrained(text, subfolder=subfolder, variant=_variant(target))
    except InputError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        hint = ""
        if local.is_file():
            hint = ("; the single file does not match the architecture of its config (pass "
                    "model.backbone.single_file_config=DIR, a diffusers folder of the same model)")
        reason = " ".join(str(exc).split())
        raise InputError(path_or_id, f"cannot load the {what}: {reason[:500]}{hint}") from exc
    return model.float()
