"""Which slices: the support slices and the query slices of each organ (see ``sdfsmis.predict``).

Few-shot segmentation needs to know roughly where the organ is along the slice axis; the tool
decides it with a heuristic, not the user: the organ's extent in the support, as a fraction of the
support's body extent, is mapped to the same fraction of the query's body extent, widened by a
margin, and split into chunks paired with support slices by the evaluation protocol's rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
    slices by the evaluation protocol's rule (``sdfsmis.data.chunks.chunk_support_slices``);
    the ``z_margin`` slices below / above the core range join the first / last chunk.
    """
    from ..data.chunks import chunk_support_slices

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
