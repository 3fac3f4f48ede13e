"""The protocol's pairing of query slices with support slices (steps 2 and 3 of
:mod:`sdfsmis.evaluation.protocol`): both organ extents split into contiguous chunks, chunk ``i`` of
the query segmented with the middle slice(s) of support chunk ``i``. ``evaluate`` applies it to
prepared scans, ``predict`` (:mod:`sdfsmis.inference.planning`) to any scan pair."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def chunk_support_slices(
    support_slices: Sequence[int], query_slices: Sequence[int], n_chunks: int = 3, shots: int = 1
) -> list[tuple[list[int], list[int]]]:
    """Pair query chunks with the support slices that segment them.

    Returns one ``(query chunk slices, support slices)`` pair per non-empty query chunk, in order.
    Both inputs are sorted first. Query and support lists are split with ``np.array_split`` into
    ``n_chunks`` parts; support chunk ``i`` gives ``shots`` slices at indices
    ``floor((j + 0.5) * L / shots)`` (``shots = 1``: its middle slice ``L // 2``), duplicates
    dropped. If the support has fewer organ slices than ``n_chunks``, chunk ``i`` uses the support
    slice at index ``floor((i + 0.5) * S / n_chunks)`` of the ``S`` support slices.

    Example: support 10..19, query 3..9, 3 chunks, 1 shot ->
    ``[([3, 4, 5], [12]), ([6, 7], [15]), ([8, 9], [18])]``.
    """
    if n_chunks < 1 or shots < 1:
        raise ValueError(f"n_chunks and shots must be >= 1, got {n_chunks}, {shots}")
    sup = sorted(int(s) for s in support_slices)
    qry = sorted(int(q) for q in query_slices)
    if not sup:
        raise ValueError("the support has no slices of this organ")
    n_sup = len(sup)
    if n_sup >= n_chunks:
        sup_chunks = [list(c) for c in np.array_split(np.asarray(sup), n_chunks)]
    else:
        sup_chunks = [[sup[math.floor((i + 0.5) * n_sup / n_chunks)]] for i in range(n_chunks)]
    plan = []
    for i, q_chunk in enumerate(np.array_split(np.asarray(qry, dtype=int), n_chunks)):
        if len(q_chunk) == 0:
            continue
        chunk = sup_chunks[i]
        length = len(chunk)
        picks = sorted({math.floor((j + 0.5) * length / shots) for j in range(shots)})
        plan.append(([int(q) for q in q_chunk], [int(chunk[p]) for p in picks]))
    return plan
