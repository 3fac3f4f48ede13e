"""Position controls: the paste predictor, and a probe that moves the query under any predictor.

The protocol tells a predictor which query slices hold the organ and which support slice goes with
each chunk of them (:mod:`sdfsmis.evaluation.protocol`). ``PastePredictor`` uses nothing else: it
returns the support mask (the mean of the ``K`` shots, kept where at least half of them agree),
resized to the query's slice size, for every query slice of the chunk. Its Dice is what knowing
where the organ sits earns without looking at the query; a learned model that does not beat it
has learned position, not appearance. ``sdfsmis evaluate --method paste`` runs it.

``ShiftedQueries`` wraps any predictor: it translates every query slice by ``(dx, dy)`` pixels
before the predictor sees it (the uncovered border filled with the darkest value, -1) and moves the
prediction back, so the metrics stay those of the true query. A predictor that matches what the
organ looks like follows the moved organ and keeps its Dice; one that copies where the support's
mask sits loses it (paste loses it completely where the shift exceeds the organ's width).
``sdfsmis evaluate --query-shift DX DY`` runs it.
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


def translate(x: Tensor, dx: int, dy: int, fill: float) -> Tensor:
    """``[N, H, W]`` moved ``dx`` pixels right and ``dy`` down; uncovered pixels become ``fill``."""
    out = torch.full_like(x, fill)
    h, w = x.shape[-2:]
    src_y, dst_y = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
    src_x, dst_x = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


class ShiftedQueries:
    """``predictor`` run on query slices moved by ``(dx, dy)`` pixels, its masks moved back (module docstring)."""

    def __init__(self, predictor, dx: int, dy: int):
        self.predictor, self.dx, self.dy = predictor, int(dx), int(dy)
        self.name = f"{predictor.name}, query moved ({self.dx}, {self.dy}) px"

    @property
    def config(self):
        return getattr(self.predictor, "config", None)

    def predict(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor,
                spacing=None) -> Tensor:
        from .protocol import takes_spacing

        moved = translate(query_images, self.dx, self.dy, -1.0)
        extra = {"spacing": spacing} if spacing is not None and takes_spacing(self.predictor) else {}
        prob = self.predictor.predict(support_images, support_masks, moved, **extra)
        return translate(torch.as_tensor(prob), -self.dx, -self.dy, 0.0)


__all__ = ["PastePredictor", "ShiftedQueries", "translate"]
