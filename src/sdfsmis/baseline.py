"""Training-free baseline: prototype matching in a frozen TAESD feature space.

For a support set ``(images [K, H, W], masks [K, H, W])`` and queries ``[N, H', W']`` (images in
[-1, 1], native size):

1. Every slice goes through the slice pipeline shared with ``predict`` and ``evaluate``
   (:mod:`sdfsmis.inference.slices`: one pixel size for support and query, aspect kept, padded
   to 256x256 with -1), is replicated to 3 channels and passed through the frozen TAESD encoder
   (``sdfsmis.models.vae.load_taesd``, weights packaged with sdfsmis).
   The feature space (``BaselineConfig.feature``):

   - ``"features64"`` (default): the 64-channel map at 64x64 (1/4 resolution) after the encoder's
     second downsampling stage (``encoder.layers[:10]``);
   - ``"features32"``: the 64-channel map at 32x32 before the encoder's last conv
     (``encoder.layers[:14]``);
   - ``"latent"``: the 4-channel SD latent at 32x32.

2. Support prototype: masked average of the support features under the mask area-resized to the
   feature grid (the fraction of each cell covered by the mask), one prototype per shot, averaged
   over the ``K`` shots.
3. Cosine similarity between the prototype and each query feature vector, upsampled bilinearly to
   the grid, cropped and resampled to the query's native size.
4. Probability ``sigmoid((similarity - threshold) / temperature)``: exactly 0.5 at the threshold,
   so the protocol's 0.5 cut equals ``similarity >= threshold``.

Choice of feature space and threshold (measured on Abd-MRI, CHAOS ids 1, 2, 3, 5, 8: support 8 ->
queries 1, 2, 3, support 1 -> query 2, support 2 -> query 3; middle support slice, all query organ
slices; mean 3-D Dice over the 4 organs x 5 pairs at the best single threshold of each space):
``features64`` 0.320 at 0.85, ``features32`` 0.310 at 0.80, ``latent`` 0.274 at 0.70. A query
re-estimated prototype (the QE idea of SD-FSMIS, applied training-free) did not help (<= 0.314).
The default threshold of each space is that best value.

Protocol result (Abd-MRI fold 0, support scan 8, queries 1, 2, 3, 5, 1-shot, ``features64``):
Dice spleen 46.00, liver 36.22, LK 31.14, RK 21.57, mean 33.73 %; 2.8 slices/s on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .inference.slices import SliceGrid, common_grids

#: Encoder depth (number of ``encoder.layers`` run) and default similarity threshold per space.
FEATURE_SPACES: dict[str, tuple[int | None, float]] = {
    "features64": (10, 0.85),
    "features32": (14, 0.80),
    "latent": (None, 0.70),
}


@dataclass(frozen=True)
class BaselineConfig:
    feature: str = "features64"  # one of FEATURE_SPACES
    threshold: float | None = None  # cosine-similarity cut; None = the space's default
    temperature: float = 0.02  # width of the sigmoid around the threshold
    size: int = 256  # working size of the encoder input
    batch_size: int = 16  # query slices per encoder call
    device: str = "cpu"
    weights: str | None = None  # TAESD folder; None = the weights packaged with sdfsmis

    def resolved_threshold(self) -> float:
        return FEATURE_SPACES[self.feature][1] if self.threshold is None else float(self.threshold)


class PrototypeBaseline:
    """Training-free few-shot predictor (``Predictor`` interface of the evaluation protocol).

    ``PrototypeBaseline(device="cpu")`` or ``PrototypeBaseline(BaselineConfig(...))``.
    """

    name = "TAESD prototype (training-free)"

    def __init__(self, config: BaselineConfig | None = None, **overrides):
        cfg = replace(config or BaselineConfig(), **overrides)
        if cfg.feature not in FEATURE_SPACES:
            raise InputError(None, f"unknown baseline feature space {cfg.feature!r}; use one of {sorted(FEATURE_SPACES)}")
        if cfg.temperature <= 0 or cfg.batch_size < 1 or cfg.size < 8:
            raise ValueError(f"invalid baseline config {cfg}")
        self.config = replace(cfg, threshold=cfg.resolved_threshold())
        from .models.vae import load_taesd

        self.device = torch.device(cfg.device)
        vae = load_taesd(None if cfg.weights is None else Path(cfg.weights))
        depth = FEATURE_SPACES[cfg.feature][0]
        layers = vae.model.encoder.layers
        self.encoder = (layers if depth is None else layers[:depth]).to(self.device).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def _grid(self, shape: tuple[int, ...], grid: SliceGrid | None) -> SliceGrid:
        return grid or common_grids(shape[-2:], shape[-2:], self.config.size)[0]

    @torch.inference_mode()
    def features(self, images: Tensor, grid: SliceGrid | None = None) -> Tensor:
        """[N, H, W] images in [-1, 1] -> [N, C, h, w] features (C = 64 or 4), computed in batches.
        ``grid``: how the slices become 256x256 (default: square pixels, aspect kept, padded)."""
        grid = self._grid(tuple(images.shape), grid)
        out = []
        for i in range(0, images.shape[0], self.config.batch_size):
            x = grid.to_model(images[i: i + self.config.batch_size].float()).to(self.device)
            out.append(self.encoder(x.expand(-1, 3, -1, -1).add(1).div(2)).float())
        return torch.cat(out)

    @torch.inference_mode()
    def prototype(self, support_images: Tensor, support_masks: Tensor, grid: SliceGrid | None = None) -> Tensor:
        """[K, H, W] images and {0, 1} masks -> [C] prototype (mean over shots of masked averages)."""
        if support_images.ndim != 3 or support_images.shape != support_masks.shape:
            raise InputError(None, f"support images and masks must both be [K, H, W], got "
                                   f"{tuple(support_images.shape)} and {tuple(support_masks.shape)}")
        grid = self._grid(tuple(support_images.shape), grid)
        feats = self.features(support_images, grid)  # [K, C, h, w]
        on_grid = grid.to_model(support_masks.float(), pad_value=0.0).to(self.device)
        weights = F.adaptive_avg_pool2d(on_grid, feats.shape[-2:])
        area = weights.sum(dim=(1, 2, 3))
        if bool((area <= 0).any()):
            empty = [int(k) for k in torch.nonzero(area <= 0).flatten()]
            raise InputError(None, f"support mask(s) {empty} are empty")
        protos = (feats * weights).sum(dim=(2, 3)) / area[:, None]
        return protos.mean(dim=0)

    @torch.inference_mode()
    def similarity(self, prototype: Tensor, query_images: Tensor, grid: SliceGrid | None = None) -> Tensor:
        """[C] prototype, [N, H, W] queries -> [N, H, W] cosine similarity at native size (CPU)."""
        grid = self._grid(tuple(query_images.shape), grid)
        feats = self.features(query_images, grid)
        sim = F.cosine_similarity(feats, prototype.to(feats)[None, :, None, None], dim=1)
        sim = F.interpolate(sim[:, None], size=(grid.size, grid.size), mode="bilinear", align_corners=False)
        return grid.from_model(sim.cpu(), clamp=False)

    def predict(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor,
                spacing: Sequence[Sequence[float]] | None = None) -> Tensor:
        """[K, H, W] supports, [N, H, W] queries -> [N, H, W] float32 foreground probability.
        ``spacing``: ``((support dx, dy), (query dx, dy))`` in mm (default: equal square pixels)."""
        if query_images.ndim != 3:
            raise InputError(None, f"query images must be [N, H, W], got {tuple(query_images.shape)}")
        if query_images.shape[0] == 0:
            return torch.zeros(query_images.shape, dtype=torch.float32)
        sp_s, sp_q = (None, None) if spacing is None else spacing
        g_s, g_q, _ = common_grids(support_images.shape[-2:], query_images.shape[-2:], self.config.size, sp_s, sp_q)
        sim = self.similarity(self.prototype(support_images, support_masks, g_s), query_images, g_q)
        return torch.sigmoid((sim - self.config.threshold) / self.config.temperature).float()
