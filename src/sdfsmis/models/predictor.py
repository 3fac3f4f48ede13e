"""``ModelPredictor``: a trained segmenter behind the evaluation protocol's ``Predictor`` interface.

``predict(support_images [K, H, W], support_masks [K, H, W], query_images [N, H, W])`` (CPU tensors,
native slice size, images in [-1, 1], masks {0, 1}) -> [N, H, W] float32 hard {0, 1} masks.

Steps: images are resized to the model's working size (``model.image_size``, 256 for the real
tiers) bilinearly (antialiased when shrinking), masks by nearest neighbour; with ``fast=True`` the
support branch runs once (``prepare_support``) and the queries go through ``predict_with_support``
in batches of ``batch_size``, otherwise each batch runs the joint path with the support repeated.
The foreground probabilities are resized back to the native size bilinearly and only then
thresholded with the model's own rule (absolute or relative, ``ModelConfig.threshold``), so the
masks keep sub-pixel boundaries instead of nearest-neighbour steps. On CUDA the UNet runs under
bf16 autocast unless ``autocast=False``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def resize_images(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """[N, 1, H, W] -> [N, 1, *size], bilinear (antialiased when shrinking)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_masks(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """[N, 1, H, W] binary masks -> [N, 1, *size], nearest neighbour."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="nearest-exact")


class ModelPredictor:
    """Adapter from a segmentation model (``SDFSMIS``, ``DiffewS``, ``SDSeg``) to ``Predictor``."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", batch_size: int = 16,
                 fast: bool = True, autocast: bool = True, progress: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.fast = fast
        self.autocast = autocast
        self.progress = progress
        self.name = str(model.config.method)

    @property
    def config(self):
        """The model's ``ModelConfig`` (method, threshold rule, ...): evaluation summaries record it."""
        return self.model.config

    def _autocast(self):
        if self.autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def probabilities(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor) -> Tensor:
        """Same inputs as ``predict`` -> [N, H, W] foreground probabilities at native size (CPU)."""
        if support_images.ndim != 3 or support_images.shape != support_masks.shape:
            raise ValueError(f"support images/masks must both be [K, H, W], got {tuple(support_images.shape)} "
                             f"and {tuple(support_masks.shape)}")
        if query_images.ndim != 3:
            raise ValueError(f"query_images must be [N, H, W], got {tuple(query_images.shape)}")
        native = tuple(query_images.shape[-2:])
        size = int(self.model.image_size)
        dev = self.device
        s_img = resize_images(support_images[:, None].float().to(dev), size)
        s_msk = resize_masks(support_masks[:, None].float().to(dev), size)
        out = []
        with self._autocast():
            cache = self.model.prepare_support(s_img, s_msk) if self.fast else None
            starts = range(0, query_images.shape[0], self.batch_size)
            for i in tqdm(starts, disable=not self.progress, desc=self.name, leave=False):
                q = resize_images(query_images[i: i + self.batch_size, None].float().to(dev), size)
                if self.fast:
                    prob = self.model.predict_with_support(q, cache)
                else:
                    n = q.shape[0]
                    prob = self.model(q, s_img[None].expand(n, -1, -1, -1, -1), s_msk[None].expand(n, -1, -1, -1, -1))
                out.append(resize_images(prob.float(), native).clamp(0, 1).cpu())
        if not out:
            return torch.zeros(0, *native)
        return torch.cat(out)[:, 0]

    def predict(self, support_images: Tensor, support_masks: Tensor, query_images: Tensor) -> Tensor:
        """[K, H, W] supports, [N, H, W] queries -> [N, H, W] float32 hard {0, 1} masks (CPU)."""
        prob = self.probabilities(support_images, support_masks, query_images)
        return self.model.threshold(prob).float()
