"""``ModelPredictor``: a trained segmenter behind the evaluation protocol's ``Predictor`` interface.

``predict(support_images [K, H, W], support_masks [K, H, W], query_images [N, H', W'], spacing=None)``
(CPU tensors, native slice size, images in [-1, 1], masks {0, 1}) -> [N, H', W'] float32 hard {0, 1}
masks. ``spacing``: ``((support dx, dy), (query dx, dy))`` in mm, which the protocol passes.

Slices go through the slice pipeline shared with ``predict`` and the baseline
(:class:`sdfsmis.inference.slices.SlicePipeline`): one pixel size for support and query, aspect
kept, padding, probabilities resampled back and thresholded with the model's own rule, bf16 autocast
unless ``precision="fp32"``. With ``fast=False`` each batch runs the model's joint path (support
repeated) instead of the prepared-support path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..inference.slices import SlicePipeline, resize


def resize_images(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """[N, 1, H, W] -> [N, 1, *size], bilinear (antialiased when shrinking)."""
    return resize(x, (size, size) if isinstance(size, int) else size)


class ModelPredictor:
    """Adapter from a segmentation model (``SDFSMIS``, ``DiffewS``, ``SDSeg``) to ``Predictor``."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 16,
                 fast: bool = True, precision: str = "auto", progress: bool = False):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.pipeline = SlicePipeline(self.model, self.device, batch_size=batch_size, precision=precision)
        self.batch_size = int(batch_size)
        self.fast = fast
        self.precision = precision
        self.progress = progress
        self.name = str(model.config.method)

    @property
    def config(self):
        """The model's ``ModelConfig`` (method, threshold rule, ...): evaluation summaries record it."""
        return self.model.config

    @torch.inference_mode()
    def probabilities(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor,
                      spacing: Sequence[Sequence[float]] | None = None) -> Tensor:
        """Same inputs as ``predict`` -> [N, H, W] foreground probabilities at native size (CPU)."""
        if support_images.ndim != 3 or support_images.shape != support_masks.shape:
            raise ValueError(f"support images/masks must both be [K, H, W], got {tuple(support_images.shape)} "
                             f"and {tuple(support_masks.shape)}")
        if query_images.ndim != 3:
            raise ValueError(f"query_images must be [N, H, W], got {tuple(query_images.shape)}")
        pipe = self.pipeline
        sp_s, sp_q = (None, None) if spacing is None else spacing
        g_s, g_q, _ = pipe.grids(support_images.shape[1:], query_images.shape[1:], sp_s, sp_q)
        if self.fast or not hasattr(self.model, "forward"):
            cache = pipe.prepare_support(support_images, support_masks, g_s)
            return pipe.probabilities(query_images, cache, g_q)
        s_img = g_s.to_model(support_images).to(self.device)
        s_msk = g_s.masks_to_model(support_masks).to(self.device)
        out = []
        for i in range(0, query_images.shape[0], self.batch_size):
            q = g_q.to_model(query_images[i:i + self.batch_size]).to(self.device)
            n = q.shape[0]
            with pipe.autocast():
                prob = self.model(q, s_img[None].expand(n, -1, -1, -1, -1), s_msk[None].expand(n, -1, -1, -1, -1))
            out.append(g_q.from_model(prob.float().cpu()))
        return torch.cat(out) if out else torch.zeros(0, *query_images.shape[1:])

    def predict(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor,
                spacing: Sequence[Sequence[float]] | None = None) -> Tensor:
        """[K, H, W] supports, [N, H, W] queries -> [N, H, W] float32 hard {0, 1} masks (CPU)."""
        prob = self.probabilities(support_images, support_masks, query_images, spacing)
        return self.pipeline.masks(prob).float()
