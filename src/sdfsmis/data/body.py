"""The body mask: the rule ``prepare`` uses to bound the supervoxels and ``predict`` uses to keep
predictions inside the query's body (ADNet / SSL-ALPNet: intensities min-max scaled to 0..255,
above a threshold, largest connected component, holes filled)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def minmax_255(image: np.ndarray) -> np.ndarray:
    """``image`` linearly mapped to 0..255 (float32, same shape); a constant image maps to 0."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image)
    return (image - lo) * np.float32(255.0 / (hi - lo))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(image: np.ndarray, threshold: float = 10.0, per_slice: bool = True) -> np.ndarray:
    """Body mask ``[X, Y, Z]`` bool: ``minmax_255(image) > threshold``, largest connected component,
    holes filled. ``per_slice`` (ADNet / SSL-ALPNet) does both per axial slice; otherwise the largest
    3-D component is kept and holes are filled per slice."""
    fg = minmax_255(image) > threshold
    out = np.zeros_like(fg)
    if not per_slice:
        fg = _largest_component(fg)
    for z in range(fg.shape[2]):
        sl = fg[:, :, z]
        if not sl.any():
            continue
        if per_slice:
            sl = _largest_component(sl)
        out[:, :, z] = ndi.binary_fill_holes(sl)
    return out
