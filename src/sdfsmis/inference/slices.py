"""The one slice pipeline: native 2-D slices -> model input -> probabilities -> masks.

Used by ``predict`` (and so ``demo``), by ``evaluate`` (``sdfsmis.models.predictor.ModelPredictor``)
and by the training-free baseline, so the evaluated figures are the figures of the shipped tool.

- **Grid.** Support and query slices are resampled to one common pixel size, chosen so that the
  larger field of view of the two (pixels x pixel spacing) fills the model's slice size
  (``model.image_size``); each slice keeps its physical aspect ratio and is centre-padded to the
  square grid with -1 (the darkest value; 0 for masks). Without a spacing, pixels are taken as
  square and equal in both scans. Images: bilinear, anti-aliased when shrinking; support masks: the
  same, then ``>= 0.5``.
- **Back.** Probabilities are cropped and resampled bilinearly to the native slice size, clipped
  to [0, 1], then binarised with the model's own threshold rule (:func:`binarise`).
- **Precision.** ``precision="auto"``: bf16 autocast on the CPU and on CUDA (the model's weights
  stay fp32), ``"fp32"`` none. On the bundled model and demo pair bf16 and fp32 masks agree to a
  Dice above 0.98 (``tests/test_slices.py``).
- **Query latents.** Query slices are encoded once per :class:`QueryEncoder` and their latents
  reused by every organ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: Input size for a model that does not record its own ``image_size`` (the bundled model records 128).
DEFAULT_SIZE = 256
PRECISIONS = ("auto", "bf16", "fp32")


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, *size]``, bilinear, anti-aliased when shrinking."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


@dataclass(frozen=True)
class SliceGrid:
    """Maps native slices ``[nx, ny]`` to the model's ``size x size`` grid and back."""

    native: tuple[int, int]
    scaled: tuple[int, int]  # size of the resampled slice inside the grid
    offset: tuple[int, int]  # padding before it
    size: int = DEFAULT_SIZE

    @classmethod
    def fit(cls, native: Sequence[int], spacing: Sequence[float], pixel_mm: float, size: int = DEFAULT_SIZE) -> SliceGrid:
        scaled = tuple(int(min(size, max(1, round(n * s / pixel_mm)))) for n, s in zip(native, spacing))
        offset = tuple((size - n) // 2 for n in scaled)
        native_ = (int(native[0]), int(native[1]))
        return cls(native=native_, scaled=scaled, offset=offset, size=int(size))  # type: ignore[arg-type]

    def to_model(self, slices: torch.Tensor, pad_value: float = -1.0) -> torch.Tensor:
        """``[N, nx, ny]`` images -> ``[N, 1, size, size]``."""
        x = resize(slices[:, None].float(), self.scaled)
        out = torch.full((x.shape[0], 1, self.size, self.size), pad_value, dtype=x.dtype, device=x.device)
        ox, oy = self.offset
        out[:, :, ox:ox + self.scaled[0], oy:oy + self.scaled[1]] = x
        return out

    def masks_to_model(self, masks: torch.Tensor) -> torch.Tensor:
        """``[N, nx, ny]`` {0, 1} masks -> ``[N, 1, size, size]`` {0, 1} (resampled, then >= 0.5)."""
        return (self.to_model(masks, pad_value=0.0) >= 0.5).float()

    def from_model(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """``[N, 1, size, size]`` -> ``[N, nx, ny]`` (cropped, resized back; clipped to [0, 1] by default)."""
        ox, oy = self.offset
        out = resize(x[:, :, ox:ox + self.scaled[0], oy:oy + self.scaled[1]].float(), self.native)[:, 0]
        return out.clamp_(0.0, 1.0) if clamp else out


def common_grids(support_shape: Sequence[int], query_shape: Sequence[int], size: int,
                 support_spacing: Sequence[float] | None = None,
                 query_spacing: Sequence[float] | None = None) -> tuple[SliceGrid, SliceGrid, float]:
    """Grids of support and query slices sharing one pixel size (the larger field of view fills
    ``size``); -> (support grid, query grid, pixel size in mm or in pixels without spacings)."""
    sp_s = tuple(support_spacing or (1.0, 1.0))
    sp_q = tuple(query_spacing or (1.0, 1.0))
    fov = max(float(n) * float(s) for n, s in zip(tuple(support_shape[:2]) + tuple(query_shape[:2]), sp_s + sp_q))
    pixel = fov / size
    return (SliceGrid.fit(support_shape[:2], sp_s, pixel, size), SliceGrid.fit(query_shape[:2], sp_q, pixel, size),
            pixel)


def binarise(model: Any, prob: torch.Tensor) -> torch.Tensor:
    """Hard bool masks from probabilities ``[N, H, W]`` with the model's own rule (``model.threshold``:
    absolute ``p > t`` or DiffewS's relative ``p > f max(p)`` per slice); ``p >= 0.5`` without one."""
    rule = getattr(model, "threshold", None)
    if callable(rule):
        return rule(prob[:, None])[:, 0] > 0.5
    return prob >= 0.5


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CPU / CUDA for ``precision`` "auto" or "bf16"; nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class SlicePipeline:
    """A few-shot latent model (``prepare_support`` / ``predict_with_support``) on native slices."""

    def __init__(self, model: Any, device: str | torch.device = "cpu", batch_size: int = 16,
                 precision: str = "auto"):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        autocast_context(torch.device("cpu"), precision)  # validates
        self.model = model
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.precision = precision
        self.size = int(getattr(model, "image_size", DEFAULT_SIZE))
        self.split = all(hasattr(model, n) for n in ("encode_images", "predict_latents_with_support",
                                                     "probabilities"))

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def grids(self, support_shape: Sequence[int], query_shape: Sequence[int],
              support_spacing: Sequence[float] | None = None,
              query_spacing: Sequence[float] | None = None) -> tuple[SliceGrid, SliceGrid, float]:
        return common_grids(support_shape, query_shape, self.size, support_spacing, query_spacing)

    @torch.inference_mode()
    def prepare_support(self, images: torch.Tensor, masks: torch.Tensor, grid: SliceGrid) -> Any:
        """``[K, nx, ny]`` support images and {0, 1} masks -> the model's support cache."""
        img = grid.to_model(images, pad_value=-1.0).to(self.device)
        msk = grid.masks_to_model(masks).to(self.device)
        with self.autocast():
            return self.model.prepare_support(img, msk)

    @torch.inference_mode()
    def probabilities(self, queries: torch.Tensor, cache: Any, grid: SliceGrid,
                      encoder: QueryEncoder | None = None, keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """``[N, nx, ny]`` query slices -> ``[N, nx, ny]`` probabilities (CPU, float32), in batches.

        With an ``encoder`` and one hashable ``key`` per slice, query latents are taken from (and
        added to) the encoder's cache instead of being encoded again.
        """
        out = []
        for start in range(0, queries.shape[0], self.batch_size):
            ks = None if keys is None else keys[start:start + self.batch_size]
            out.append(self.finish(self.start(queries[start:start + self.batch_size], cache, grid, encoder, ks), grid))
        if not out:
            return torch.zeros(0, *queries.shape[1:])
        return torch.cat(out)

    @torch.inference_mode()
    def start(self, queries: torch.Tensor, cache: Any, grid: SliceGrid, encoder: QueryEncoder | None = None,
              keys: Sequence[Hashable] | None = None) -> torch.Tensor:
        """First half of :meth:`probabilities` for one batch: the predicted mask latents (models with
        ``encode_images`` / ``predict_latents_with_support`` / ``probabilities``), else the model's
        probabilities on the grid. Touches the model's support state: one thread at a time."""
        with self.autocast():
            if self.split:
                z = (encoder or QueryEncoder(self)).latents(queries, grid, keys)
                return self.model.predict_latents_with_support(z, cache)
            return self.model.predict_with_support(grid.to_model(queries, -1.0).to(self.device), cache)

    @torch.inference_mode()
    def finish(self, started: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
        """Second half: :meth:`start`'s output -> ``[N, nx, ny]`` probabilities (CPU, float32). Uses only
        the frozen decoder, so it may run on another thread while :meth:`start` runs the next batch."""
        if self.split:
            with self.autocast():
                started = self.model.probabilities(started)
        return grid.from_model(started.float().cpu())

    def masks(self, prob: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[N, H, W]`` -> bool masks by the model's threshold rule."""
        return binarise(self.model, prob)


class QueryEncoder:
    """Query latents, encoded once per key (a slice index) and reused by every organ.

    :meth:`prefetch` encodes keys ahead of use, from the last needed backwards, so that a second
    thread can take part of the encoding while the first one prepares supports and runs the UNet;
    it stops where it meets keys already encoded. (Two threads may encode one key twice; the
    latents are the same.)
    """

    def __init__(self, pipeline: SlicePipeline):
        self.pipeline = pipeline
        self.cache: dict[Hashable, torch.Tensor] = {}

    def latents(self, queries: torch.Tensor, grid: SliceGrid, keys: Sequence[Hashable] | None) -> torch.Tensor:
        p = self.pipeline
        if keys is None:
            return p.model.encode_images(grid.to_model(queries, -1.0).to(p.device))
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            z = p.model.encode_images(grid.to_model(queries[todo], -1.0).to(p.device))
            self.cache.update(zip((keys[i] for i in todo), z))
        return torch.stack([self.cache[k] for k in keys])

    @torch.inference_mode()
    def prefetch(self, slices: Callable[[list[Hashable]], torch.Tensor], keys: Sequence[Hashable], grid: SliceGrid,
                 batch: int = 4) -> None:
        """Encode ``keys`` (``slices(keys) -> [n, nx, ny]`` query slices) from the last backwards, ``batch``
        at a time, until a batch is found already encoded."""
        p = self.pipeline
        order = list(keys)[::-1]
        for start in range(0, len(order), batch):
            todo = [k for k in order[start:start + batch] if k not in self.cache]
            if not todo:
                return
            with p.autocast():
                z = p.model.encode_images(grid.to_model(slices(todo), -1.0).to(p.device))
            self.cache.update(zip(todo, z))
