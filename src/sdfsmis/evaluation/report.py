"""Evaluation reports: per-case CSV / JSON, a summary JSON, and Markdown tables like the paper's Table 1.

:func:`run_evaluation` (what ``sdfsmis evaluate`` wraps) = :func:`~.protocol.evaluate` +
:func:`write_reports`. Files written into ``out_dir``:

- ``cases.csv``, ``cases.json``: one row per (fold, query scan, organ);
- ``summary.json``: config, fold plan, per-organ means (over queries, then folds), per-fold means;
- ``table.md``: Dice (%), HD95 (mm), ASSD (mm) and slices/s; rows = method (+ setting), columns =
  the dataset's evaluated organs in ``spec.eval_organs`` order + Mean.

Every file is written to a temporary name and renamed once all of them are complete; nothing is
written when the inputs are rejected or the evaluation fails.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import InputError
from .protocol import EvalResult, Predictor, evaluate
from .tables import markdown_tables

CSV_FIELDS = (
    "fold", "organ", "query_id", "support_id", "dice", "hd95", "assd", "tp", "fp", "fn",
    "n_slices", "seconds", "slices_per_s", "query_slices", "support_slices",
)


def _json_clean(obj: Any) -> Any:
    """NaN/inf -> None so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def _cases_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        rec = {k: r.get(k) for k in CSV_FIELDS}
        rec["query_slices"] = " ".join(str(z) for z in r["query_slices"])
        rec["support_slices"] = ";".join(" ".join(str(z) for z in c) for c in r["support_slices"])
        for k in ("dice", "hd95", "assd", "seconds", "slices_per_s"):
            rec[k] = "nan" if rec[k] is None or math.isnan(rec[k]) else f"{rec[k]:.6g}"
        writer.writerow(rec)
    return buf.getvalue()


def write_reports(result: EvalResult, out_dir: str | Path, *, setting: str = "") -> dict[str, Path]:
    """Write ``cases.csv``, ``cases.json``, ``summary.json`` and ``table.md``; returns their paths."""
    out_dir = Path(out_dir)
    rows = result.rows()
    summary = result.summary()
    summary["setting"] = setting
    organs = result.config["organs"]
    table = (
        f"## {result.dataset}: {result.method}\n\n"
        f"Support rule `{result.config['support']}`, {result.config['shots']}-shot, "
        f"{result.config['n_chunks']} chunks, folds {result.config['folds']}; "
        "Dice 3-D per query, mean over queries per organ, then over folds.\n\n"
        + markdown_tables([(result.method, setting, summary)], organs)
    )
    files = {
        "cases.csv": _cases_csv(rows),
        "cases.json": json.dumps(_json_clean(rows), indent=1) + "\n",
        "summary.json": json.dumps(_json_clean(summary), indent=1) + "\n",
        "table.md": table,
    }
    return atomic.write_files(out_dir, files)


def combine_summaries(summary_files: Sequence[str | Path]) -> str:
    """One set of Markdown tables with a row per ``summary.json`` (e.g. several methods / settings
    on one dataset); the columns are the first summary's organs."""
    entries = []
    organs: list[str] = []
    for f in summary_files:
        path = Path(f)
        try:
            summ = json.loads(path.read_text())
            label, setting = str(summ["method"]), str(summ.get("setting", ""))
            organs = organs or list(summ["config"]["organs"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(path, f"not an evaluation summary.json ({err!r})") from err
        entries.append((label, setting, summ))
    return markdown_tables(entries, organs)


def open_prepared(prepared_root: str | Path):
    """``PreparedDataset(prepared_root)`` after checking the folder is a prepared dataset."""
    root = Path(prepared_root)
    if not root.is_dir():
        raise InputError(root, "prepared dataset folder not found")
    if not (root / "dataset.json").is_file():
        raise InputError(root, "not a prepared dataset (no dataset.json); run `sdfsmis prepare` first")
    from ..data.prepared import PreparedDataset

    return PreparedDataset(root)


#: Predicted foreground below this fraction of the true foreground: the predictor "marks nothing".
EMPTY_FRACTION = 0.05


def empty_warnings(result: EvalResult) -> list[str]:
    """One line per organ (or for the whole run) where the predictor marked almost nothing:
    fewer predicted voxels than ``EMPTY_FRACTION`` of the true ones over all its cases."""
    lines = []
    groups: dict[str, list] = {}
    for case in result.cases:
        groups.setdefault(case.organ, []).append(case)
    for organ, cases in groups.items():
        predicted = sum(c.tp + c.fp for c in cases)
        true = sum(c.tp + c.fn for c in cases)
        if true > 0 and predicted < EMPTY_FRACTION * true:
            empty = sum(1 for c in cases if c.tp + c.fp == 0)
            lines.append(f"{result.method} marks almost nothing on {organ}: {predicted} voxels predicted for "
                         f"{true} true over {len(cases)} cases ({empty} empty); check the model "
                         "(train longer, or --threshold) before reading its Dice")
    return lines


def run_evaluation(
    predictor: Predictor,
    prepared_root: str | Path,
    out_dir: str | Path,
    *,
    setting: str = "",
    **kwargs: Any,
) -> EvalResult:
    """Evaluate ``predictor`` on the prepared dataset at ``prepared_root`` and write the reports to
    ``out_dir``. ``kwargs`` go to :func:`~.protocol.evaluate` (folds, organs, support, n_chunks,
    shots, progress). Bad input raises :class:`InputError` before anything is written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    prepared = open_prepared(prepared_root)
    result = evaluate(predictor, prepared, **kwargs)
    result.setting = setting
    result.warnings = empty_warnings(result)
    result.outputs = {k: str(v) for k, v in write_reports(result, out, setting=setting).items()}
    return result
