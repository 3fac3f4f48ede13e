"""Scan intensities -> model input: CT recognition, CT windowing, the protocol's normalisation.

The rules both stages own: ``prepare`` stores what they give, ``predict`` applies them to any scan.

The training data's CT (Abd-CT) was windowed to the abdominal window [-125, 275] HU before it was
stored, and every prepared volume is then normalised by the protocol's rule
(:func:`normalise_image`: z-score, clip to the 0.5/99.5 percentiles, map to
[-1, 1]). A raw-HU CT given to ``predict`` must go through the same window first, or soft tissue is
squashed into a narrow grey band next to air and bone. MR intensities have no absolute scale: they
are only normalised.

CT recognition (``modality="auto"``): a volume is taken as CT in Hounsfield units when at least
5 % of its voxels are at or below -500 (air outside the body and in the lungs is about -1000 HU,
scanner padding -1024 or lower) and its 99th percentile is above 0 (soft tissue). MR magnitudes
are never negative, so no MR volume passes. A CT stored without its rescale intercept (values
0..4095) or already windowed to 0..255 is not recognised; pass ``modality="ct"`` only for values
that are Hounsfield units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError

#: The window of the training data's CT (SSL-ALPNet recipe), in HU.
ABDOMINAL_WINDOW: tuple[float, float] = (-125.0, 275.0)
MODALITIES = ("auto", "ct", "mr")
CLIP_PERCENTILES = (0.5, 99.5)
#: How ``prepare`` records the rule in ``dataset.json``.
NORMALISATION = "zscore, clip to percentiles 0.5/99.5, linear to [-1, 1]"
_AIR_HU = -500.0
_AIR_FRACTION = 0.05


def detect_modality(volume: np.ndarray) -> str:
    """``"ct"`` when ``volume`` looks like CT in Hounsfield units (see the module doc), else ``"mr"``."""
    x = np.asarray(volume)
    sample = x.reshape(-1)[:: max(1, x.size // 2_000_000)].astype(np.float32)  # every voxel up to 2 M
    if sample.size == 0:
        return "mr"
    air = float(np.mean(sample <= _AIR_HU))
    return "ct" if air >= _AIR_FRACTION and float(np.percentile(sample, 99)) > 0.0 else "mr"


def check_window(window: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats; InputError (naming ``--window``) unless finite with lo < hi."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(None, f"--window needs two numbers LO HI, got {window!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise InputError(None, f"--window LO HI needs finite LO < HI, got {lo:g} {hi:g}")
    return lo, hi


def apply_window(volume: np.ndarray, window: Sequence[float] = ABDOMINAL_WINDOW) -> np.ndarray:
    """Clip ``volume`` (HU) to ``window`` -> float32 of the same shape."""
    lo, hi = check_window(window)
    return np.clip(np.asarray(volume, dtype=np.float32), np.float32(lo), np.float32(hi))


def normalise_image(image: np.ndarray, percentiles: tuple[float, float] = CLIP_PERCENTILES) -> np.ndarray:
    """Per-volume z-score, clipped to the percentiles of the z-scored values, mapped to [-1, 1].

    ``image`` ``[X, Y, Z]`` -> float32 of the same shape. If the percentiles coincide (a volume almost
    entirely one value) the full min..max range is used instead.
    """
    x = np.asarray(image, dtype=np.float32)
    mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
    z = (x - np.float32(mean)) / np.float32(std if std > 0 else 1.0)
    lo, hi = (float(v) for v in np.percentile(z, percentiles))
    if hi <= lo:
        lo, hi = float(z.min()), float(z.max())
    if hi <= lo:
        return np.zeros_like(z)
    z = np.clip(z, lo, hi)
    return (z - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)


def model_intensities(volume: np.ndarray, modality: str = "auto",
                      window: Sequence[float] = ABDOMINAL_WINDOW) -> tuple[np.ndarray, str]:
    """A scan's voxels -> (model-ready float32 volume in [-1, 1], the modality used).

    CT (given or recognised) is windowed to ``window`` first; then every volume is normalised by
    the protocol's rule, exactly as the prepare stage does.
    """
    if modality not in MODALITIES:
        raise InputError(None, f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    used = detect_modality(volume) if modality == "auto" else modality
    x = apply_window(volume, window) if used == "ct" else volume
    return normalise_image(x), used
