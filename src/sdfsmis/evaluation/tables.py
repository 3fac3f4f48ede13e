"""Markdown tables of evaluation summaries, shaped like the paper's Table 1.

Below both :mod:`.protocol` (``EvalResult.__str__``) and :mod:`.report` (``table.md``), so neither
imports the other to print a result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DISPLAY_NAMES = {
    "spleen": "Spleen", "liver": "Liver", "left_kidney": "LK", "right_kidney": "RK",
    "lv_bp": "LV-BP", "lv_myo": "LV-MYO", "rv": "RV",
}


def organ_display_name(organ: str) -> str:
    """Column name of an organ (paper style: Spleen, Liver, LK, RK; LV-BP, LV-MYO, RV)."""
    return DISPLAY_NAMES.get(organ, organ.replace("_", " ").title())


def _fmt(value: float | None, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:.2f}"


def markdown_tables(entries: Sequence[tuple[str, str, dict[str, Any]]], organs: Sequence[str]) -> str:
    """Markdown tables for one or more evaluation summaries.

    ``entries``: ``(method label, setting label or "", summary)`` with ``summary`` from
    :meth:`EvalResult.summary`; ``organs``: the column order (``spec.eval_organs``).
    """
    cols = [organ_display_name(o) for o in organs]
    tables = [
        ("Dice (%) ↑", "dice", 100.0),
        ("HD95 (mm) ↓", "hd95", 1.0),
        ("ASSD (mm) ↓", "assd", 1.0),
        ("Throughput (slices/s) ↑", "slices_per_s", 1.0),
    ]
    out = []
    for title, key, scale in tables:
        out.append(f"### {title}\n")
        out.append("| Method | Setting | " + " | ".join(cols) + " | Mean |")
        out.append("|---|---|" + "---:|" * (len(cols) + 1))
        for label, setting, summ in entries:
            per = summ.get("organs", {})
            cells = [_fmt(per.get(o, {}).get(key), scale) for o in organs]
            cells.append(_fmt(summ.get("mean", {}).get(key), scale))
            out.append(f"| {label} | {setting} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
