"""Reading and validating NIfTI volumes (shared by ``prepare`` and ``predict``).

Every problem with a user's file becomes an :class:`~sdfsmis.errors.InputError` that names the file:
missing, unreadable / not NIfTI, not 3-D, non-finite intensities, constant image, non-integer or
negative label values, label ids that the dataset does not define, image/label shape or affine
mismatch, empty or ambiguous support masks.

Arrays keep the file's voxel order ``[X, Y, Z]`` (axial slices are ``array[:, :, z]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from ..errors import InputError

AFFINE_TOLERANCE = 1e-3  # absolute tolerance on every affine entry (mm)

VolumeKind = Literal["image", "label"]


@dataclass(frozen=True)
class Volume:
    """A validated 3-D volume.

    ``array``: ``[X, Y, Z]``; float32 for images, uint8 (ids <= 255) or int32 for labels.
    ``affine``: 4x4 float64 voxel-to-world matrix. ``spacing``: voxel size in mm along X, Y, Z.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    header: nib.Nifti1Header
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


def _open(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for foreign / corrupt files
        raise InputError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI file (nibabel read it as {type(img).__name__})")
    return img


def _read_array(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except Exception as err:  # truncated gzip, short file, ...
        raise InputError(path, f"unreadable NIfTI data ({type(err).__name__}: {err})") from err


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Accept ``[X, Y, Z]`` and ``[X, Y, Z, 1, ...]`` (trailing singleton axes are squeezed)."""
    if array.ndim > 3 and all(s == 1 for s in array.shape[3:]):
        array = array.reshape(array.shape[:3])
    if array.ndim != 3:
        raise InputError(path, f"needs a 3-D volume [X, Y, Z], got {array.ndim}-D with shape {tuple(array.shape)}")
    if min(array.shape) < 1:
        raise InputError(path, f"empty volume of shape {tuple(array.shape)}")
    return array


def _spacing(img: nib.Nifti1Image, path: Path) -> tuple[float, float, float]:
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise InputError(path, f"invalid voxel spacing {zooms} in the header (pixdim must be positive)")
    return zooms  # type: ignore[return-value]


def check_integer_values(array: np.ndarray, path: str | Path, what: str = "label") -> np.ndarray:
    """Integer-valued, non-negative array as uint8 (max <= 255) or int32; else InputError."""
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError(path, f"{what} file holds NaN or infinite values")
        if not np.array_equal(array, np.round(array)):
            bad = np.unique(array[array != np.round(array)])[:5]
            raise InputError(path, f"{what} values must be integers, found {bad.tolist()}")
    elif array.dtype.kind not in "iu":
        raise InputError(path, f"{what} values must be integers, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise InputError(path, f"{what} values must be non-negative, found {array.min()}")
    top = array.max() if array.size else 0
    if top > np.iinfo(np.int32).max:
        raise InputError(path, f"{what} value {top} is too large")
    return array.astype(np.uint8 if top <= 255 else np.int32)


def load_volume(
    path: str | Path,
    kind: VolumeKind = "image",
    *,
    label_ids: Iterable[int] | None = None,
) -> Volume:
    """Read and validate one NIfTI volume.

    ``kind="image"``: float32 ``[X, Y, Z]``; rejects NaN/inf and constant images.
    ``kind="label"``: integer ids ``[X, Y, Z]``; rejects non-integer or negative values and, when
    ``label_ids`` is given, any id other than 0 and those.
    """
    path = Path(path)
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    img = _open(path)
    array = _as_3d(_read_array(img, path), path)
    spacing = _spacing(img, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(path, "invalid affine (orientation) in the header")
    if kind == "image":
        if array.dtype.kind not in "biuf":
            raise InputError(path, f"image values must be numeric, got dtype {array.dtype}")
        array = array.astype(np.float32, copy=False)
        if not np.all(np.isfinite(array)):
            n_bad = int(np.count_nonzero(~np.isfinite(array)))
            raise InputError(path, f"image holds {n_bad} NaN or infinite values")
        if float(array.max()) == float(array.min()):
            raise InputError(path, f"image is constant (every voxel is {float(array.min())})")
    else:
        array = check_integer_values(array, path, "label")
        if label_ids is not None:
            allowed = {0, *(int(i) for i in label_ids)}
            counts = np.bincount(array.ravel()) if array.dtype == np.uint8 else None
            present = {int(v) for v in (np.flatnonzero(counts) if counts is not None else np.unique(array))}
            unknown = sorted(present - allowed)
            if unknown:
                raise InputError(
                    path, f"label ids {unknown} are not defined by the dataset (allowed: {sorted(allowed)})"
                )
    return Volume(array=array, affine=affine, spacing=spacing, header=img.header, path=path)


def check_pair(
    image: Volume,
    label: Volume,
    image_path: str | Path | None = None,
    label_path: str | Path | None = None,
    *,
    atol: float = AFFINE_TOLERANCE,
) -> None:
    """InputError (naming the label file) unless image and label share shape and affine."""
    image_path = Path(image_path) if image_path is not None else image.path
    label_path = Path(label_path) if label_path is not None else label.path
    if image.shape != label.shape:
        raise InputError(label_path, f"shape {label.shape} differs from the image {image_path.name} {image.shape}")
    diff = float(np.max(np.abs(image.affine - label.affine)))
    if diff > atol:
        raise InputError(
            label_path,
            f"affine differs from the image {image_path.name} by up to {diff:.4g} (tolerance {atol}); "
            "resample the label onto the image grid",
        )


def check_support_mask(
    array: np.ndarray,
    path: str | Path,
    label_id: int | None = None,
) -> np.ndarray:
    """Foreground of a support annotation as a bool array of the same shape.

    Rejects non-integer and negative values. With ``label_id`` the foreground is ``array == label_id``
    (InputError if that id is absent); without it the mask must hold a single positive id.
    Empty masks are an InputError.
    """
    ids = check_integer_values(np.asarray(array), path, "mask")
    present = sorted(int(v) for v in np.unique(ids) if v != 0)
    if not present:
        raise InputError(path, "mask is empty (no foreground voxel)")
    if label_id is None:
        if len(present) > 1:
            raise InputError(path, f"mask holds several label ids {present}; choose one")
        return ids > 0
    if int(label_id) not in present:
        raise InputError(path, f"label id {label_id} is absent from the mask (present: {present})")
    return ids == int(label_id)
