"""NIfTI in, NIfTI out: segment the organs of an annotated support scan in another (query) scan.

``predict(support_image, support_mask, query, out)`` runs a few-shot model (default: the model shipped
in ``sdfsmis/assets/model/``) once per organ of the support mask and writes

- ``OUT.nii.gz``: a label volume in the query's original geometry (same shape, affine and voxel
  order), ``uint8`` (``uint16`` for ids above 255), with the support's label ids;
- ``OUT.png``: a montage (per organ: the support slice with its mask, query slices with the
  prediction), unless ``overlay=False``;
- ``OUT.json``: a summary (per organ: label id, voxels, volume in mL, slices, seconds; total time;
  the model; the support slices used).

Every file is written to a temporary name in the output folder and renamed when complete; nothing is
left behind when something fails.

How a scan becomes model input (the choices the papers leave open):

- **Orientation.** Every volume is reoriented to the closest canonical (RAS+) voxel order with
  :func:`nibabel.as_closest_canonical`, so axial slices are ``vol[:, :, z]`` whatever the file's
  orientation. The prediction is mapped back to the query's voxel order before writing.
- **Intensities.** The protocol's rule, the same function as the prepare stage's
  (:func:`normalise_volume`): per-volume z-score, clipped to the 0.5 and 99.5 percentiles of the
  z-scored values, mapped linearly to [-1, 1].
- **In-plane grid.** Support and query slices are resampled to one common pixel size, chosen so that
  the larger field of view of the two scans fills the model's slice size (``model.image_size``, 256);
  each slice keeps its physical aspect ratio (voxel spacing included) and is centre-padded with -1
  (the darkest value) to 256x256. Images: bilinear, anti-aliased when shrinking; support masks: the
  same, then thresholded at 0.5. Probabilities are cropped and resampled bilinearly back to the
  native slice size, then binarised with the model's own threshold rule.
- **Which slices.** Few-shot segmentation needs to know roughly where the organ is along z; the tool
  decides it with a heuristic, not the user. The organ's z-extent in the support, as a fraction of the
  support's body z-extent (slices where >= 2 % of the voxels are above the volume's Otsu threshold),
  is mapped to the same fraction of the query's body z-extent and widened by ``z_margin`` (a fraction
  of the query's body extent) on each side; ``z_margin=None`` takes every query slice. The mapped
  range is split into ``chunks`` contiguous chunks, and the support's organ slices likewise (the
  evaluation protocol's rule): chunk i of the query is segmented with the middle slice(s) of support
  chunk i (``shots`` slices per chunk); margin slices go to the nearest chunk. Predictions are kept
  only inside the query's body mask (the prepare stage's rule, :func:`sdfsmis.data.supervoxels.body_mask`:
  a slice without body keeps nothing), and a predicted slice only if its foreground area is then at
  least ``min_area_mm2``. Measured on the 20 CHAOS MRI scans (every
  ordered pair, 4 organs), a margin of 0.2 keeps 98 % of the organ slices within the range (0.1: 93 %);
  on Synapse CT (10 scans) 92 % (0.1: 82 %): scans covering very different body extents need a larger
  margin or ``z_margin=None``.
- **Several labels.** Each label id of the support mask (or of ``labels``) is its own binary few-shot
  task; where two organs claim a voxel, the higher probability wins.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .data.supervoxels import body_mask
from .errors import InputError

GRID = 256  # model slice size
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "model"
MAX_LABEL = 65535  # output is uint8, or uint16 above 255


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class Oriented:
    """A volume reoriented to RAS+ (axial slices ``data[:, :, z]``), plus what is needed to go back."""

    path: Path
    data: np.ndarray  # [X, Y, Z] in canonical voxel order; float32 (images) or integer ids (labels)
    affine: np.ndarray  # 4x4 canonical affine
    file_affine: np.ndarray  # 4x4 affine of the file
    file_shape: tuple[int, int, int]  # shape in the file's voxel order
    header: Any  # the file's NIfTI header (copied into the output)

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


def _canonical(vol: Any) -> Oriented:
    """A checked ``sdfsmis.data.nifti.Volume`` reoriented to the closest canonical (RAS+) voxel order."""
    affine = np.asarray(vol.affine, np.float64)
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        raise InputError(vol.path, "invalid affine in the header: the voxel axes are degenerate (singular)")
    disk = np.float32 if vol.array.dtype.kind == "f" else np.int32
    canon = nib.as_closest_canonical(nib.Nifti1Image(vol.array, affine, dtype=disk))
    return Oriented(path=Path(vol.path), data=np.ascontiguousarray(np.asanyarray(canon.dataobj)),
                    affine=np.asarray(canon.affine, np.float64), file_affine=affine,
                    file_shape=tuple(int(n) for n in vol.array.shape), header=vol.header)  # type: ignore[arg-type]


def to_original(canonical: np.ndarray, volume: Oriented) -> np.ndarray:
    """Map an array in ``volume``'s canonical voxel order back to the file's voxel order."""
    ornt = nib.orientations.io_orientation(volume.file_affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    out = np.ascontiguousarray(nib.orientations.apply_orientation(canonical, back))
    assert out.shape == volume.file_shape, (out.shape, volume.file_shape)
    return out


def load_inputs(support_image: str | Path, support_mask: str | Path, query: str | Path,
                labels: Sequence[int] | None = None) -> Inputs:
    """Read, check and reorient the three input volumes; raise :class:`InputError` on bad input.

    The shared reader (``sdfsmis.data.nifti.load_volume``) checks each file (exists, readable 3-D
    NIfTI, finite, non-constant image, non-negative integer labels); here: the mask matches the support
    image in shape and affine, is not empty, holds every id of ``labels`` and no id above 65535; the
    affines are not degenerate; axial slices (after reorientation) are at least 8x8 voxels.
    """
    from .data.nifti import check_pair, check_support_mask, load_volume

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
            raise InputError(support_mask, f"labels must be integer label ids, got {labels!r}") from None
        if not chosen:
            raise InputError(support_mask, "the list of labels to segment is empty")
        for label in chosen:
            check_support_mask(m_vol.array, support_mask, label)
    support, mask, qvol = _canonical(s_vol), _canonical(m_vol), _canonical(q_vol)
    for vol in (support, qvol):
        if min(vol.data.shape[:2]) < 8:
            raise InputError(vol.path, f"axial slices of {vol.data.shape[:2]} voxels (after reorientation to "
                                       "RAS) are too small; need at least 8x8")
    return Inputs(support=support, mask=mask, query=qvol, labels=chosen)


# ------------------------------------------------------------------------------------ intensities
def normalise_volume(volume: np.ndarray) -> np.ndarray:
    """The protocol's normalisation, shared with the prepare stage so both agree exactly
    (``sdfsmis.data.prepare.normalise_image``): z-score, clip to the 0.5/99.5 percentiles of the
    z-scored values, map to [-1, 1]. ``[X, Y, Z]`` -> float32 of the same shape."""
    from .data.prepare import normalise_image

    return normalise_image(volume)


def body_z_range(normalised: np.ndarray, min_fraction: float = 0.02) -> tuple[int, int]:
    """First and last axial slice with >= ``min_fraction`` voxels above the volume's Otsu threshold."""
    from skimage.filters import threshold_otsu

    sub = normalised[::2, ::2, :]
    if float(sub.max()) <= float(sub.min()):
        return 0, normalised.shape[2] - 1
    inside = (sub > threshold_otsu(sub)).mean(axis=(0, 1)) >= min_fraction
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return 0, normalised.shape[2] - 1
    return int(idx[0]), int(idx[-1])


# ------------------------------------------------------------------------------- in-plane grid
@dataclass(frozen=True)
class SliceGrid:
    """Maps native slices ``[nx, ny]`` to the model's ``size x size`` grid and back."""

    native: tuple[int, int]
    scaled: tuple[int, int]  # size of the resampled slice inside the grid
    offset: tuple[int, int]  # padding before it
    size: int = GRID

    @classmethod
    def fit(cls, native: tuple[int, int], spacing: tuple[float, float], pixel_mm: float, size: int = GRID):
        scaled = tuple(int(min(size, max(1, round(n * s / pixel_mm)))) for n, s in zip(native, spacing))
        offset = tuple((size - n) // 2 for n in scaled)
        return cls(native=tuple(native), scaled=scaled, offset=offset, size=size)  # type: ignore[arg-type]

    def to_model(self, slices: torch.Tensor, pad_value: float) -> torch.Tensor:
        """``[N, nx, ny]`` -> ``[N, 1, size, size]``."""
        x = _resize(slices[:, None].float(), self.scaled)
        out = torch.full((x.shape[0], 1, self.size, self.size), pad_value, dtype=x.dtype)
        ox, oy = self.offset
        out[:, :, ox:ox + self.scaled[0], oy:oy + self.scaled[1]] = x
        return out

    def from_model(self, prob: torch.Tensor) -> torch.Tensor:
        """``[N, 1, size, size]`` -> ``[N, nx, ny]`` (cropped, resized back, clipped to [0, 1])."""
        ox, oy = self.offset
        x = prob[:, :, ox:ox + self.scaled[0], oy:oy + self.scaled[1]].float()
        return _resize(x, self.native)[:, 0].clamp_(0.0, 1.0)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


# ----------------------------------------------------------------------------- slice planning
@dataclass
class OrganPlan:
    label: int
    support_chunks: list[list[int]]  # support slice indices (canonical z) per chunk
    query_chunks: list[list[int]]  # query slice indices (canonical z) per chunk
    core_range: tuple[int, int]  # query slices the organ's support extent maps to (no margin)


def plan_organ(label: int, organ_z: Sequence[int], support_body: tuple[int, int], query_body: tuple[int, int],
               query_depth: int, *, n_chunks: int = 3, shots: int = 1, z_margin: float | None = 0.2) -> OrganPlan:
    """Decide the support slices and the query slices (per chunk) of one organ; see the module doc.

    The organ's support slices ``organ_z`` span a fraction of the support's body z-range; the same
    fraction of the query's body z-range is the core range, split into chunks and paired with support
    slices by the evaluation protocol's rule (``sdfsmis.evaluation.protocol.chunk_support_slices``);
    the ``z_margin`` slices below / above the core range join the first / last chunk.
    """
    from .evaluation.protocol import chunk_support_slices

    organ_z = sorted(int(z) for z in organ_z)
    b0, b1 = support_body
    nb = max(1, b1 - b0 + 1)
    r0, r1 = (organ_z[0] - b0) / nb, (organ_z[-1] + 1 - b0) / nb
    c0, c1 = query_body
    nc = max(1, c1 - c0 + 1)
    q0 = int(np.clip(math.floor(c0 + r0 * nc), 0, query_depth - 1))
    q1 = int(np.clip(math.ceil(c0 + r1 * nc) - 1, q0, query_depth - 1))
    if z_margin is None:
        lo, hi = 0, query_depth - 1
    else:
        m = float(z_margin) * nc
        lo = int(np.clip(math.floor(c0 + r0 * nc - m), 0, q0))
        hi = int(np.clip(math.ceil(c0 + r1 * nc + m) - 1, q1, query_depth - 1))
    pairs = chunk_support_slices(organ_z, list(range(q0, q1 + 1)), n_chunks, shots)
    query_chunks = [list(q) for q, _ in pairs]
    query_chunks[0] = list(range(lo, q0)) + query_chunks[0]
    query_chunks[-1] = query_chunks[-1] + list(range(q1 + 1, hi + 1))
    return OrganPlan(label=int(label), support_chunks=[list(s) for _, s in pairs], query_chunks=query_chunks,
                     core_range=(q0, q1))


# ---------------------------------------------------------------------------------- the model
def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """The model directory to use: ``checkpoint``, or the bundled default model. Raises InputError."""
    if checkpoint is None or str(checkpoint) == "bundled":
        path = DEFAULT_MODEL_DIR
        if not (path / "config.json").is_file():
            raise InputError(path, "no trained default model is bundled yet; pass --checkpoint DIR")
        return path
    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(path, "checkpoint folder does not exist")
    if not (path / "config.json").is_file():
        raise InputError(path, "not a trained model directory (no config.json)")
    return path


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(None, f"unknown device {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} requested but CUDA is not available")
    return dev


def load_model(path: Path, device: torch.device, backbone_path: str | Path | None = None,
               image_encoder_path: str | Path | None = None) -> Any:
    """Load a trained model directory (``sdfsmis.models.io.load_pretrained``) in eval mode."""
    from .models.io import load_pretrained

    try:
        model = load_pretrained(path, device=device, backbone_path=backbone_path,
                                image_encoder_path=image_encoder_path)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise InputError(path, f"cannot load the model ({type(err).__name__}: {err})") from None
    if not (hasattr(model, "prepare_support") and hasattr(model, "predict_with_support")):
        raise InputError(path, f"{type(model).__name__} is not a few-shot model (no support path); "
                               "predict needs an SD-FSMIS or DiffewS model")
    return model.eval()


def binarise(model: Any, prob: torch.Tensor) -> torch.Tensor:
    """Hard bool masks from probabilities ``[N, H, W]`` with the model's own rule (``model.threshold``:
    absolute ``p > 0.5`` or DiffewS's relative ``p > 0.25 max(p)`` per slice); ``p >= 0.5`` without one."""
    rule = getattr(model, "threshold", None)
    if callable(rule):
        return rule(prob[:, None])[:, 0] > 0.5
    return prob >= 0.5


# --------------------------------------------------------------------------------- the loop
def _slices(vol: np.ndarray, zs: Sequence[int]) -> torch.Tensor:
    """``vol[:, :, zs]`` as ``[len(zs), X, Y]`` float32."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[:, :, list(zs)], 2, 0)).astype(np.float32))


class _QueryRunner:
    """Query probabilities for one prepared support. Query slices are encoded once and their latents
    reused by every organ (``encode_images`` + ``predict_latents_with_support`` + ``probabilities``,
    the steps of ``predict_with_support``); models without those steps use ``predict_with_support``."""

    def __init__(self, model: Any, q_img: np.ndarray, grid: SliceGrid, device: torch.device):
        self.model, self.q_img, self.grid, self.device = model, q_img, grid, device
        self.split = all(hasattr(model, n) for n in ("encode_images", "predict_latents_with_support",
                                                     "probabilities"))
        self.latents: dict[int, torch.Tensor] = {}

    def _images(self, zs: Sequence[int]) -> torch.Tensor:
        return self.grid.to_model(_slices(self.q_img, zs), pad_value=-1.0).to(self.device)

    def __call__(self, zs: Sequence[int], cache: Any) -> torch.Tensor:
        """Probabilities ``[len(zs), nx, ny]`` (native grid, CPU) of query slices ``zs``."""
        if not self.split:
            prob = self.model.predict_with_support(self._images(zs), cache)
        else:
            todo = [z for z in zs if z not in self.latents]
            if todo:
                self.latents.update(zip(todo, self.model.encode_images(self._images(todo))))
            z_qi = torch.stack([self.latents[z] for z in zs])
            prob = self.model.probabilities(self.model.predict_latents_with_support(z_qi, cache))
        return self.grid.from_model(prob.float().cpu())


@torch.inference_mode()
def _segment_organ(model: Any, plan: OrganPlan, s_img: np.ndarray, s_mask: np.ndarray, run: _QueryRunner,
                   grid: SliceGrid, device: torch.device, batch_size: int, min_area_px: float,
                   body: np.ndarray, best: np.ndarray, labels: np.ndarray, pbar: Any) -> None:
    """Segment one organ in the query and merge it into ``best``/``labels`` (highest probability wins),
    keeping only voxels inside the query's ``body`` mask."""
    for sup_z, q_z in zip(plan.support_chunks, plan.query_chunks):
        sup = grid.to_model(_slices(s_img, sup_z), pad_value=-1.0).to(device)
        msk = (grid.to_model(_slices(s_mask, sup_z), pad_value=0.0) >= 0.5).float().to(device)
        cache = model.prepare_support(sup, msk)
        for start in range(0, len(q_z), batch_size):
            zs = q_z[start:start + batch_size]
            prob = run(zs, cache)
            hard = binarise(model, prob)
            for i, z in enumerate(zs):
                m = hard[i].numpy() & body[:, :, z]
                if m.sum() < min_area_px:
                    continue
                p = prob[i].numpy()
                win = m & (p > best[:, :, z])
                best[:, :, z][win] = p[win]
                labels[:, :, z][win] = plan.label
            pbar.update(len(zs))


# ------------------------------------------------------------------------------------ outputs
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
        raise InputError(paths[0], f"output folder {folder} is not writable ({err.strerror or err})") from None
    return paths


class _Staging:
    """Temporary files next to their final names; ``commit()`` renames them all, failure removes them."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def temp(self, final: Path) -> Path:
        suffix = ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending = []

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)


def _save_labels(arr: np.ndarray, query: Oriented, path: Path) -> None:
    """Write ``arr`` (in the query's voxel order) with the query's affine and header geometry."""
    dtype = np.uint8 if arr.max(initial=0) <= 255 else np.uint16
    img = nib.Nifti1Image(arr.astype(dtype), query.file_affine, header=query.header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_intent("label")
    img.header["cal_min"], img.header["cal_max"] = 0, float(arr.max(initial=0))
    img.header["descrip"] = b"sdfsmis predict"
    nib.save(img, str(path))


def _montage(path: Path, support: np.ndarray, support_mask: np.ndarray, query: np.ndarray, labels: np.ndarray,
             plans: Sequence[OrganPlan], spacing: tuple[tuple[float, float], tuple[float, float]],
             per_organ: int = 4) -> None:
    """Per organ a row: support slice + mask, then up to ``per_organ`` query slices + prediction."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    ncols = 1 + per_organ
    fig = Figure(figsize=(2.4 * ncols, 2.6 * len(plans)))
    axes = fig.subplots(len(plans), ncols, squeeze=False)
    for row, plan in enumerate(plans):
        colour = ListedColormap([(0, 0, 0, 0), (*_COLOURS[row % len(_COLOURS)], 0.45)])
        mid = plan.support_chunks[len(plan.support_chunks) // 2]
        zs_s = mid[len(mid) // 2]
        predicted = [int(z) for z in np.flatnonzero((labels == plan.label).any(axis=(0, 1)))]
        shown = [predicted[int(i)] for i in np.linspace(0, len(predicted) - 1, min(per_organ, len(predicted)))]
        panels = [(support[:, :, zs_s], support_mask[:, :, zs_s] == plan.label, spacing[0],
                   f"support z={zs_s} (label {plan.label})")]
        panels += [(query[:, :, z], labels[:, :, z] == plan.label, spacing[1], f"query z={z}") for z in shown]
        for col in range(ncols):
            ax = axes[row][col]
            ax.set_axis_off()
            if col >= len(panels):
                if col == 1 and not shown:
                    ax.text(0.5, 0.5, f"label {plan.label}:\nnothing found", ha="center", va="center")
                continue
            img, mask, (dx, dy), title = panels[col]
            ax.imshow(img.T, cmap="gray", vmin=-1, vmax=1, origin="lower", aspect=dy / dx, interpolation="nearest")
            ax.imshow(mask.T.astype(np.uint8), cmap=colour, vmin=0, vmax=1, origin="lower", aspect=dy / dx,
                      interpolation="nearest")
            ax.invert_xaxis()  # radiological view: the patient's right on the left, anterior up
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)


_COLOURS = [(1.0, 0.2, 0.2), (0.2, 0.9, 0.2), (0.2, 0.5, 1.0), (1.0, 0.85, 0.1), (0.9, 0.3, 0.9), (0.1, 0.9, 0.9)]


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
            lines.append(f"  label {organ['label']}: {organ['volume_ml']:.1f} mL in {len(organ['slices'])} slices "
                         f"({organ['seconds']:.1f} s)")
        lines.append(f"total {self.summary['seconds']:.1f} s")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ predict
def predict(support_image: str | Path, support_mask: str | Path, query: str | Path, out: str | Path, *,
            labels: Sequence[int] | None = None, shots: int = 1, checkpoint: str | Path | None = None,
            device: str = "cpu", batch_size: int = 16, overlay: bool = True, progress: bool = True,
            z_margin: float | None = 0.2, min_area_mm2: float = 50.0, chunks: int = 3,
            seed: int = 0, backbone_path: str | Path | None = None,
            image_encoder_path: str | Path | None = None) -> PredictResult:
    """Segment the support mask's organs (or ``labels``) in ``query``; write OUT.nii.gz/.png/.json.

    ``shots``: support slices per chunk; ``chunks``: chunks of the organ's z-extent (protocol: 3);
    ``z_margin``: widening of the mapped z-range, as a fraction of the query's body z-extent (None:
    every slice); ``min_area_mm2``: smallest foreground area a predicted slice keeps. See the module
    doc for the rules. ``checkpoint="bundled"`` (or None) is the packaged model;
    ``backbone_path`` / ``image_encoder_path`` override the model's saved SD / DINOv2 paths.
    Raises :class:`InputError` on bad input, before any output is written.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    for name, value, low in (("shots", shots, 1), ("batch_size", batch_size, 1), ("chunks", chunks, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(None, f"{name} must be an integer >= {low}, got {value!r}")
    if z_margin is not None and not (isinstance(z_margin, (int, float)) and 0.0 <= z_margin <= 10.0):
        raise InputError(None, f"z_margin must be in [0, 10] or None, got {z_margin!r}")
    if not (isinstance(min_area_mm2, (int, float)) and min_area_mm2 >= 0.0):
        raise InputError(None, f"min_area_mm2 must be >= 0, got {min_area_mm2!r}")
    nii_path, png_path, json_path = check_output(out, (support_image, support_mask, query))
    model_dir = resolve_checkpoint(checkpoint)
    dev = _device(device)
    inputs = load_inputs(support_image, support_mask, query, labels)

    s_img, q_img = normalise_volume(inputs.support.data), normalise_volume(inputs.query.data)
    s_mask, q_shape = inputs.mask.data, inputs.query.data.shape
    sp_s, sp_q = inputs.support.zooms[:2], inputs.query.zooms[:2]
    model = load_model(model_dir, dev, backbone_path=backbone_path, image_encoder_path=image_encoder_path)
    size = int(getattr(model, "image_size", GRID))  # 256 (the tiny test tier: 32)
    fov = max(n * s for n, s in zip(s_img.shape[:2] + q_shape[:2], sp_s + sp_q))
    pixel_mm = fov / size
    grids = (SliceGrid.fit(s_img.shape[:2], sp_s, pixel_mm, size), SliceGrid.fit(q_shape[:2], sp_q, pixel_mm, size))
    s_body, q_body = body_z_range(s_img), body_z_range(q_img)
    q_body_mask = body_mask(inputs.query.data)
    plans = []
    for label in inputs.labels:
        organ_z = np.flatnonzero((s_mask == label).any(axis=(0, 1)))
        plans.append(plan_organ(label, organ_z, s_body, q_body, q_shape[2], n_chunks=chunks, shots=shots,
                                z_margin=z_margin))

    best = np.full(q_shape, -1.0, dtype=np.float32)  # running max probability
    out_labels = np.zeros(q_shape, dtype=np.uint16)
    min_area_px = float(min_area_mm2) / (sp_q[0] * sp_q[1])
    seconds: dict[int, float] = {}
    run = _QueryRunner(model, q_img, grids[1], dev)
    total = sum(len(z) for p in plans for z in p.query_chunks)
    with torch.random.fork_rng(devices=[]), tqdm(total=total, desc="predict", unit="slice",
                                                 disable=not progress) as pbar:
        torch.manual_seed(seed)
        for plan in plans:
            t0 = time.perf_counter()
            pbar.set_postfix(label=plan.label)
            _segment_organ(model, plan, s_img, (s_mask == plan.label).astype(np.float32), run, grids[0], dev,
                           int(batch_size), min_area_px, q_body_mask, best, out_labels, pbar)
            seconds[plan.label] = time.perf_counter() - t0
    del best, run

    organs = []
    for plan in plans:
        hit = out_labels == plan.label
        voxels = int(hit.sum())
        organs.append({
            "label": plan.label, "voxels": voxels, "volume_ml": round(voxels * inputs.query.voxel_ml, 3),
            "slices": [int(z) for z in np.flatnonzero(hit.any(axis=(0, 1)))],
            "candidate_slices": [min(min(c) for c in plan.query_chunks), max(max(c) for c in plan.query_chunks)],
            "mapped_range": list(plan.core_range), "support_slices": plan.support_chunks,
            "seconds": round(seconds[plan.label], 3),
        })
    summary = {
        "format_version": 1,
        "inputs": {"support_image": str(support_image), "support_mask": str(support_mask), "query": str(query)},
        "outputs": {"segmentation": str(nii_path), "overlay": str(png_path) if overlay else None,
                    "summary": str(json_path)},
        "model": {"checkpoint": str(model_dir), "default": checkpoint is None, "class": type(model).__name__},
        "device": str(dev),
        "settings": {"shots": int(shots), "chunks": int(chunks), "z_margin": z_margin,
                     "min_area_mm2": float(min_area_mm2), "grid": size, "pixel_mm": round(pixel_mm, 4),
                     "seed": seed},
        "slice_index": "axial slice index after reorientation to RAS+ (closest canonical)",
        "query_orientation": "".join(nib.aff2axcodes(inputs.query.file_affine)),
        "body_z_range": {"support": list(s_body), "query": list(q_body)},
        "organs": organs,
    }
    with _Staging() as staging:
        _save_labels(to_original(out_labels, inputs.query), inputs.query, staging.temp(nii_path))
        if overlay:
            _montage(staging.temp(png_path), s_img, s_mask, q_img, out_labels, plans,
                     (tuple(sp_s), tuple(sp_q)))  # type: ignore[arg-type]
        summary["seconds"] = round(time.perf_counter() - t_start, 3)
        tmp_json = staging.temp(json_path)
        tmp_json.write_text(json.dumps(summary, indent=2) + "\n")
        staging.commit()
    return PredictResult(segmentation=nii_path, summary_path=json_path, overlay=png_path if overlay else None,
                         summary=summary)
