"""The position-only control: paste the support's mask onto every query slice.

The protocol tells a predictor which query slices hold the organ and which support slice goes with
each chunk of them (:mod:`sdfsmis.evaluation.protocol`). ``PastePredictor`` uses nothing else: it
returns the support mask (the mean of the ``K`` shots, kept where at least half of them agree),
resized to the query's slice size, for every query slice of the chunk. Its Dice is what knowing
where the organ sits earns without looking at the query; a learned model that does not beat it
has learned position, not appearance. ``sdfsmis evaluate --method paste`` runs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class PastePredictor:
    """The protocol's ``Predictor`` that ignores the images (module docstring)."""

    name = "paste"

    def predict(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor) -> Tensor:
        """``[K, H, W]`` support masks -> ``[N, H', W']`` copies of their majority mask at the query size."""
        mask = support_masks.float().mean(0)[None, None]
        mask = F.interpolate(mask, size=tuple(query_images.shape[-2:]), mode="bilinear", align_corners=False)
        return (mask[0, 0] >= 0.5).float().expand(query_images.shape[0], -1, -1).clone()


__all__ = ["PastePredictor"]
