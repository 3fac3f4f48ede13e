"""Supervoxel pseudo-labels: 3-D Felzenszwalb graph segmentation (ADNet) and 2-D superpixels
(SSL-ALPNet), inside the body mask of :mod:`sdfsmis.data.body`.

3-D Felzenszwalb (Felzenszwalb & Huttenlocher, IJCV 2004; the 3-D variant of Hansen et al., ADNet,
MedIA 2022), implemented here with numba:

* Graph: one node per voxel, edges to the 6 face neighbours (``connectivity=6``) or all 26
  neighbours (``connectivity=26``, ADNet's choice and the default).
* Edge weight: ``|I(a) - I(b)| * w(d)`` on intensities min-max scaled to 0..255 (optionally
  gaussian-smoothed first). **Anisotropic spacing**: ``w(d)`` is the root-mean-square voxel spacing
  over the axes that the step ``d`` moves along, divided by the finest spacing,
  ``w(d) = sqrt(sum_{i: d_i != 0} (s_i / s_min)^2 / #{i: d_i != 0}) ``. With spacing
  ``(1.25, 1.25, 7.7)`` this gives 1 in-plane, 6.16 along z and ``sqrt((1 + 6.16^2) / 2)`` for
  in-plane/z diagonals: exactly ADNet's weights (which assume equal in-plane spacing), generalised to
  three different spacings. Coarse axes thus cost more to cross, so segments grow in-plane first.
  The optional gaussian ``sigma`` is in units of the finest voxel size, i.e. ``sigma * s_min / s_i``
  voxels along axis ``i`` (ADNet divides sigma by the spacing as well); ADNet uses ``sigma = 0``.
* Merging: Kruskal order over the edges sorted by weight (an O(E) counting sort into 2^16 buckets
  uniform in sqrt(weight), finest near 0 where the threshold acts; ties in a fixed order, so the
  result is deterministic). Union-find joins two components when the edge weight is below
  ``min(Int(C1) + k/|C1|, Int(C2) + k/|C2|)``, ``Int`` being the largest weight joined inside a
  component and ``k = scale / 255`` (scikit-image's convention for ``scale``, which ADNet keeps while
  feeding 0..255 intensities: its ``scale=1`` means ``k = 1/255`` of an intensity level). A second
  pass over the same order joins every pair of adjacent components of which one is smaller than
  ``min_size`` (ADNet: 5000 for abdomen, 1000 for cardiac). Both passes stop as soon as no later
  edge can change the result, and the second skips edges between components already known to be
  large; the output equals a plain run over all edges (checked against one in the tests).

Afterwards everything outside the body mask is zeroed and the remaining supervoxels are numbered
``1..N``. Volumes are ``[X, Y, Z]`` with axial slices ``[:, :, z]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numba
import numpy as np
from scipy import ndimage as ndi

from .body import body_mask, minmax_255

Method = Literal["felzenszwalb3d", "felzenszwalb2d"]
METHODS: dict[str, str] = {"3d": "felzenszwalb3d", "2d": "felzenszwalb2d"}
N_BUCKETS = 1 << 16  # buckets of the counting sort of edge weights (uniform in sqrt(weight))


@dataclass(frozen=True)
class SupervoxelConfig:
    """Parameters of the pseudo-label generation (recorded in ``dataset.json``)."""

    method: Method = "felzenszwalb3d"
    min_size: int = 5000  # voxels (3-D) or pixels per slice (2-D)
    scale: float = 1.0  # Felzenszwalb k = scale / 255 intensity levels (scikit-image / ADNet meaning)
    sigma: float = 0.0  # gaussian smoothing, in units of the finest voxel spacing
    connectivity: int = 26  # 6 or 26 (3-D only)
    body_threshold: float = 10.0  # body mask threshold on the 0..255 min-max scale (ADNet: 10)

    def __post_init__(self) -> None:
        if self.method not in ("felzenszwalb3d", "felzenszwalb2d"):
            raise ValueError(f"unknown supervoxel method {self.method!r}")
        if self.connectivity not in (6, 26):
            raise ValueError(f"connectivity must be 6 or 26, got {self.connectivity}")
        if self.min_size < 1 or self.scale < 0 or self.sigma < 0:
            raise ValueError("min_size must be >= 1, scale and sigma >= 0")

    @classmethod
    def default(cls, method: str = "3d", min_size: int | None = None, dataset_min_size: int = 5000) -> SupervoxelConfig:
        """ADNet's 3-D setting (sigma 0, the dataset's min_size) or SSL-ALPNet's 2-D one
        (scikit-image ``felzenszwalb(slice, min_size=400, sigma=1)``)."""
        full = METHODS.get(method, method)
        if full == "felzenszwalb3d":
            return cls(full, min_size=min_size or dataset_min_size, sigma=0.0)
        if full == "felzenszwalb2d":
            return cls(full, min_size=min_size or 400, sigma=1.0)
        raise ValueError(f"unknown supervoxel method {method!r}: use '3d' or '2d'")

    @property
    def pair_offset(self) -> int:
        """Slice offset between the two slices of an ``sv_pairs`` row: 1 for supervoxels (z, z+1);
        0 for per-slice superpixels, which never span two slices (SSL-ALPNet pairs a slice with
        an augmented copy of itself)."""
        return 1 if self.method == "felzenszwalb3d" else 0

    def to_json(self) -> dict:
        return {**asdict(self), "pair_offset": self.pair_offset}


# ----------------------------------------------------------------------------------------------
# 3-D Felzenszwalb (numba)


def neighbour_steps(connectivity: int = 26) -> np.ndarray:
    """``[D, 3]`` int64 steps, one per undirected neighbour pair (3 for 6-, 13 for 26-connectivity)."""
    if connectivity == 6:
        return np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.int64)
    steps = [
        (dx, dy, dz)
        for dx in (-1, 0, 1)
        for dy in (-1, 0, 1)
        for dz in (-1, 0, 1)
        if (dx, dy, dz) > (0, 0, 0)  # first non-zero component positive: one of each +-pair
    ]
    return np.array(steps, dtype=np.int64)


def step_weights(steps: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``[D]`` float64 edge-weight factors: RMS spacing of the moved axes over the finest spacing."""
    sp = np.asarray(spacing, dtype=np.float64) / float(min(spacing))
    moved = steps != 0
    return np.sqrt((moved * sp**2).sum(axis=1) / moved.sum(axis=1))


@numba.njit(cache=True, nogil=True)
def _find(parent: np.ndarray, i: int) -> int:
    """Root of ``i``; ``parent[r] = -size`` at a root, so the size comes with the root's cache line."""
    root = i
    while parent[root] >= 0:
        root = parent[root]
    while i != root:  # path compression
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@numba.njit(cache=True, nogil=True)
def _join(parent: np.ndarray, ra: int, rb: int) -> int:
    """Union by size of two roots; returns the new root."""
    if parent[ra] > parent[rb]:  # ra is the smaller one (sizes are stored negated)
        ra, rb = rb, ra
    parent[ra] += parent[rb]
    parent[rb] = ra
    return ra


@numba.njit(cache=True, nogil=True)
def _bucket(w, q, n_buckets):
    """Bucket of weight ``w``: sqrt spacing, i.e. fine near 0 where the Felzenszwalb threshold acts."""
    return min(int(np.sqrt(w) * q), n_buckets - 1)


@numba.njit(cache=True, nogil=True)
def _sorted_edges(img, shape, steps, weights, q, n_buckets, edges):
    """Counting sort of all neighbour edges by weight.

    Pass 0 counts the edges per bucket; pass 1 writes each edge id ``voxel * D + d`` into ``edges``
    (which must have room for every edge) in nondecreasing bucket order, ties in (d, voxel) order.
    """
    nx, ny, nz = shape[0], shape[1], shape[2]
    n_dir = steps.shape[0]
    starts = np.zeros(n_buckets + 1, dtype=np.int64)
    for stage in range(2):
        if stage == 1:
            for i in range(n_buckets):  # counts -> start positions
                starts[i + 1] += starts[i]
        for d in range(n_dir):
            dx, dy, dz = steps[d, 0], steps[d, 1], steps[d, 2]
            off = (dx * ny + dy) * nz + dz
            wd = weights[d]
            for x in range(max(0, -dx), nx - max(0, dx)):
                for y in range(max(0, -dy), ny - max(0, dy)):
                    base = (x * ny + y) * nz
                    for z in range(max(0, -dz), nz - max(0, dz)):
                        a = base + z
                        key = _bucket(abs(img[a] - img[a + off]) * wd, q, n_buckets)
                        if stage == 0:
                            starts[key + 1] += 1
                        else:
                            edges[starts[key]] = a * n_dir + d
                            starts[key] += 1


def _n_edges(shape: tuple[int, ...], steps: np.ndarray) -> int:
    return int(sum(np.prod([n - abs(int(s)) for n, s in zip(shape, step)]) for step in steps))


@numba.njit(cache=True, nogil=True)
def _merge(img, edges, offsets, weights, k, min_size, q, n_buckets):
    """Felzenszwalb merging over sorted edges; returns labels 0..N-1 (flat int32) and N."""
    n = img.size
    n_dir = offsets.size
    parent = np.full(n, -1, dtype=np.int32)  # every voxel a root of size 1
    inner = np.zeros(n, dtype=np.float32)  # Int(C): largest weight joined inside C (at roots)
    # A join needs w < Int(C) + k/|C| <= (largest weight joined so far) + k, and weights only grow:
    # once w reaches that bound no later edge can join anything, so the first pass stops there.
    bound = k
    for i in range(edges.size):
        e = np.int64(edges[i])
        a = e // n_dir
        d = e - a * n_dir
        b = a + offsets[d]
        w = abs(img[a] - img[b]) * weights[d]  # the same expression as in the sort: same bucket
        if w >= bound:
            if _bucket(w, q, n_buckets) > _bucket(bound, q, n_buckets):
                break  # edges are sorted by bucket, not exactly within one
            continue
        ra = _find(parent, a)
        rb = _find(parent, b)
        if ra == rb:
            continue
        if w < min(inner[ra] - k / parent[ra], inner[rb] - k / parent[rb]):
            top = max(w, inner[ra], inner[rb])
            inner[_join(parent, ra, rb)] = top
            bound = max(bound, w + k)
    if min_size > 1:
        # Second pass: join neighbours while one side is below min_size; stop when none is left.
        # ``small[v]`` caches "v's component may be small": components only grow, so a voxel once seen
        # in a large component stays in one, and an edge between two such voxels is skipped without
        # the two random-access root look-ups. The cache is refreshed when the count of small
        # components has dropped eightfold.
        n_small = 0
        for i in range(n):
            if parent[i] < 0 and -parent[i] < min_size:
                n_small += 1
        small = np.ones(n, dtype=np.uint8)
        refresh_at = n_small // 8
        for i in range(edges.size):
            if n_small == 0:
                break
            if n_small <= refresh_at:
                for v in range(n):
                    small[v] = -parent[_find(parent, v)] < min_size
                refresh_at = n_small // 8
            e = np.int64(edges[i])
            a = e // n_dir
            b = a + offsets[e - a * n_dir]
            if small[a] == 0 and small[b] == 0:
                continue
            ra = _find(parent, a)
            rb = _find(parent, b)
            if ra != rb and (-parent[ra] < min_size or -parent[rb] < min_size):
                n_small -= (-parent[ra] < min_size) + (-parent[rb] < min_size)
                r = _join(parent, ra, rb)
                n_small += -parent[r] < min_size
    labels = np.empty(n, dtype=np.int32)
    lut = np.full(n, -1, dtype=np.int32)
    count = 0
    for i in range(n):
        r = _find(parent, i)
        if lut[r] < 0:
            lut[r] = count
            count += 1
        labels[i] = lut[r]
    return labels, count


def felzenszwalb_3d(
    image: np.ndarray,
    *,
    scale: float = 1.0,
    sigma: float = 0.0,
    min_size: int = 5000,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    connectivity: int = 26,
) -> np.ndarray:
    """3-D Felzenszwalb segmentation of ``image`` ``[X, Y, Z]`` (intensities on a 0..255 scale).

    Returns int32 labels ``[X, Y, Z]`` numbered ``0..N-1`` in voxel order (every voxel labelled).
    See the module docstring for the graph, the spacing rule and the meaning of ``scale``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"felzenszwalb_3d needs a 3-D array, got shape {image.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    if sigma > 0:
        rel = np.asarray(spacing, dtype=np.float64) / float(min(spacing))
        image = ndi.gaussian_filter(image, sigma=sigma / rel, mode="nearest")
    steps = neighbour_steps(connectivity)
    weights = step_weights(steps, spacing)
    shape = np.asarray(image.shape, dtype=np.int64)
    flat = np.ascontiguousarray(image).ravel()
    max_cost = float(flat.max() - flat.min()) * float(weights.max())
    q = (N_BUCKETS - 1) / np.sqrt(max_cost) if max_cost > 0 else 0.0
    n_edges = _n_edges(image.shape, steps)
    edges = np.empty(n_edges, dtype=np.uint32 if flat.size * len(steps) < 2**32 else np.int64)
    _sorted_edges(flat, shape, steps, weights, q, N_BUCKETS, edges)
    offsets = (steps[:, 0] * shape[1] * shape[2] + steps[:, 1] * shape[2] + steps[:, 2]).astype(np.int64)
    labels, _ = _merge(flat, edges, offsets, weights, float(scale) / 255.0, int(min_size), q, N_BUCKETS)
    return labels.reshape(image.shape)


def felzenszwalb_2d(
    image: np.ndarray, *, scale: float = 1.0, sigma: float = 1.0, min_size: int = 400
) -> np.ndarray:
    """Per-slice scikit-image Felzenszwalb superpixels of ``image`` ``[X, Y, Z]`` (SSL-ALPNet).

    Returns int32 ``[X, Y, Z]`` labels ``0..N-1``, unique across slices.
    """
    from skimage.segmentation import felzenszwalb

    image = np.asarray(image, dtype=np.float64)
    out = np.empty(image.shape, dtype=np.int32)
    offset = 0
    for z in range(image.shape[2]):
        seg = felzenszwalb(image[:, :, z], scale=scale, sigma=sigma, min_size=min_size)
        out[:, :, z] = seg + offset
        offset += int(seg.max()) + 1
    return out


def mask_and_relabel(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero ``segments`` (labels ``0..M-1``) outside ``mask`` and renumber the rest ``1..N``
    in order of their old labels. Returns int32 of the same shape."""
    segments = np.asarray(segments)
    present = np.bincount(segments[mask].ravel(), minlength=int(segments.max()) + 1) > 0
    lut = np.zeros(present.size, dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return np.where(mask, lut[segments], 0).astype(np.int32)


def compute_supervoxels(
    image: np.ndarray,
    spacing: tuple[float, float, float],
    config: SupervoxelConfig = SupervoxelConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels of one raw volume ``[X, Y, Z]``.

    Returns ``(supervoxels, body)``: int32 ``[X, Y, Z]`` with 0 outside the body and ``1..N``
    inside, and the bool body mask.
    """
    scaled = minmax_255(image)
    body = body_mask(image, threshold=config.body_threshold)
    if config.method == "felzenszwalb3d":
        seg = felzenszwalb_3d(
            scaled,
            scale=config.scale,
            sigma=config.sigma,
            min_size=config.min_size,
            spacing=spacing,
            connectivity=config.connectivity,
        )
    else:
        seg = felzenszwalb_2d(scaled, scale=config.scale, sigma=config.sigma, min_size=config.min_size)
    return mask_and_relabel(seg, body), body


def supervoxel_slice_pairs(supervoxels: np.ndarray, min_pixels: int = 200, offset: int = 1) -> np.ndarray:
    """``[M, 2]`` int32 rows ``(z, sv)``: supervoxel ``sv`` covers at least ``min_pixels`` pixels on
    slice ``z`` and on slice ``z + offset``; sorted by ``z`` then ``sv``."""
    n = int(supervoxels.max()) if supervoxels.size else 0
    n_z = supervoxels.shape[2]
    counts = np.zeros((n_z, n + 1), dtype=np.int64)
    for z in range(n_z):
        counts[z] = np.bincount(supervoxels[:, :, z].ravel(), minlength=n + 1)
    ok = counts >= min_pixels
    ok[:, 0] = False
    both = ok[: n_z - offset] & ok[offset:] if offset > 0 else ok
    zs, svs = np.nonzero(both)
    return np.stack([zs, svs], axis=1).astype(np.int32).reshape(-1, 2)
