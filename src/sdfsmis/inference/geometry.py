"""Which way to cut a volume into 2-D slices, and how to map a result back to the file's voxels.

Rule (``axis="auto"``): a volume is cut along its acquisition's through-plane axis, the voxel axis
with the largest spacing (slices are thicker than their pixels are wide); when spacings tie (within
1 %), the voxel axis whose direction is closest to the world superior-inferior axis wins, so an
isotropic volume is cut axially. An oblique stack (a cardiac short-axis series) is therefore cut on
its acquired slices, never reformatted.

The two in-plane voxel axes are then ordered and flipped to the closest canonical (RAS+)
directions among the two world axes the slice plane is closest to: an axial slice is stored as
``[x: towards R, y: towards A]``, a coronal one ``[x: R, y: S]``, a sagittal one ``[x: A, y: S]``;
the slice index runs towards S, A or R respectively. Support and
query slices therefore look alike whatever the files' voxel orders.

``axis="axial"|"coronal"|"sagittal"`` cuts along the voxel axis closest to the world S, A or R
axis instead (a reformatted view when that is not the acquisition's axis).

Support against query (:func:`align_to`): the query is cut by the rule above; the support is cut
along its own acquisition axis too, but its in-plane axes are ordered and flipped to match the
query's in-plane directions as closely as possible (and its slice index to run the same way), so
two oblique stacks of the same kind (short-axis cardiac series tilted differently, whose closest
canonical planes may differ) still give slices that look alike. When the two slice normals are
more than 45 degrees apart (say an axial support and a coronal query) the slices cannot look alike:
``predict`` warns, and ``--axis`` cuts both along the same world axis.

Everything is a nibabel orientation (``ornt``: for each file axis, the output axis and a flip), so
going back is exact: :func:`to_file_order`.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

AXES = ("auto", "axial", "coronal", "sagittal")
_WORLD_OF_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # world axis (RAS index) normal to the slices
_VIEW = {0: "sagittal", 1: "coronal", 2: "axial"}
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each world axis


@dataclass(frozen=True)
class SliceAxis:
    """How one volume is cut: ``ornt`` maps the file's voxel order to ``[in-plane 0, in-plane 1, slice]``."""

    ornt: np.ndarray  # [3, 2] nibabel orientation: file axis -> (output axis, +1 / -1)
    file_axis: int  # the file's voxel axis the slices are cut along
    view: str  # "axial" | "coronal" | "sagittal": the world plane the slices are closest to
    oblique_deg: float  # angle between the slice normal and that world axis, degrees
    directions: tuple[str, str, str]  # world letter each output axis points to (e.g. "R", "A", "S")

    def describe(self) -> dict:
        return {"file_axis": self.file_axis, "view": self.view, "oblique_deg": round(self.oblique_deg, 1),
                "directions": "".join(self.directions)}


def _unit_columns(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(affine, np.float64)[:3, :3]
    spacing = np.sqrt((m ** 2).sum(axis=0))
    return m / np.where(spacing > 0, spacing, 1.0), spacing


def slice_axis(affine: np.ndarray, axis: str = "auto") -> SliceAxis:
    """The cut of a volume with this ``affine`` (see the module doc for the rule)."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    d, spacing = _unit_columns(affine)
    if axis == "auto":
        top = spacing.max()
        tied = [j for j in range(3) if spacing[j] >= top * 0.99]
        through = max(tied, key=lambda j: (abs(d[2, j]), -j))
    else:
        through = int(np.argmax(np.abs(d[_WORLD_OF_AXIS[axis], :])))
    world_t = int(np.argmax(np.abs(d[:, through])))
    inplane = [j for j in range(3) if j != through]
    u, v = [w for w in range(3) if w != world_t]
    a, b = inplane
    if abs(d[u, a]) + abs(d[v, b]) < abs(d[u, b]) + abs(d[v, a]):
        a, b = b, a
    ornt = np.zeros((3, 2))
    for out, (j, w) in enumerate(((a, u), (b, v), (through, world_t))):
        ornt[j] = (out, 1.0 if d[w, j] >= 0 else -1.0)
    cos = min(1.0, abs(float(d[world_t, through])))
    letters = tuple(_LETTERS[w][1] for w in (u, v, world_t))
    return SliceAxis(ornt=ornt, file_axis=int(through), view=_VIEW[world_t],
                     oblique_deg=float(np.degrees(np.arccos(cos))), directions=letters)  # type: ignore[arg-type]


def _out_vectors(affine: np.ndarray, cut: SliceAxis) -> np.ndarray:
    """World unit vector of each output axis ``[3 (output axis), 3 (xyz)]``."""
    d, _ = _unit_columns(affine)
    out = np.zeros((3, 3))
    for j, (o, flip) in enumerate(cut.ornt):
        out[int(o)] = flip * d[:, j]
    return out


def _letter(v: np.ndarray) -> str:
    w = int(np.argmax(np.abs(v)))
    return _LETTERS[w][1 if v[w] >= 0 else 0]


def align_to(affine: np.ndarray, cut: SliceAxis, ref_affine: np.ndarray, ref_cut: SliceAxis) -> SliceAxis:
    """``cut`` (of a volume with ``affine``) with its in-plane axes ordered and flipped to match the
    in-plane directions of ``ref_cut`` (of ``ref_affine``), its slice index running the same way."""
    d, _ = _unit_columns(affine)
    ref = _out_vectors(ref_affine, ref_cut)
    through = cut.file_axis
    a, b = [j for j in range(3) if j != through]
    if abs(d[:, a] @ ref[0]) + abs(d[:, b] @ ref[1]) < abs(d[:, b] @ ref[0]) + abs(d[:, a] @ ref[1]):
        a, b = b, a
    ornt = np.zeros((3, 2))
    for out, j in enumerate((a, b, through)):
        ornt[j] = (out, 1.0 if d[:, j] @ ref[out] >= 0 else -1.0)
    new = SliceAxis(ornt=ornt, file_axis=through, view=cut.view, oblique_deg=cut.oblique_deg,
                    directions=cut.directions)
    letters = tuple(_letter(v) for v in _out_vectors(affine, new))
    return SliceAxis(ornt=ornt, file_axis=through, view=cut.view, oblique_deg=cut.oblique_deg,
                     directions=letters)  # type: ignore[arg-type]


def normal_angle(affine: np.ndarray, cut: SliceAxis, ref_affine: np.ndarray, ref_cut: SliceAxis) -> float:
    """Angle in degrees (0..90) between the slice normals of two cuts."""
    n1 = _out_vectors(affine, cut)[2]
    n2 = _out_vectors(ref_affine, ref_cut)[2]
    return float(np.degrees(np.arccos(min(1.0, abs(float(n1 @ n2))))))


def to_slice_order(data: np.ndarray, affine: np.ndarray, cut: SliceAxis) -> tuple[np.ndarray, np.ndarray]:
    """File-order ``data`` -> (``[nx, ny, n_slices]`` array, its affine)."""
    out = np.ascontiguousarray(nib.orientations.apply_orientation(data, cut.ornt))
    new_affine = np.asarray(affine, np.float64) @ nib.orientations.inv_ornt_aff(cut.ornt, data.shape)
    return out, new_affine


def inverse(ornt: np.ndarray) -> np.ndarray:
    """The orientation that undoes ``ornt``."""
    inv = np.zeros_like(ornt)
    for j, (out, flip) in enumerate(ornt):
        inv[int(out)] = (j, flip)
    return inv


def to_file_order(data: np.ndarray, cut: SliceAxis) -> np.ndarray:
    """An array in slice order (from :func:`to_slice_order`) -> the file's voxel order."""
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, inverse(cut.ornt)))
