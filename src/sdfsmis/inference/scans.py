"""Reading the three volumes of ``predict`` and cutting them into slices (:mod:`.geometry`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .geometry import SliceAxis, align_to, normal_angle, slice_axis, to_file_order, to_slice_order

MAX_LABEL = 65535  # output is uint8, or uint16 above 255
MIN_SUPPORT_VOXELS = 10  # fewer voxels of an organ in the support: warned about


@dataclass
class Oriented:
    """A volume in slice order (slices ``data[:, :, k]``, see :mod:`.geometry`) plus the way back."""

    path: Path
    data: np.ndarray  # [nx, ny, n_slices]; float32 (images) or integer ids (labels)
    affine: np.ndarray  # 4x4 affine of ``data``
    file_affine: np.ndarray  # 4x4 affine of the file
    file_shape: tuple[int, int, int]  # shape in the file's voxel order
    header: Any  # the file's NIfTI header (copied into the output)
    cut: SliceAxis

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


@dataclass
class Inputs:
    support: Oriented
    mask: Oriented
    query: Oriented
    labels: list[int]
    warnings: list[str]
    slice_angle_deg: float = 0.0  # angle between the support's and the query's slice normals


def orient(vol: Any, axis: str = "auto", cut: SliceAxis | None = None) -> Oriented:
    """A checked ``sdfsmis.data.nifti.Volume`` cut along ``axis`` (or along ``cut``)."""
    affine = np.asarray(vol.affine, np.float64)
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        raise InputError(vol.path, "invalid affine in the header: the voxel axes are degenerate (singular)")
    cut = cut or slice_axis(affine, axis)
    arr = np.asarray(vol.array)
    arr = arr.astype(np.float32 if arr.dtype.kind == "f" else np.int32, copy=False)
    data, new_affine = to_slice_order(arr, affine, cut)
    return Oriented(path=Path(vol.path), data=data, affine=new_affine, file_affine=affine,
                    file_shape=tuple(int(n) for n in arr.shape), header=vol.header, cut=cut)  # type: ignore[arg-type]


def to_original(sliced: np.ndarray, volume: Oriented) -> np.ndarray:
    """Map an array in ``volume``'s slice order back to the file's voxel order."""
    out = to_file_order(sliced, volume.cut)
    assert out.shape == volume.file_shape, (out.shape, volume.file_shape)
    return out


def load_inputs(support_image: str | Path, support_mask: str | Path, query: str | Path,
                labels: Sequence[int] | None = None, axis: str = "auto") -> Inputs:
    """Read, check and cut the three input volumes; raise :class:`InputError` on bad input.

    The shared reader (``sdfsmis.data.nifti.load_volume``) checks each file (exists, readable 3-D
    NIfTI, finite, non-constant image, non-negative integer labels); here: the mask matches the support
    image in shape and affine, is not empty, holds every id of ``labels`` and no id above 65535; the
    affines are not degenerate; slices are at least 8x8 voxels. The support's in-plane axes follow
    the query's (:func:`.geometry.align_to`). Degenerate but usable inputs (a query of one slice, an
    organ of fewer than 10 voxels in the support, support and query slices more than 45 degrees
    apart) are warned about (``warnings.warn`` and ``Inputs.warnings``).
    """
    from ..data.nifti import check_pair, check_support_mask, load_volume
    from .geometry import AXES

    if axis not in AXES:
        raise InputError(None, f"--axis must be one of {', '.join(AXES)}, got {axis!r}")
    s_vol = load_volume(support_image, "image")
    m_vol = load_volume(support_mask, "label")
    q_vol = load_volume(query, "image")
    check_pair(s_vol, m_vol)
    present = [int(v) for v in np.unique(m_vol.array) if v != 0]
    if not present:
        raise InputError(support_mask, "support mask is empty (no voxel has a label id > 0)")
    if present[-1] > MAX_LABEL:
        raise InputError(support_mask, f"label id {present[-1]} is above {MAX_LABEL}")
    if labels is None:
        chosen = present
    else:
        try:
            chosen = sorted({int(v) for v in labels})
        except (TypeError, ValueError):
            raise InputError(support_mask, f"--labels must be integer label ids, got {labels!r}") from None
        if not chosen:
            raise InputError(support_mask, "the list of --labels to segment is empty")
        for label in chosen:
            check_support_mask(m_vol.array, support_mask, label)
    qvol = orient(q_vol, axis)
    s_affine = np.asarray(s_vol.affine, np.float64)
    if abs(float(np.linalg.det(s_affine[:3, :3]))) < 1e-9:
        raise InputError(s_vol.path, "invalid affine in the header: the voxel axes are degenerate (singular)")
    s_cut = align_to(s_affine, slice_axis(s_affine, axis), qvol.file_affine, qvol.cut)
    support = orient(s_vol, cut=s_cut)
    mask = orient(m_vol, cut=support.cut)
    angle = normal_angle(s_affine, s_cut, qvol.file_affine, qvol.cut)
    for vol in (support, qvol):
        if min(vol.data.shape[:2]) < 8:
            raise InputError(vol.path, f"slices of {vol.data.shape[:2]} voxels (cut along file axis "
                                       f"{vol.cut.file_axis}) are too small; need at least 8x8")
    notes = []
    if qvol.data.shape[2] == 1:
        notes.append(f"{qvol.path}: the query has a single slice; the organ's position along the slice axis "
                     "cannot be mapped, every organ is searched on that slice")
    for label in chosen:
        n = int((mask.data == label).sum())
        if n < MIN_SUPPORT_VOXELS:
            notes.append(f"{mask.path}: label {label} has only {n} voxel(s) in the support; its prediction will "
                         "be unreliable")
    if angle > 45.0:
        notes.append(f"support slices (file axis {support.cut.file_axis}, {support.cut.view}) and query slices "
                     f"(file axis {qvol.cut.file_axis}, {qvol.cut.view}) are {angle:.0f} degrees apart: they "
                     "cannot look alike; pass --axis to cut both along the same world axis")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Inputs(support=support, mask=mask, query=qvol, labels=chosen, warnings=notes,
                  slice_angle_deg=round(angle, 1))
