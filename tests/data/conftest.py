"""Synthetic NIfTI helpers shared by the data tests (tiny volumes, seeded)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SPACING = (1.25, 1.25, 4.0)
SHAPE = (40, 40, 10)


def save_nifti(path: Path, array: np.ndarray, spacing=SPACING, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` to ``path`` with a diagonal affine of ``spacing`` unless ``affine`` is given."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_zooms(tuple(spacing)[: np.asarray(array).ndim] + (1.0,) * max(0, np.asarray(array).ndim - 3))
    nib.save(img, str(path))
    return path


def phantom(seed: int = 0, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A body (ellipse, intensity ~100) holding two organs: label 1 (~200) and label 2 (~300).

    Returns ``(image int16, label uint8)``, both ``[X, Y, Z]``; air outside the body is exactly 0.
    Organ 1 spans slices 2..7 (12x20 px), organ 2 slices 3..8 (12x18 px).
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    body2d = ((x - nx / 2 + 0.5) / (0.45 * nx)) ** 2 + ((y - ny / 2 + 0.5) / (0.45 * ny)) ** 2 <= 1
    image = np.zeros(shape, dtype=np.float64)
    image[body2d] = 100.0
    label = np.zeros(shape, dtype=np.uint8)
    label[8:20, 10:30, 2:8] = 1
    label[22:34, 10:28, 3:9] = 2
    image[label == 1] = 200.0
    image[label == 2] = 300.0
    inside = np.broadcast_to(body2d[:, :, None], shape)
    image[inside] += rng.normal(0.0, 2.0, size=int(inside.sum()))
    return np.round(image).astype(np.int16), label


def write_scan(folder: Path, scan_id: str, seed: int = 0, **kw) -> tuple[Path, Path]:
    image, label = phantom(seed)
    return (
        save_nifti(folder / f"image_{scan_id}.nii.gz", image, **kw),
        save_nifti(folder / f"label_{scan_id}.nii.gz", label, **kw),
    )


@pytest.fixture
def scan_folder(tmp_path: Path) -> Path:
    """A source folder with three synthetic scans, ids 1, 2 and 10."""
    src = tmp_path / "source"
    src.mkdir()
    for seed, scan_id in enumerate(["1", "2", "10"]):
        write_scan(src, scan_id, seed=seed)
    return src


@pytest.fixture
def real_data() -> Path:
    root = Path(os.environ.get("SDFSMIS_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
    if not (root / "abd-mri" / "image_2.nii.gz").is_file():
        pytest.skip(f"real data not found under {root}")
    return root


@pytest.fixture
def nifti():
    """Helpers as a fixture (test modules should not import conftest): ``.save``, ``.phantom``, ``.scan``."""

    class Helpers:
        save = staticmethod(save_nifti)
        phantom = staticmethod(phantom)
        scan = staticmethod(write_scan)
        spacing = SPACING
        shape = SHAPE

    return Helpers
