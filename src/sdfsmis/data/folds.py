"""Five-fold splits over the sorted scan ids (ADNet / RPT), and the support-scan choice.

ADNet's folds hold overlapping index ranges of size ``n // 5 + 1``; the last fold wraps around to index 0.
CHAOS (20 scans): {0-4}, {4-8}, {8-12}, {12-16}, {16-19}+{0}; Synapse (30): {0-6}, ..., {24-29}+{0}.
The same rule gives MS-CMRSeg (35): {0-7}, {7-14}, ..., {28-34}+{0}.
"""

from __future__ import annotations

from collections.abc import Sequence

N_FOLDS = 5


def fold_indices(n_scans: int, fold: int) -> list[int]:
    """Indices (into the sorted scan list) of the scans tested in ``fold``."""
    if not 0 <= fold < N_FOLDS:
        raise ValueError(f"fold must be in 0..{N_FOLDS - 1}, got {fold}")
    if n_scans < N_FOLDS:
        raise ValueError(f"need at least {N_FOLDS} scans for {N_FOLDS} folds, got {n_scans}")
    step = n_scans // N_FOLDS
    start = fold * step
    if fold == N_FOLDS - 1:
        return sorted(set(range(start, n_scans)) | {0})
    return list(range(start, start + step + 1))


def split(scan_ids: Sequence[str], fold: int) -> tuple[list[str], list[str]]:
    """(train ids, test ids) of a fold. ``scan_ids`` must already be in sorted order."""
    test = [scan_ids[i] for i in fold_indices(len(scan_ids), fold)]
    train = [s for s in scan_ids if s not in set(test)]
    return train, test


def choose_support(test_ids: Sequence[str], rule: str = "last") -> str:
    """Pick the support scan of a fold.

    ``last`` (ADNet: the last scan of the fold), ``index:N`` (RPT uses index 2), or ``id:X``.
    """
    if rule == "last":
        return test_ids[-1]
    kind, _, value = rule.partition(":")
    if kind == "index":
        return test_ids[int(value)]
    if kind == "id":
        if value not in test_ids:
            raise ValueError(f"support id {value!r} is not in this fold's scans {list(test_ids)}")
        return value
    raise ValueError(f"unknown support rule {rule!r}: use 'last', 'index:N' or 'id:X'")
