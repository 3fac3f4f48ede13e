"""body_z_range: the first and last axial slice where the body (voxels above the volume's Otsu
threshold) covers at least ``min_fraction`` of the slice; the whole range where nothing stands out."""

from __future__ import annotations

import numpy as np
import pytest

from sdfsmis.inference.planning import body_z_range


def _volume(depth: int = 14) -> np.ndarray:
    """Air (-1) around a bright body on slices 3..9; 40 x 40 in-plane."""
    vol = np.full((40, 40, depth), -1.0, np.float32)
    vol[8:32, 10:30, 3:10] = 0.6
    return vol


def test_the_body_slices_are_found():
    assert body_z_range(_volume()) == (3, 9)


def test_slices_below_the_fraction_do_not_count():
    vol = _volume()
    vol[0:4, 0:4, 1] = 0.6  # 16 of 1600 voxels: 1 %, below the default 2 %
    vol[0:8, 0:8, 12] = 0.6  # 64 voxels: 4 %
    assert body_z_range(vol) == (3, 12)
    assert body_z_range(vol, min_fraction=0.005) == (1, 12)
    assert body_z_range(vol, min_fraction=0.2) == (3, 9)  # the body covers 24 x 20 / 1600 = 30 %


def test_the_threshold_is_the_volume_s_own():
    vol = _volume() * 0.1 + 0.5  # another intensity scale: the same slices
    assert body_z_range(vol) == (3, 9)


@pytest.mark.parametrize("vol", [np.zeros((10, 10, 6), np.float32), np.full((10, 10, 6), 0.3, np.float32)])
def test_a_volume_without_contrast_is_all_body(vol):
    assert body_z_range(vol) == (0, 5)
