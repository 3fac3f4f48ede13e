"""Frozen VAE wrappers with one interface for TAESD (``AutoencoderTiny``) and ``AutoencoderKL``.

Both kinds map images in [-1, 1] to latents in the *scaled* Stable Diffusion latent space and back:

- ``AutoencoderKL``: ``encode`` returns the posterior mean, shifted by ``shift_factor`` (when the
  config has one) and multiplied by ``scaling_factor`` (0.18215 for SD 1.x); ``decode`` undoes it.
- TAESD: its latents are already in the scaled SD range, so they are used as they come. The
  diffusers ``AutoencoderTiny.encode`` maps [-1, 1] -> [0, 1] internally and its ``decode`` maps the
  decoder's [0, 1] output back to [-1, 1]; ``scale_latents`` / ``unscale_latents`` only matter for
  8-bit latent storage and are not used here. The wrapper applies the [-1, 1] <-> [0, 1] mapping
  itself (around ``encoder.layers`` / ``decoder.layers``) so the result does not depend on the
  diffusers gradient-checkpointing branch, which skips that mapping.

Decoded images are clamped to [-1, 1]. Convolutions run on channels-last inputs (oneDNN's fast layout
on the CPU; the weights keep their layout).

Mask latents (``decode_masks``) decode through a lighter, equivalent path for TAESD on the CPU: a predicted
mask latent equals the background latent (the encoding of an empty mask) almost everywhere, and far
from the organ the decoder returns the background. The decoder runs on the whole latent up to its
last upsampling stages; those stages (most of the work: they run at full resolution) run only on a
window around the latent positions that differ from the background, widened by the stages'
receptive field so that every pixel inside the window is exactly what the full decoder gives.
Outside it the decoded empty mask is used. A window whose edge is not background (a mask reaching
past it), or one nearly as large as the slice, is decoded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file
from torch import Tensor, nn

from sdfsmis.errors import InputError
from sdfsmis.models.weights import diffusers_from_pretrained
from sdfsmis.models.mask_decoding import WindowedMaskDecoder

VAEKind = Literal["taesd", "kl"]

#: Folder holding the packaged TAESD weights (MIT, Ollin Boer Bohan, madebyollin/taesd).
TAESD_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "taesd"
TAESD_ENCODER_FILE = "taesd_encoder.safetensors"
TAESD_DECODER_FILE = "taesd_decoder.safetensors"


def channels_last(x: Tensor) -> Tensor:
    """A 4-D tensor in channels-last memory layout (same values)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and put the module in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class FrozenVAE(nn.Module):
    """A frozen autoencoder: ``encode`` [B, 3, H, W] in [-1, 1] -> [B, 4, H/8, W/8] scaled latents;
    ``decode`` the reverse, clamped to [-1, 1].

    ``kind`` is ``"taesd"`` for ``AutoencoderTiny`` and ``"kl"`` for ``AutoencoderKL``. The module
    stays in eval mode even when its parent calls ``.train()``.
    """

    def __init__(self, model: AutoencoderTiny | AutoencoderKL):
        super().__init__()
        if isinstance(model, AutoencoderTiny):
            self.kind: VAEKind = "taesd"
            self.latent_channels = int(model.config.latent_channels)
            self.downsample = 2 ** sum(1 for m in model.encoder.layers
                                       if isinstance(m, nn.Conv2d) and m.stride[0] == 2)
        elif isinstance(model, AutoencoderKL):
            self.kind = "kl"
            self.latent_channels = int(model.config.latent_channels)
            self.downsample = 2 ** (len(model.config.block_out_channels) - 1)
        else:
            raise TypeError(f"FrozenVAE wraps AutoencoderTiny or AutoencoderKL, got {type(model)!r}")
        self.model = freeze(model)

    # The wrapped autoencoder never trains.
    def train(self, mode: bool = True) -> FrozenVAE:  # noqa: D102
        super().train(False)
        return self

    @property
    def scaling_factor(self) -> float:
        """Multiplier from raw KL posterior latents to the SD latent space (1.0 for TAESD)."""
        if self.kind == "kl":
            return float(self.model.config.scaling_factor)
        return 1.0

    @property
    def shift_factor(self) -> float:
        """Offset subtracted from raw KL latents before scaling (0.0 for SD 1.x and TAESD)."""
        if self.kind == "kl":
            return float(getattr(self.model.config, "shift_factor", None) or 0.0)
        return 0.0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, C_lat, H/8, W/8] latents in the scaled SD latent space."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode expects [B, 3, H, W], got {tuple(x.shape)}")
        x = x.to(self.dtype)
        if self.kind == "taesd":
            return self.model.encoder.layers(channels_last(x.add(1).div(2))).contiguous()
        mean = self.model.encode(channels_last(x)).latent_dist.mean.contiguous()
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """[B, C_lat, h, w] scaled latents -> [B, 3, 8h, 8w] images clamped to [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects [B, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        z = z.to(self.dtype)
        if self.kind == "taesd":
            out = self.model.decoder.layers(channels_last(torch.tanh(z / 3) * 3)).mul(2).sub(1)
        else:
            out = self.model.decode(channels_last(z / self.scaling_factor + self.shift_factor)).sample
        return out.clamp(-1.0, 1.0)

    def encode_gray(self, images: Tensor) -> Tensor:
        """[B, 1, H, W] (or [B, H, W]) in [-1, 1] -> latents; the channel is replicated to 3."""
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"encode_gray expects [B, 1, H, W], got {tuple(images.shape)}")
        return self.encode(images.expand(-1, 3, -1, -1))

    def decode_gray(self, z: Tensor) -> Tensor:
        """Latents -> [B, 1, H, W] in [-1, 1]: the decoded image averaged over its 3 channels."""
        return self.decode(z).mean(dim=1, keepdim=True)

    def encode_masks(self, masks: Tensor) -> Tensor:
        """Binary masks [B, 1, H, W] in {0, 1} -> latents of the mask mapped to {-1, 1}."""
        return self.encode_gray(masks * 2.0 - 1.0)

    @torch.no_grad()
    def decode_masks(self, z: Tensor) -> Tensor:
        """Mask latents [B, 4, h, w] -> [B, 1, 8h, 8w] in [-1, 1]: ``decode_gray``'s result, for TAESD on
        the CPU with the full-resolution stages run only around the mask (``sdfsmis.models.mask_decoding``)."""
        decoder = self._mask_decoder
        if decoder is None or z.device.type != "cpu" or z.ndim != 4 or z.shape[1] != self.latent_channels:
            return self.decode_gray(z)  # on a GPU the whole decoder is cheap; windows would cost syncs
        latent, background = self._empty_mask(tuple(z.shape[-2:]), z.device)
        out = decoder.decode(z.to(self.dtype), latent, background)
        return out.mul(2).sub(1).clamp(-1.0, 1.0).mean(dim=1, keepdim=True)

    @property
    def _mask_decoder(self) -> WindowedMaskDecoder | None:
        if self.kind != "taesd":
            return None
        if "_windowed" not in self.__dict__:
            decoder = WindowedMaskDecoder(self.model.decoder.layers)
            self.__dict__["_windowed"] = decoder if decoder.usable else None
        return self.__dict__["_windowed"]

    def _empty_mask(self, size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """(latent of the empty mask [1, C, h, w], the decoder's raw output on it), cached per size,
        device, autocast setting and weights."""
        kind = device.type
        cast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        weights = tuple(p._version for p in (self.model.encoder.layers[0].weight, self.model.decoder.layers[0].weight))
        key = (size, str(device), cast, weights)
        cache = self.__dict__.setdefault("_empty_masks", {})
        if key not in cache:
            mask = torch.zeros(1, 1, size[0] * self.downsample, size[1] * self.downsample, device=device)
            latent = self.encode_masks(mask)
            cache.clear()
            cache[key] = (latent, self.model.decoder.layers(channels_last(torch.tanh(latent / 3) * 3)))
        return cache[key]

    def forward(self, x: Tensor) -> Tensor:
        """Round trip: ``decode(encode(x))``."""
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def taesd_state_dict(encoder_file: str | Path, decoder_file: str | Path) -> dict[str, Tensor]:
    """Read the original TAESD ``nn.Sequential`` weights and rename them to ``AutoencoderTiny`` keys.

    Encoder key ``K`` -> ``encoder.layers.K``; decoder key ``N.rest`` -> ``decoder.layers.{N-1}.rest``
    (the original decoder starts with a parameter-free clamp layer). Values become float32.
    """
    state: dict[str, Tensor] = {}
    for file, prefix, offset in ((encoder_file, "encoder.layers.", 0), (decoder_file, "decoder.layers.", 1)):
        file = Path(file)
        if not file.is_file():
            raise InputError(file, "TAESD weight file not found")
        try:
            raw = load_file(str(file))
        except Exception as exc:  # safetensors raises several error types for corrupt files
            raise InputError(file, f"cannot read safetensors file ({exc})") from exc
        for key, value in raw.items():
            head, _, rest = key.partition(".")
            if not head.isdigit():
                raise InputError(file, f"unexpected TAESD key {key!r}")
            state[f"{prefix}{int(head) - offset}.{rest}"] = value.float()
    return state


def load_taesd(path: str | Path | None = None) -> FrozenVAE:
    """TAESD as a frozen ``FrozenVAE`` (float32).

    ``path`` is a folder holding ``taesd_encoder.safetensors`` and ``taesd_decoder.safetensors``
    (default: the weights packaged with ``sdfsmis``), or a diffusers ``AutoencoderTiny`` folder
    (one with a ``config.json``).
    """
    folder = TAESD_ASSETS if path is None else Path(path)
    if (folder / "config.json").is_file():
        return FrozenVAE(AutoencoderTiny.from_pretrained(str(folder), torch_dtype=torch.float32))
    if not folder.is_dir():
        raise InputError(folder, "TAESD folder not found")
    state = taesd_state_dict(folder / TAESD_ENCODER_FILE, folder / TAESD_DECODER_FILE)
    model = AutoencoderTiny()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(folder, f"TAESD weights do not match AutoencoderTiny: {exc}") from exc
    return FrozenVAE(model.float())


def load_autoencoder_kl(path_or_id: str | Path, subfolder: str | None = "vae",
                        single_file_config: str | Path | None = None) -> FrozenVAE:
    """An ``AutoencoderKL`` from a diffusers folder, a single-file SD checkpoint or a hub id
    (``subfolder`` inside a folder; fp16-only variant folders load too; a single file takes its
    architecture from ``single_file_config`` or a packaged SD config), frozen.

    When ``path_or_id`` is a local folder without ``subfolder`` but with its own ``config.json``,
    the folder itself is used.
    """
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        if subfolder and not (local / subfolder).is_dir() and (local / "config.json").is_file():
            subfolder = None
        target = local / subfolder if subfolder else local
        if not (target / "config.json").is_file():
            raise InputError(target, "no config.json: not a diffusers AutoencoderKL folder")
    model = diffusers_from_pretrained(AutoencoderKL, path_or_id, subfolder or None, "AutoencoderKL",
                                      single_file_config=single_file_config)
    return FrozenVAE(model)


def tiny_autoencoder_kl_config() -> dict:
    """Config of a tiny random ``AutoencoderKL`` with the SD layout (8x downsampling, 4 latents)."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.18215,
    )


def tiny_autoencoder_kl_model(seed: int = 0) -> AutoencoderKL:
    """The raw tiny random ``AutoencoderKL`` (unfrozen), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**tiny_autoencoder_kl_config())


def tiny_autoencoder_kl(seed: int = 0) -> FrozenVAE:
    """A tiny random ``AutoencoderKL`` wrapped as a frozen ``FrozenVAE`` (for tests)."""
    return FrozenVAE(tiny_autoencoder_kl_model(seed))


def tiny_autoencoder_tiny(seed: int = 0) -> FrozenVAE:
    """A tiny random ``AutoencoderTiny`` (8x downsampling, 4 latents, 8 channels) for tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
    return FrozenVAE(model)
