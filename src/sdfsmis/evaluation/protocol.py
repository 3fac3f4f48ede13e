"""The few-shot evaluation protocol of the FSMIS literature (SSL-ALPNet / ADNet / RPT / SD-FSMIS).

For each fold (``sdfsmis.data.folds``): the fold's scans are the test scans; one of them is the
support scan (``support`` rule: ``last`` = ADNet, ``index:N`` = RPT uses ``index:2``, ``id:X``), the
others are the queries. For each evaluated organ and each query scan:

1. The evaluated query slices are the slices holding the organ in the query's manual label; the
   support's organ slices likewise (slices are axial, ``vol[:, :, z]``).
2. Both lists are split into ``n_chunks`` (= 3) contiguous chunks with ``numpy.array_split``
   semantics: the first ``len % n`` chunks get one slice more (10 slices -> 4, 3, 3).
3. Query chunk ``i`` is segmented with support chunk ``i``: with ``shots = 1`` its middle slice
   (index ``L // 2`` of a chunk of ``L`` slices, the upper middle for even ``L``); with ``shots = K``
   the slices at indices ``floor((j + 0.5) * L / K)``, ``j = 0..K-1`` (the centres of ``K`` equal
   parts of the chunk; for odd ``K`` the middle one is the ``shots = 1`` slice). Duplicates are
   dropped, so a chunk shorter than ``K`` gives all its slices. See
   :func:`sdfsmis.data.chunks.chunk_support_slices` (``predict`` pairs slices by the same rule).
4. The predictor is called once per chunk (all query slices of the chunk as one batch) and its
   probabilities are thresholded at 0.5 (``prob >= 0.5``, MONAI ``AsDiscrete`` convention).
5. Metrics are 3-D over the evaluated slices: Dice from TP/FP/FN summed over them; HD95 and ASSD in
   mm on the query's slab ``z_min..z_max`` of the evaluated slices with the volume spacing
   (predictions on slices in that range that do not hold the organ, if any, are empty; this keeps
   the true slice geometry).

The original protocol code (ADNet/RPT) assigns query slices to chunks by their position in the
``z`` range of the organ; on organs whose slices are contiguous (all of CHAOS / Synapse) that gives
the same contiguous thirds up to rounding at the chunk borders.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..data.chunks import chunk_support_slices
from ..data.folds import N_FOLDS, choose_support, split
from ..errors import InputError
from .metrics import MetricAccumulator, all_metrics
from .tables import markdown_tables

PROB_THRESHOLD = 0.5


class Predictor(Protocol):
    """What the protocol calls (docs/architecture.md, "Few-shot predictor")."""

    name: str

    def predict(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
    ) -> torch.Tensor:
        """``[K, Hs, Ws]`` support images in [-1, 1], ``[K, Hs, Ws]`` {0, 1} support masks,
        ``[N, Hq, Wq]`` query images in [-1, 1] -> ``[N, Hq, Wq]`` foreground probability in [0, 1]
        (>= 0.5 counts as foreground); all float32 on the CPU. Support and query are slices of two
        scans at their own in-plane sizes: ``(Hs, Ws)`` and ``(Hq, Wq)`` may differ, and the
        output has the query's size."""
        ...


def organ_slices(label: np.ndarray, label_id: int) -> list[int]:
    """Indices ``z`` of the axial slices ``label[:, :, z]`` that hold ``label_id``."""
    return [int(z) for z in np.flatnonzero((label == label_id).any(axis=(0, 1)))]


@dataclass
class CaseResult:
    """One (fold, query scan, organ) evaluation."""

    fold: int
    organ: str
    query_id: str
    support_id: str
    dice: float
    hd95: float
    assd: float
    tp: int
    fp: int
    fn: int
    n_slices: int
    seconds: float  # wall time inside predictor.predict for this case
    slices_per_s: float
    query_slices: list[int] = field(default_factory=list)
    support_slices: list[list[int]] = field(default_factory=list)  # per chunk


@dataclass
class EvalResult:
    method: str
    dataset: str
    config: dict[str, Any]
    folds: dict[int, dict[str, Any]]  # fold -> {"support": id, "queries": [ids]}
    cases: list[CaseResult]
    skipped: list[dict[str, Any]]  # (fold, query, organ) with no organ slice in the query
    setting: str = ""  # free label for the table row (e.g. "1" / "2" for the paper's settings)
    outputs: dict[str, str] = field(default_factory=dict)  # report files, once written
    warnings: list[str] = field(default_factory=list)  # e.g. a model that marks (almost) nothing

    def __str__(self) -> str:
        where = f"\nreports: {Path(next(iter(self.outputs.values()))).parent}" if self.outputs else ""
        return (f"{self.dataset} / {self.method}: {len(self.cases)} cases, folds {self.config['folds']}\n"
                + markdown_tables([(self.method, self.setting, self.summary())], self.config["organs"]) + where)

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.cases]

    def summary(self) -> dict[str, Any]:
        acc = MetricAccumulator(organs=tuple(self.config.get("organs", ())))
        acc.extend(self.rows())
        return {
            "method": self.method,
            "dataset": self.dataset,
            "config": self.config,
            "folds": {str(k): v for k, v in self.folds.items()},
            "skipped": self.skipped,
            "warnings": self.warnings,
            **acc.summary(),
        }


def threshold_record(predictor: Any) -> dict[str, Any]:
    """The cut that really turns ``predictor``'s output into masks, for the summary.

    A trained model thresholds inside its predictor with its own rule (``absolute``: decoded mask
    > ``value`` in [-1, 1], i.e. foreground probability > ``(value + 1) / 2``; ``relative``:
    probability > ``value`` x its maximum per slice) and hands the protocol {0, 1} masks; the
    training-free baseline centres its sigmoid on a cosine-similarity ``value``; any other
    predictor is cut by the protocol at probability >= 0.5.
    """
    cfg = getattr(predictor, "config", None)
    rule, value = getattr(cfg, "threshold", None), getattr(cfg, "threshold_value", None)
    if rule in ("absolute", "relative") and value is not None:
        record: dict[str, Any] = {"applied_by": "model", "rule": rule, "value": float(value)}
        if rule == "absolute":
            record["foreground_probability_above"] = (float(value) + 1.0) / 2.0
        return record
    if isinstance(rule, float) and hasattr(cfg, "temperature"):
        return {"applied_by": "predictor", "rule": "cosine_similarity_at_least", "value": rule}
    return {"applied_by": "protocol", "rule": "probability_at_least", "value": PROB_THRESHOLD}


def _describe(predictor: Any) -> dict[str, Any]:
    cfg = getattr(predictor, "config", None)
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in asdict(cfg).items()}
    return {}


@dataclass
class EvalScan:
    """A prepared scan as the protocol reads it."""

    image: np.ndarray  # float32 [X, Y, Z]
    label: np.ndarray  # [X, Y, Z]
    spacing: tuple[float, float, float]


def load_eval_scan(prepared: Any, scan_id: str) -> EvalScan:
    """Image, label and voxel spacing of ``scan_id`` in a prepared dataset."""
    scan = prepared.load(scan_id)
    info = getattr(scan, "info", None) or prepared.info(scan_id)
    return EvalScan(
        image=np.asarray(scan.image, dtype=np.float32),
        label=np.asarray(scan.label),
        spacing=tuple(float(s) for s in info.spacing),
    )


def volume_slices(vol: np.ndarray, idx: Sequence[int]) -> torch.Tensor:
    """``vol[:, :, idx]`` as a ``[len(idx), X, Y]`` float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol[:, :, list(idx)], 2, 0), dtype=np.float32))


def plan_folds(
    prepared: Any, folds: Sequence[int], support: str, organs: Sequence[str] | None
) -> tuple[tuple[str, ...], dict[int, dict[str, Any]]]:
    """Validate the options and return (organs, {fold: {"support": id, "queries": [ids]}}).

    Raises :class:`InputError` (naming the prepared folder) for unknown organs, folds out of range,
    a support rule that does not pick a scan of the fold, or too few scans.
    """
    root = getattr(prepared, "root", None)
    spec = prepared.spec
    organs = tuple(spec.eval_organs if organs is None else organs)
    unknown = [o for o in organs if o not in spec.labels]
    if unknown or not organs:
        raise InputError(root, f"unknown organ(s) {unknown or list(organs)} for dataset {spec.name!r}; "
                               f"known: {sorted(spec.labels)}")
    scan_ids = list(prepared.scan_ids)
    if len(scan_ids) < N_FOLDS:
        raise InputError(root, f"needs at least {N_FOLDS} scans for {N_FOLDS} folds, has {len(scan_ids)}")
    bad = [f for f in folds if not isinstance(f, (int, np.integer)) or not 0 <= int(f) < N_FOLDS]
    if bad or not folds:
        raise InputError(root, f"fold(s) {bad or list(folds)} out of range: use 0..{N_FOLDS - 1}")
    plan: dict[int, dict[str, Any]] = {}
    for fold in folds:
        _, test = split(scan_ids, int(fold))
        try:
            sup = choose_support(test, support)
        except (ValueError, IndexError) as err:
            raise InputError(root, f"support rule {support!r} for fold {fold} (scans {test}): {err}") from err
        plan[int(fold)] = {"support": sup, "queries": [s for s in test if s != sup]}
    return organs, plan


def evaluate(
    predictor: Predictor | Mapping[int, Predictor] | Mapping[tuple[int, str], Predictor],
    prepared: Any,
    *,
    folds: Sequence[int] = (0, 1, 2, 3, 4),
    organs: Sequence[str] | None = None,
    support: str = "last",
    n_chunks: int = 3,
    shots: int = 1,
    progress: bool = True,
    cleanup: bool = False,
) -> EvalResult:
    """Run the protocol of this module on a :class:`~sdfsmis.data.prepared.PreparedDataset`.

    ``predictor`` is one predictor for every fold, a mapping ``{fold: predictor}`` (a model trained
    per fold: cross-validation), or ``{(fold, organ): predictor}`` (a model per fold and organ: SDSeg,
    or Setting 2 with one model per organ group); the row is then over all folds, as in the papers'
    tables.
    ``organs`` defaults to ``spec.eval_organs``. All options are checked before any prediction.
    ``cleanup``: the predicted slab of each case keeps its largest 3-D connected component with holes
    filled (``sdfsmis.inference.cleanup.clean_mask``, what ``predict`` does by default).
    A query scan without the organ is skipped and listed in ``EvalResult.skipped``; a support scan
    without the organ is an :class:`InputError`.
    """
    if n_chunks < 1 or shots < 1:
        raise InputError(getattr(prepared, "root", None), f"n_chunks and shots must be >= 1, got {n_chunks}, {shots}")
    organs, plan = plan_folds(prepared, folds, support, organs)
    spec = prepared.spec
    root = getattr(prepared, "root", None)

    def pick(fold: int, organ: str) -> Predictor | None:
        if not isinstance(predictor, Mapping):
            return predictor
        return predictor.get((fold, organ), predictor.get(fold))

    if missing := [f for f in plan if any(pick(f, o) is None for o in organs)]:
        raise InputError(root, f"no predictor for fold(s) {missing}")
    first = pick(next(iter(plan)), organs[0])

    # Check every support scan holds every organ before spending time on predictions.
    sup_slices: dict[tuple[int, str], list[int]] = {}
    for fold, p in plan.items():
        label = np.asarray(prepared.load(p["support"]).label)
        for organ in organs:
            zs = organ_slices(label, spec.label_id(organ))
            if not zs:
                raise InputError(root, f"support scan {p['support']!r} (fold {fold}) has no {organ!r} "
                                       f"(label {spec.label_id(organ)}); choose another --support")
            sup_slices[fold, organ] = zs

    config = {
        "folds": [int(f) for f in plan],
        "organs": list(organs),
        "support": support,
        "n_chunks": n_chunks,
        "shots": shots,
        "threshold": threshold_record(first),
        "cleanup": bool(cleanup),
        "predictor": getattr(first, "name", type(first).__name__),
        "predictor_config": _describe(first),
        "prepared": None if root is None else str(root),
        "scan_ids": list(prepared.scan_ids),
    }
    if isinstance(predictor, Mapping):  # one record per (fold, organ): several models, several rules
        records = [{"fold": f, "organ": o, "predictor": getattr(pick(f, o), "name", type(pick(f, o)).__name__),
                    "predictor_config": _describe(pick(f, o)), "threshold": threshold_record(pick(f, o))}
                   for f in plan for o in organs]
        config["predictors"] = records
        if any(r["threshold"] != records[0]["threshold"] for r in records):
            config["threshold"] = "per predictor (see predictors)"
        if any(r["predictor_config"] != records[0]["predictor_config"] for r in records):
            config["predictor_config"] = "per predictor (see predictors)"
    tasks = [(f, q) for f, p in plan.items() for q in p["queries"]]
    cases: list[CaseResult] = []
    skipped: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * len(organs), desc=f"evaluate {spec.name}", unit="case")
    for fold, p in plan.items():
        sup_scan = load_eval_scan(prepared, p["support"])
        for qid in p["queries"]:
            qscan = load_eval_scan(prepared, qid)
            for organ in organs:
                lid = spec.label_id(organ)
                q_z = organ_slices(qscan.label, lid)
                if not q_z:
                    skipped.append({"fold": fold, "query_id": qid, "organ": organ, "reason": "organ absent"})
                else:
                    cases.append(_run_case(pick(fold, organ), sup_scan, qscan, lid, q_z, sup_slices[fold, organ],
                                           fold, organ, qid, p["support"], n_chunks, shots, cleanup))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return EvalResult(
        method=config["predictor"], dataset=spec.name, config=config, folds=plan, cases=cases, skipped=skipped
    )


def takes_spacing(predictor: Any) -> bool:
    """Whether ``predictor.predict`` accepts ``spacing=((support dx, dy), (query dx, dy))``."""
    import inspect

    try:
        return "spacing" in inspect.signature(predictor.predict).parameters
    except (TypeError, ValueError):
        return False


def _run_case(
    predictor: Predictor, sup: EvalScan, qry: EvalScan, lid: int, q_z: list[int], s_z: list[int],
    fold: int, organ: str, qid: str, sid: str, n_chunks: int, shots: int, cleanup: bool = False,
) -> CaseResult:
    z0, z1 = q_z[0], q_z[-1] + 1
    pred = np.zeros(qry.label.shape[:2] + (z1 - z0,), dtype=bool)
    seconds = 0.0
    used: list[list[int]] = []
    for q_chunk, s_chunk in chunk_support_slices(s_z, q_z, n_chunks, shots):
        s_img = volume_slices(sup.image, s_chunk)
        s_msk = torch.from_numpy(
            np.ascontiguousarray(np.moveaxis(sup.label[:, :, s_chunk] == lid, 2, 0), dtype=np.float32)
        )
        q_img = volume_slices(qry.image, q_chunk)
        t0 = time.perf_counter()
        if takes_spacing(predictor):  # the shared slice pipeline needs the pixel sizes
            prob = predictor.predict(s_img, s_msk, q_img, spacing=(sup.spacing[:2], qry.spacing[:2]))
        else:
            prob = predictor.predict(s_img, s_msk, q_img)
        seconds += time.perf_counter() - t0
        prob = torch.as_tensor(prob).detach().to("cpu", torch.float32)
        if tuple(prob.shape) != tuple(q_img.shape):
            raise RuntimeError(
                f"predictor returned shape {tuple(prob.shape)} for queries of shape {tuple(q_img.shape)} "
                f"(supports {tuple(s_img.shape)}): predict() must return one probability map per query "
                "slice at the query's own size [N, Hq, Wq]; support and query sizes may differ "
                "(docs/architecture.md, 'Few-shot predictor')")
        if not torch.isfinite(prob).all():
            raise RuntimeError("predictor returned non-finite probabilities")
        hard = (prob >= PROB_THRESHOLD).numpy()
        for k, z in enumerate(q_chunk):
            pred[:, :, z - z0] = hard[k]
        used.append(s_chunk)
    if cleanup:
        from ..inference.cleanup import clean_mask

        pred = clean_mask(pred)
    gt = qry.label[:, :, z0:z1] == lid
    m = all_metrics(pred, gt, qry.spacing)
    n = len(q_z)
    return CaseResult(
        fold=fold, organ=organ, query_id=qid, support_id=sid, dice=m["dice"], hd95=m["hd95"],
        assd=m["assd"], tp=m["tp"], fp=m["fp"], fn=m["fn"], n_slices=n, seconds=seconds,
        slices_per_s=n / seconds if seconds > 0 else float("nan"), query_slices=q_z, support_slices=used,
    )
