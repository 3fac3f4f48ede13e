"""NIfTI in, NIfTI out: segment the organs of an annotated support scan in another (query) scan.

``predict(support_image, support_mask, query, out)`` runs a few-shot model (default: the model shipped
in ``sdfsmis/assets/model/``) once per organ of the support mask and writes

- ``OUT.nii.gz``: a label volume in the query's original geometry (same shape, affine and voxel
  order), ``uint8`` (``uint16`` for ids above 255), with the support's label ids;
- ``OUT.png``: a montage (per organ: the support slice with its mask, query slices with the
  prediction, the reference beside it when one is given; organ names, legend, orientation and
  slice marks), unless ``overlay=False``;
- ``OUT.json``: a summary, see :func:`predict`.

Every file is written to a temporary name in the output folder and renamed when complete; nothing is
left behind when something fails.

How a scan becomes model input (the choices the papers leave open):

- **Slice axis** (:mod:`sdfsmis.inference.geometry`): each volume is cut along its acquisition's
  through-plane axis (largest voxel spacing; ties go to the axis closest to world superior-inferior),
  in-plane axes ordered and flipped to the closest canonical directions; ``axis`` overrides. When
  support and query are cut in different world planes, a warning says so. The prediction is mapped
  back to the query's voxel order before writing.
- **Intensities** (:mod:`sdfsmis.data.intensity`): CT (recognised from its values, or
  ``modality="ct"``) is windowed like the training data (default [-125, 275] HU); then the
  protocol's rule, the function the prepare stage uses: z-score, clip to the 0.5/99.5 percentiles, [-1, 1].
- **Slices -> model -> masks**: the slice pipeline shared with ``evaluate`` and the baseline
  (:mod:`sdfsmis.inference.slices`): common pixel size, aspect kept, padded to the model's grid;
  probabilities resampled back and thresholded by the model's rule; bf16 autocast by default. On
  the CPU the decoding of each batch and its merge into the output run on a second thread while the
  next batch goes through the UNet (:mod:`sdfsmis.inference.overlap`; half of torch's threads each).
- **Which slices** (:mod:`sdfsmis.inference.planning`): the organ's extent in the support, as a
  fraction of the support's body extent (slices where >= 2 % of the voxels are above the volume's
  Otsu threshold), is mapped to the same fraction of the query's body extent and widened by
  ``z_margin`` (a fraction of the query's body extent) on each side; ``z_margin=None`` takes every
  query slice. The mapped range is split into ``chunks`` contiguous chunks, and the support's organ
  slices likewise (the evaluation protocol's rule): chunk i of the query is segmented with the middle
  slice(s) of support chunk i (``shots`` slices per chunk); margin slices go to the nearest chunk.
  Predictions are kept only inside the query's body mask (:func:`sdfsmis.data.body.body_mask`)
  and a predicted slice only if its foreground area is then at least ``min_area_mm2``. Measured on
  the 20 CHAOS MRI scans (every ordered pair, 4 organs), a margin of 0.2 keeps 98 % of the organ
  slices within the range (0.1: 93 %); on Synapse CT (10 scans) 92 % (0.1: 82 %).
- **Several labels.** Each label id of the support mask (or of ``labels``) is its own binary few-shot
  task; where two organs claim a voxel, the higher probability wins.
- **3-D clean-up** (:mod:`sdfsmis.inference.cleanup`, ``cleanup=True``): per organ the largest 3-D
  connected component is kept and its holes filled.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from . import atomic
from .data.body import body_mask
from .data.intensity import ABDOMINAL_WINDOW, check_window, model_intensities
from .errors import InputError
from .inference.cleanup import clean_labels
from .inference.overlap import Overlap
from .inference.outputs import PredictResult, _save_labels, check_output, montage, output_paths
from .inference.planning import OrganPlan, body_z_range, plan_organ
from .inference.scans import MAX_LABEL, Inputs, Oriented, load_inputs, to_original
from .inference.slices import PRECISIONS, QueryEncoder, SliceGrid, SlicePipeline, binarise

__all__ = ["predict", "PredictResult", "load_inputs", "plan_organ", "body_z_range", "SliceGrid", "binarise",
           "output_paths", "check_output", "resolve_checkpoint", "load_model", "Inputs",
           "Oriented", "OrganPlan", "to_original", "MAX_LABEL", "ModelCache"]


# ---------------------------------------------------------------------------------- the model
def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    """The model folder to use: ``checkpoint`` or, for ``None`` / ``"bundled"``, the bundled model
    (``sdfsmis.models.io.model_dir``). Raises InputError."""
    from .models.io import model_dir

    return model_dir(checkpoint)


def _device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a torch device name; InputError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(None, f"unknown device {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} requested but CUDA is not available")
    return dev


def load_model(path: Path, device: torch.device, backbone_path: str | Path | None = None,
               image_encoder_path: str | Path | None = None) -> Any:
    """The few-shot model of ``path`` in eval mode (``sdfsmis.models.io.load_model``)."""
    from .models.io import load_model as load

    return load(path, device, backbone_path=backbone_path, image_encoder_path=image_encoder_path, few_shot=True)


class ModelCache:
    """The last loaded model, kept between predictions (``sdfsmis serve`` passes one to every job):
    reused while the directory, device and overrides are the same and the directory's files are
    unchanged (names, sizes, modification times), else loaded anew. A cached model must not run two
    predictions at once (the app runs one job at a time)."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, Any] | None = None
        self._lock = threading.Lock()

    def get(self, path: Path, device: torch.device, **overrides: Any) -> Any:
        path = Path(path)
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_file())
        key = (str(path.resolve()), str(device), tuple(sorted((k, str(v)) for k, v in overrides.items())), stamp)
        with self._lock:
            if self._entry is None or self._entry[0] != key:
                self._entry = None  # free the old model before loading the new one
                self._entry = (key, load_model(path, device, **overrides))
            return self._entry[1]


# --------------------------------------------------------------------------------- the loop
def _slices(vol: np.ndarray, zs: Sequence[int]) -> torch.Tensor:
    """``vol[:, :, zs]`` as ``[len(zs), X, Y]`` float32."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[:, :, list(zs)], 2, 0)).astype(np.float32))


def _segment_organ(pipe: SlicePipeline, plan: OrganPlan, s_img: np.ndarray, s_mask: np.ndarray,
                   q_img: np.ndarray, grids: tuple[SliceGrid, SliceGrid], encoder: QueryEncoder,
                   overlap: Overlap, merge: Any) -> None:
    """Segment one organ in the query: per chunk its support, per batch the model's first half here and
    ``merge(label, zs, started)`` (the second half and the merge) through ``overlap``."""
    for sup_z, q_z in zip(plan.support_chunks, plan.query_chunks):
        cache = pipe.prepare_support(_slices(s_img, sup_z), _slices(s_mask, sup_z), grids[0])
        for start in range(0, len(q_z), pipe.batch_size):
            zs = q_z[start:start + pipe.batch_size]
            overlap.submit(merge, plan.label, zs, pipe.start(_slices(q_img, zs), cache, grids[1], encoder, keys=zs))


def _merger(pipe: SlicePipeline, grid: SliceGrid, min_area_px: float, body: np.ndarray, best: np.ndarray,
            labels: np.ndarray, pbar: Any, done_at: dict[int, float]) -> Any:
    """``merge(label, zs, started)``: finish the batch's probabilities and merge them into ``best`` /
    ``labels`` (highest probability wins), keeping only voxels inside the query's ``body`` mask and
    slices with at least ``min_area_px`` foreground pixels."""

    def merge(label: int, zs: Sequence[int], started: torch.Tensor) -> None:
        prob = pipe.finish(started, grid)
        hard = pipe.masks(prob)
        for i, z in enumerate(zs):
            m = hard[i].numpy() & body[:, :, z]
            if m.sum() < min_area_px:
                continue
            p = prob[i].numpy()
            win = m & (p > best[:, :, z])
            best[:, :, z][win] = p[win]
            labels[:, :, z][win] = label
        done_at[label] = time.perf_counter()
        pbar.update(len(zs))

    return merge


def _check_options(shots: Any, batch_size: Any, chunks: Any, z_margin: Any, min_area_mm2: Any,
                   precision: Any) -> None:
    for flag, value, low in (("--shots", shots, 1), ("--batch-size", batch_size, 1), ("--chunks", chunks, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(None, f"{flag} must be an integer >= {low}, got {value!r}")
    if z_margin is not None and not (isinstance(z_margin, (int, float)) and 0.0 <= z_margin <= 10.0):
        raise InputError(None, f"--z-margin must be in [0, 10] (or --all-slices), got {z_margin!r}")
    if not (isinstance(min_area_mm2, (int, float)) and min_area_mm2 >= 0.0):
        raise InputError(None, f"--min-area must be >= 0 (mm^2), got {min_area_mm2!r}")
    if precision not in PRECISIONS:
        raise InputError(None, f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _parse_names(names: Mapping[int, str] | str | Path | None, labels: Sequence[int]) -> dict[int, str]:
    """Organ names: a mapping, a JSON label-map file ({"1": "liver", ...}), or None (known datasets)."""
    if names is None:
        return {}
    if isinstance(names, (str, Path)):
        path = Path(names)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(path, f"--names: cannot read the JSON label map ({err})") from None
        if not isinstance(raw, dict):
            raise InputError(path, "--names: the JSON label map must be an object {\"1\": \"liver\", ...}")
        names = raw
    try:
        out = {int(k): str(v) for k, v in dict(names).items()}
    except (TypeError, ValueError):
        raise InputError(None, f"--names: label ids must be integers, got {names!r}") from None
    return {k: v for k, v in out.items() if k in set(labels)}


def _default_names(labels: Sequence[int], modality: str) -> dict[int, str]:
    """Organ names of the training datasets' label ids (CHAOS MRI, Synapse CT)."""
    from .data.datasets import get_spec

    spec = get_spec("abd-ct" if modality == "ct" else "abd-mri")
    by_id = {int(v): k for k, v in spec.labels.items()}
    return {lid: by_id[lid] for lid in labels if lid in by_id}


# ------------------------------------------------------------------------------------ predict
def predict(support_image: str | Path, support_mask: str | Path, query: str | Path, out: str | Path, *,
            labels: Sequence[int] | None = None, shots: int = 1, checkpoint: str | Path | None = None,
            device: str = "auto", batch_size: int = 16, overlay: bool = True, progress: bool = True,
            z_margin: float | None = 0.2, min_area_mm2: float = 50.0, chunks: int = 3, seed: int = 0,
            axis: str = "auto", modality: str = "auto", window: Sequence[float] = ABDOMINAL_WINDOW,
            cleanup: bool = True, precision: str = "auto", names: Mapping[int, str] | str | Path | None = None,
            reference: str | Path | None = None, progress_callback: Any = None,
            backbone_path: str | Path | None = None, image_encoder_path: str | Path | None = None,
            models: ModelCache | None = None) -> PredictResult:
    """Segment the support mask's organs (or ``labels``) in ``query``; write OUT.nii.gz/.png/.json.

    ``shots``: support slices per chunk; ``chunks``: chunks of the organ's extent (protocol: 3);
    ``z_margin``: widening of the mapped range, as a fraction of the query's body extent (None:
    every slice); ``min_area_mm2``: smallest foreground area a predicted slice keeps; ``axis``:
    ``auto | axial | coronal | sagittal`` slice axis; ``modality``: ``auto | ct | mr`` (CT is
    windowed to ``window`` HU); ``cleanup``: largest 3-D component + hole filling per organ;
    ``precision``: ``auto`` (bf16 autocast) or ``fp32``; ``device``: ``auto`` (CUDA if available),
    ``cpu``, ``cuda``...; ``names``: ``{id: name}`` or a JSON label map (default: the training
    datasets' names); ``reference``: a label volume of the query (shown beside the prediction).
    ``progress_callback(done, total)``, if given, is called after each batch of query slices; an
    exception it raises (e.g. to cancel) stops the prediction before anything is written.
    ``checkpoint``: a model directory, or ``"bundled"`` / None for the packaged model;
    ``backbone_path`` / ``image_encoder_path`` override the model's saved SD / DINOv2 paths;
    ``models``: a :class:`ModelCache` to take the model from (and keep it in) instead of loading it.
    Raises :class:`InputError` on bad input, before any output is written.

    The summary (``PredictResult.summary``, also ``OUT.json``): ``format_version`` (2), ``inputs``,
    ``outputs``, ``model`` (checkpoint, default, class), ``device``, ``settings`` (every option above,
    the grid size and pixel size, torch's ``threads`` and whether decoding ran on its own thread,
    ``decode_thread``), ``slice_axis`` (per scan: file axis, view, obliquity, directions),
    ``modality`` (per scan), ``warnings``, ``body_z_range``, ``organs`` (per organ: ``label``,
    ``name``, ``voxels``, ``volume_ml``, ``slices`` (indices along the query's slice axis),
    ``candidate_slices``, ``mapped_range``, ``support_slices``, ``seconds``, and with
    ``cleanup`` the ``raw_voxels`` before it), ``slices_processed`` (slice passes of the model),
    ``slices_per_s``, ``timing`` (seconds per stage) and ``seconds`` (total).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    _check_options(shots, batch_size, chunks, z_margin, min_area_mm2, precision)
    window = check_window(window)
    nii_path, png_path, json_path = check_output(out, (support_image, support_mask, query))
    model_dir = resolve_checkpoint(checkpoint)
    dev = _device(device)
    inputs = load_inputs(support_image, support_mask, query, labels, axis=axis)
    ref = None
    if reference is not None:
        from .data.nifti import load_volume
        from .inference.scans import orient

        r_vol = load_volume(reference, "label")
        if tuple(r_vol.array.shape) != inputs.query.file_shape:
            raise InputError(reference, f"reference shape {tuple(r_vol.array.shape)} differs from the query's "
                                        f"{inputs.query.file_shape}")
        ref = orient(r_vol, cut=inputs.query.cut).data
    timing: dict[str, float] = {"load": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    s_img, s_mod = model_intensities(inputs.support.data, modality, window)
    q_img, q_mod = model_intensities(inputs.query.data, modality, window)
    organ_names = _default_names(inputs.labels, q_mod) | _parse_names(names, inputs.labels)
    s_mask, q_shape = inputs.mask.data, inputs.query.data.shape
    sp_s, sp_q = inputs.support.zooms[:2], inputs.query.zooms[:2]
    s_body, q_body = body_z_range(s_img), body_z_range(q_img)
    q_body_mask = body_mask(inputs.query.data)
    timing["intensities"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = (models.get if models is not None else load_model)(model_dir, dev, backbone_path=backbone_path,
                                                               image_encoder_path=image_encoder_path)
    pipe = SlicePipeline(model, dev, batch_size=int(batch_size), precision=precision)
    grids = pipe.grids(s_img.shape, q_shape, sp_s, sp_q)
    pixel_mm = grids[2]
    timing["model_load"] = time.perf_counter() - t0
    plans = []
    for label in inputs.labels:
        organ_z = np.flatnonzero((s_mask == label).any(axis=(0, 1)))
        plans.append(plan_organ(label, organ_z, s_body, q_body, q_shape[2], n_chunks=chunks, shots=shots,
                                z_margin=z_margin))

    t0 = time.perf_counter()
    best = np.full(q_shape, -1.0, dtype=np.float32)  # running max probability
    out_labels = np.zeros(q_shape, dtype=np.uint16)
    min_area_px = float(min_area_mm2) / (sp_q[0] * sp_q[1])
    started_at: dict[int, float] = {}
    two_threads = False
    encoder = QueryEncoder(pipe)
    total = sum(len(z) for p in plans for z in p.query_chunks)
    with torch.random.fork_rng(devices=[]), tqdm(total=total, desc="predict", unit="slice",
                                                 disable=not progress) as pbar:
        torch.manual_seed(seed)
        if progress_callback is not None:  # called after each batch (the bar may be disabled)
            _update, _done = pbar.update, [0]

            def _tick(n: int = 1) -> None:
                _update(n)
                _done[0] += n
                progress_callback(_done[0], total)

            pbar.update = _tick  # type: ignore[method-assign]
        done_at: dict[int, float] = {}
        merge = _merger(pipe, grids[1], min_area_px, q_body_mask, best, out_labels, pbar, done_at)
        with Overlap(dev) as overlap:
            two_threads = overlap.enabled
            if pipe.split and overlap.enabled:  # the second thread encodes query slices from the last needed
                needed = list(dict.fromkeys(z for p in plans for c in p.query_chunks for z in c))
                overlap.submit(encoder.prefetch, lambda zs: _slices(q_img, zs), needed, grids[1])
            for plan in plans:
                started_at[plan.label] = time.perf_counter()
                pbar.set_postfix(organ=organ_names.get(plan.label, plan.label))
                _segment_organ(pipe, plan, s_img, (s_mask == plan.label).astype(np.float32), q_img, grids[:2],
                               encoder, overlap, merge)
        seconds = {k: done_at.get(k, t) - t for k, t in started_at.items()}
    del best, encoder
    timing["model"] = time.perf_counter() - t0
    raw_voxels = {p.label: int((out_labels == p.label).sum()) for p in plans}
    if cleanup:
        t0 = time.perf_counter()
        out_labels = clean_labels(out_labels, [p.label for p in plans])
        timing["cleanup"] = time.perf_counter() - t0

    organs = []
    for plan in plans:
        hit = out_labels == plan.label
        voxels = int(hit.sum())
        organ = {
            "label": plan.label, "name": organ_names.get(plan.label, f"label {plan.label}"), "voxels": voxels,
            "volume_ml": round(voxels * inputs.query.voxel_ml, 3),
            "slices": [int(z) for z in np.flatnonzero(hit.any(axis=(0, 1)))],
            "candidate_slices": [min(min(c) for c in plan.query_chunks), max(max(c) for c in plan.query_chunks)],
            "mapped_range": list(plan.core_range), "support_slices": plan.support_chunks,
            "seconds": round(seconds[plan.label], 3),
        }
        if cleanup:
            organ["raw_voxels"] = raw_voxels[plan.label]
        organs.append(organ)
    summary = {
        "format_version": 2,
        "inputs": {"support_image": str(support_image), "support_mask": str(support_mask), "query": str(query),
                   "reference": None if reference is None else str(reference)},
        "outputs": {"segmentation": str(nii_path), "overlay": str(png_path) if overlay else None,
                    "summary": str(json_path)},
        "model": {"checkpoint": str(model_dir), "default": checkpoint is None, "class": type(model).__name__},
        "device": str(dev),
        "settings": {"shots": int(shots), "chunks": int(chunks), "z_margin": z_margin,
                     "min_area_mm2": float(min_area_mm2), "grid": pipe.size, "pixel_mm": round(pixel_mm, 4),
                     "seed": seed, "axis": axis, "modality": modality, "window": list(window),
                     "cleanup": bool(cleanup), "precision": precision, "batch_size": int(batch_size),
                     "threads": torch.get_num_threads(), "decode_thread": two_threads},
        "slice_index": "index along the query's slice axis (see slice_axis; the file's voxel axis file_axis, "
                       "counted towards the last letter of directions)",
        "slice_axis": {"support": inputs.support.cut.describe(), "query": inputs.query.cut.describe(),
                       "angle_deg": inputs.slice_angle_deg},
        "modality": {"support": s_mod, "query": q_mod},
        "warnings": list(inputs.warnings),
        "query_orientation": "".join(nib.aff2axcodes(inputs.query.file_affine)),
        "body_z_range": {"support": list(s_body), "query": list(q_body)},
        "organs": organs,
        "slices_processed": int(total),
    }
    with atomic.Staging() as staging:
        t0 = time.perf_counter()
        _save_labels(to_original(out_labels, inputs.query), inputs.query, staging.temp(nii_path))
        if overlay:
            montage(staging.temp(png_path), s_img, s_mask, q_img, out_labels, plans,
                    (tuple(sp_s), tuple(sp_q)), names=organ_names,  # type: ignore[arg-type]
                    directions=inputs.query.cut.directions, support_directions=inputs.support.cut.directions,
                    reference=ref)
        timing["write"] = time.perf_counter() - t0
        summary["timing"] = {k: round(v, 3) for k, v in timing.items()}
        summary["slices_per_s"] = round(total / timing["model"], 2) if timing["model"] > 0 else None
        summary["seconds"] = round(time.perf_counter() - t_start, 3)
        tmp_json = staging.temp(json_path)
        tmp_json.write_text(json.dumps(summary, indent=2) + "\n")
        staging.commit()
    return PredictResult(segmentation=nii_path, summary_path=json_path, overlay=png_path if overlay else None,
                         summary=summary)
