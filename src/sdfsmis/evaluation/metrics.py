"""Segmentation metrics: Dice, HD95 and ASSD (mm), as pure functions, plus an accumulator.

All functions take boolean (or {0, 1}) 3-D arrays ``[X, Y, Z]`` of the same shape; distances take
the voxel ``spacing`` (mm per axis, e.g. ``(1.25, 1.25, 7.7)``) and are 3-D and spacing-aware.
Surface distances are computed by MONAI (``compute_hausdorff_distance`` with ``percentile=95``,
``compute_average_surface_distance`` with ``symmetric=True``), which measures distances between the
masks' edge voxels (MONAI's default ``euclidean`` metric).

Empty-mask rules (the same everywhere in the package, and tested):

====================  ======  ====================================================
case                  Dice    HD95 / ASSD
====================  ======  ====================================================
both empty            1.0     0.0
exactly one empty     0.0     NaN  (undefined; counted in ``n_undefined`` instead)
both non-empty        usual   usual
====================  ======  ====================================================

Aggregation (:class:`MetricAccumulator`): per organ, the mean over the query scans of each fold,
then the mean over the folds; the ``Mean`` column is the mean of the organ values. NaN distances are
left out of the means and reported as a count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

METRICS = ("dice", "hd95", "assd")


def _as_bool(a: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.dtype != bool:
        arr = arr > 0.5 if arr.dtype.kind == "f" else arr != 0
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array [X, Y, Z], got shape {arr.shape}")
    return arr


def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    return p, g


def confusion_counts(pred, gt) -> tuple[int, int, int]:
    """(TP, FP, FN) voxel counts of two same-shaped masks (any dimensionality)."""
    p = np.asarray(pred).astype(bool)
    g = np.asarray(gt).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2 TP / (2 TP + FP + FN)``; 1.0 when both masks are empty (all counts 0)."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def dice(pred, gt) -> float:
    """3-D Dice of two boolean masks ``[X, Y, Z]``; 1.0 if both are empty, 0.0 if only one is."""
    p, g = _check_pair(pred, gt)
    return dice_from_counts(*confusion_counts(p, g))


def _spacing3(spacing: Sequence[float]) -> list[float]:
    sp = [float(s) for s in spacing]
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    return sp


def _surface(kind: str, pred, gt, spacing: Sequence[float]) -> float:
    p, g = _check_pair(pred, gt)
    sp = _spacing3(spacing)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return float("nan")
    # MONAI wants one-hot [B, C, X, Y, Z]; one channel, kept (include_background=True).
    yp = torch.from_numpy(p)[None, None]
    yg = torch.from_numpy(g)[None, None]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\..*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\..*")
        if kind == "hd95":
            from monai.metrics import compute_hausdorff_distance

            out = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=sp)
        else:
            from monai.metrics import compute_average_surface_distance

            out = compute_average_surface_distance(yp, yg, include_background=True, symmetric=True, spacing=sp)
    return float(out.reshape(-1)[0])


def hd95(pred, gt, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI: max of the two directed 95th
    percentiles of edge-to-edge distances). 0.0 if both masks are empty, NaN if exactly one is."""
    return _surface("hd95", pred, gt, spacing)


def assd(pred, gt, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (mean over the edge voxels of both masks of the
    distance to the other mask's edge). 0.0 if both masks are empty, NaN if exactly one is."""
    return _surface("assd", pred, gt, spacing)


def all_metrics(pred, gt, spacing: Sequence[float]) -> dict[str, float | int]:
    """Dice, HD95, ASSD and the TP/FP/FN counts of one 3-D case."""
    p, g = _check_pair(pred, gt)
    tp, fp, fn = confusion_counts(p, g)
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "hd95": hd95(p, g, spacing),
        "assd": assd(p, g, spacing),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _nanstd(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.std(vals)) if vals else float("nan")


@dataclass
class MetricAccumulator:
    """Collects per-case rows and aggregates them.

    A row is a dict with at least ``fold``, ``organ``, ``dice``, ``hd95``, ``assd``; optional
    ``n_slices`` and ``seconds`` feed the throughput. ``organs`` fixes the column order.
    """

    organs: tuple[str, ...] = ()
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        missing = [k for k in ("fold", "organ", *METRICS) if k not in row]
        if missing:
            raise KeyError(f"row lacks {missing}")
        self.rows.append(dict(row))

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.add(r)

    def organ_order(self) -> list[str]:
        seen = list(self.organs)
        for r in self.rows:
            if r["organ"] not in seen:
                seen.append(r["organ"])
        return [o for o in seen if any(r["organ"] == o for r in self.rows)]

    def summary(self) -> dict[str, Any]:
        """Aggregates::

            {"organs": {organ: {"dice": m, "hd95": m, "assd": m,          # mean over folds
                                "per_fold": {fold: {"dice": m, ...}},     # mean over queries
                                "dice_std_folds": s, "n_cases": n, "n_undefined": k,
                                "n_slices": n, "seconds": s, "slices_per_s": r}},
             "mean": {"dice": m, "hd95": m, "assd": m, "slices_per_s": r}, "n_cases": n}

        ``n_undefined`` counts cases whose distances are NaN (exactly one mask empty);
        ``slices_per_s`` is total slices / total seconds.
        """
        organs: dict[str, Any] = {}
        for organ in self.organ_order():
            rows = [r for r in self.rows if r["organ"] == organ]
            folds = sorted({r["fold"] for r in rows})
            per_fold = {
                f: {m: _nanmean(r[m] for r in rows if r["fold"] == f) for m in METRICS} for f in folds
            }
            n_slices = int(sum(r.get("n_slices", 0) for r in rows))
            seconds = float(sum(r.get("seconds", 0.0) for r in rows))
            organs[organ] = {
                **{m: _nanmean(per_fold[f][m] for f in folds) for m in METRICS},
                "per_fold": per_fold,
                "dice_std_folds": _nanstd(per_fold[f]["dice"] for f in folds),
                "n_cases": len(rows),
                "n_undefined": sum(1 for r in rows if math.isnan(r["hd95"]) or math.isnan(r["assd"])),
                "n_slices": n_slices,
                "seconds": seconds,
                "slices_per_s": n_slices / seconds if seconds > 0 else float("nan"),
            }
        tot_slices = sum(o["n_slices"] for o in organs.values())
        tot_seconds = sum(o["seconds"] for o in organs.values())
        mean = {m: _nanmean(o[m] for o in organs.values()) for m in METRICS}
        mean["slices_per_s"] = tot_slices / tot_seconds if tot_seconds > 0 else float("nan")
        return {"organs": organs, "mean": mean, "n_cases": len(self.rows)}
