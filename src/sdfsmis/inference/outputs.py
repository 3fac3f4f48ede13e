"""What ``predict`` writes: output paths, atomic staging, the label NIfTI, the PNG montage."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputError


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(label NIfTI, PNG montage, JSON summary) for ``out``; ``.nii.gz`` is added unless given."""
    out = Path(out)
    name = out.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        stem, name = name, name + ".nii.gz"
    if not stem:
        raise InputError(out, "output file name is empty")
    return out.with_name(name), out.with_name(stem + ".png"), out.with_name(stem + ".json")


def check_output(out: str | Path, inputs: Sequence[str | Path] = ()) -> tuple[Path, Path, Path]:
    """Check that the outputs can be written (before any heavy work); return their paths."""
    paths = output_paths(out)
    folder = paths[0].parent
    if not folder.is_dir():
        raise InputError(paths[0], f"output folder {folder} does not exist")
    for p in paths:
        if p.is_dir():
            raise InputError(p, "output path is a folder")
        if any(p.resolve() == Path(i).resolve() for i in inputs):
            raise InputError(p, "output would overwrite an input file")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdfsmis-write-test-"):
            pass
    except OSError as err:
        raise InputError(paths[0], f"cannot create files in the output folder {folder} "
                                   f"({err.strerror or err}); choose another --out") from None
    return paths


def _save_labels(arr: np.ndarray, query: Any, path: Path) -> None:
    """Write ``arr`` (in the query's voxel order) with the query's affine and header geometry."""
    dtype = np.uint8 if arr.max(initial=0) <= 255 else np.uint16
    img = nib.Nifti1Image(arr.astype(dtype), query.file_affine, header=query.header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_intent("label")
    img.header["cal_min"], img.header["cal_max"] = 0, float(arr.max(initial=0))
    img.header["descrip"] = b"sdfsmis predict"
    nib.save(img, str(path))


_COLOURS = [(1.0, 0.2, 0.2), (0.2, 0.9, 0.2), (0.2, 0.5, 1.0), (1.0, 0.85, 0.1), (0.9, 0.3, 0.9), (0.1, 0.9, 0.9)]
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def _panel(ax: Any, img: np.ndarray, masks: list[tuple[np.ndarray, tuple]], spacing: tuple[float, float],
           title: str, directions: Sequence[str]) -> None:
    """One slice ``[nx, ny]`` shown with x horizontal and y vertical, in radiological convention for
    axial and coronal slices (the patient's right on the viewer's left), with orientation letters."""
    from matplotlib.colors import ListedColormap

    dx, dy = spacing
    flip_x = directions[0] == "R"  # radiological: R on the left
    kw = {"origin": "lower", "aspect": dy / dx, "interpolation": "nearest"}
    ax.imshow(img.T, cmap="gray", vmin=-1, vmax=1, **kw)
    for mask, colour in masks:
        if mask.any():
            ax.imshow(mask.T.astype(np.uint8), cmap=ListedColormap([(0, 0, 0, 0), (*colour, 0.5)]), vmin=0, vmax=1,
                      **kw)
    if flip_x:
        ax.invert_xaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    left, right = (directions[0], _OPPOSITE[directions[0]]) if flip_x else (_OPPOSITE[directions[0]], directions[0])
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.97, directions[1], ha="center", va="top", **style)
    ax.text(0.5, 0.03, _OPPOSITE[directions[1]], ha="center", va="bottom", **style)
    ax.set_title(title, fontsize=11)


def montage(path: Path, support: np.ndarray, support_mask: np.ndarray, query: np.ndarray, labels: np.ndarray,
            plans: Sequence[Any], spacing: tuple[tuple[float, float], tuple[float, float]], *,
            names: dict[int, str] | None = None, directions: Sequence[str] = ("R", "A", "S"),
            support_directions: Sequence[str] | None = None, reference: np.ndarray | None = None,
            per_organ: int = 3) -> None:
    """Per organ a row: the support slice with its mask, then up to ``per_organ`` query slices with the
    prediction (and, with a ``reference`` label volume, the same slice with the reference beside it);
    organ names, a colour legend, orientation letters and slice indices."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = names or {}
    support_directions = support_directions or directions
    per_query = 2 if reference is not None else 1
    ncols = 1 + per_organ * per_query
    fig = Figure(figsize=(3.2 * ncols, 3.4 * len(plans) + 0.8))
    axes = fig.subplots(len(plans), ncols, squeeze=False)
    handles = []
    for row, plan in enumerate(plans):
        colour = _COLOURS[row % len(_COLOURS)]
        name = names.get(plan.label, f"label {plan.label}")
        handles.append(Patch(facecolor=colour, label=f"{plan.label}: {name}"))
        mid = plan.support_chunks[len(plan.support_chunks) // 2]
        zs_s = mid[len(mid) // 2]
        predicted = [int(z) for z in np.flatnonzero((labels == plan.label).any(axis=(0, 1)))]
        shown = [predicted[int(i)] for i in np.linspace(0, len(predicted) - 1, min(per_organ, len(predicted)))]
        _panel(axes[row][0], support[:, :, zs_s], [(support_mask[:, :, zs_s] == plan.label, colour)], spacing[0],
               f"{name}: support, slice {zs_s}", support_directions)
        for col in range(1, ncols):
            axes[row][col].set_axis_off()
        if not shown:
            axes[row][1].text(0.5, 0.5, f"{name}:\nnothing found", ha="center", va="center", fontsize=12,
                              transform=axes[row][1].transAxes)
        for k, z in enumerate(shown):
            ax = axes[row][1 + k * per_query]
            ax.set_axis_on()
            _panel(ax, query[:, :, z], [(labels[:, :, z] == plan.label, colour)], spacing[1],
                   f"prediction, slice {z}", directions)
            if reference is not None:
                ax = axes[row][2 + k * per_query]
                ax.set_axis_on()
                _panel(ax, query[:, :, z], [(reference[:, :, z] == plan.label, colour)], spacing[1],
                       f"reference, slice {z}", directions)
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=11, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.4 * len(plans) + 0.8), 1, 1))
    fig.savefig(path, format="png", dpi=72)


@dataclass
class PredictResult:
    """What :func:`predict` wrote, and its summary (the JSON's content)."""

    segmentation: Path
    summary_path: Path
    overlay: Path | None
    summary: dict = field(repr=False)

    def __str__(self) -> str:
        lines = [f"segmentation: {self.segmentation}", f"summary:      {self.summary_path}"]
        if self.overlay is not None:
            lines.append(f"overlay:      {self.overlay}")
        for organ in self.summary["organs"]:
            lines.append(f"  {organ['label']} {organ.get('name', '')}: {organ['volume_ml']:.1f} mL in "
                         f"{len(organ['slices'])} slices ({organ['seconds']:.1f} s)")
        for note in self.summary.get("warnings", []):
            lines.append(f"warning: {note}")
        lines.append(f"total {self.summary['seconds']:.1f} s")
        return "\n".join(lines)
