from __future__ import annotations

import numpy as np
import pytest

from sdfsmis.data.supervoxels import (
    SupervoxelConfig,
    body_mask,
    compute_supervoxels,
    felzenszwalb_2d,
    felzenszwalb_3d,
    mask_and_relabel,
    neighbour_steps,
    step_weights,
    supervoxel_slice_pairs,
)


def blocks(seed: int = 0, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """16x16x12 volume of 8 blocks (2x2x2 grid) with distinct intensities plus gaussian noise."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((16, 16, 12), np.int32)
    truth[8:] += 1
    truth[:, 8:] += 2
    truth[:, :, 6:] += 4
    levels = np.array([20, 50, 80, 110, 140, 170, 200, 230], np.float32)
    return levels[truth] + rng.normal(0, noise, truth.shape).astype(np.float32), truth


@pytest.mark.parametrize("connectivity", [6, 26])
def test_piecewise_constant_regions_are_recovered(connectivity):
    image, truth = blocks()
    seg = felzenszwalb_3d(image, min_size=100, spacing=(1.0, 1.0, 2.0), connectivity=connectivity)
    assert seg.dtype == np.int32 and seg.shape == truth.shape
    assert set(np.unique(seg)) == set(range(8))  # labels 0..N-1, one per block
    for t in range(8):
        assert np.unique(seg[truth == t]).size == 1  # each block is one segment


def test_min_size_is_enforced_and_deterministic():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (12, 12, 8)).astype(np.float32)
    seg = felzenszwalb_3d(image, min_size=50, spacing=(1, 1, 3))
    assert np.bincount(seg.ravel()).min() >= 50
    assert np.array_equal(seg, felzenszwalb_3d(image, min_size=50, spacing=(1, 1, 3)))
    assert felzenszwalb_3d(image, min_size=1).max() > seg.max()


def test_larger_scale_gives_fewer_segments():
    image, _ = blocks(noise=6.0)
    n = [felzenszwalb_3d(image, scale=s, min_size=1).max() + 1 for s in (1.0, 300.0, 3000.0)]
    assert n[0] > n[1] > n[2]


@pytest.mark.parametrize("connectivity", [6, 26])
def test_spacing_decides_which_boundary_is_crossed(connectivity):
    # Four 4x8x4 blocks: +30 across the x-half, +10 across the z-half. Each block is below min_size,
    # so each joins its neighbour over the cheapest boundary. Isotropic: the z boundary (10) is
    # cheaper, so segments split along x. With z spacing 8x the in-plane one, crossing z costs 80
    # and the x boundary (30) wins: segments split along z.
    x = np.arange(8)[:, None, None] >= 4
    z = np.arange(8)[None, None, :] >= 4
    image = np.broadcast_to(30.0 * x + 10.0 * z, (8, 8, 8)).astype(np.float32)
    iso = felzenszwalb_3d(image, min_size=200, spacing=(1.0, 1.0, 1.0), connectivity=connectivity)
    aniso = felzenszwalb_3d(image, min_size=200, spacing=(1.0, 1.0, 8.0), connectivity=connectivity)
    assert iso.max() == 1 and aniso.max() == 1
    assert np.array_equal(iso[:4], np.zeros_like(iso[:4])) and (iso[4:] == 1).all()  # split along x
    assert (aniso[:, :, :4] == aniso[0, 0, 0]).all() and (aniso[:, :, 4:] != aniso[0, 0, 0]).all()


def test_step_weights_follow_spacing():
    steps = neighbour_steps(26)
    assert len(steps) == 13 and len(neighbour_steps(6)) == 3
    w = dict(zip(map(tuple, steps), step_weights(steps, (1.25, 1.25, 7.7))))
    s = 7.7 / 1.25
    assert w[(1, 0, 0)] == pytest.approx(1.0) and w[(1, 1, 0)] == pytest.approx(1.0)
    assert w[(0, 0, 1)] == pytest.approx(s)
    assert w[(1, 0, 1)] == pytest.approx(np.sqrt((1 + s**2) / 2))
    assert w[(1, 1, 1)] == pytest.approx(np.sqrt((2 + s**2) / 3))


def test_body_mask_keeps_largest_component_and_fills_holes(nifti):
    image, _ = nifti.phantom()
    image = image.astype(np.float32)
    body = image > 0
    image[18:22, 18:22, :] = 0  # a dark hole inside the body (e.g. air in the bowel)
    image[0:2, 0:2, :] = 150  # a small bright object outside (e.g. the table)
    mask = body_mask(image)
    assert mask.dtype == bool
    assert np.array_equal(mask, body)
    assert not body_mask(np.zeros((4, 4, 2))).any()


def test_compute_supervoxels_on_phantom(nifti):
    image, label = nifti.phantom()
    sv, body = compute_supervoxels(image, nifti.spacing, SupervoxelConfig(min_size=1000))
    assert sv.dtype == np.int32 and (sv[~body] == 0).all() and (sv[body] > 0).all()
    assert set(np.unique(sv)) == set(range(sv.max() + 1))  # 0 and 1..N, no gaps
    for organ in (1, 2):  # each organ is one supervoxel, of its own
        ids = np.unique(sv[label == organ])
        assert ids.size == 1 and (sv[label != organ] != ids[0]).all()
    pairs = supervoxel_slice_pairs(sv)
    organ1 = np.unique(sv[label == 1])[0]
    assert sorted(z for z, s in pairs if s == organ1) == [2, 3, 4, 5, 6]  # slices 2..7, 240 px each


def test_2d_superpixels(nifti):
    image, label = nifti.phantom()
    cfg = SupervoxelConfig.default("2d", min_size=200)
    assert cfg.method == "felzenszwalb2d" and cfg.pair_offset == 0
    sv, body = compute_supervoxels(image, nifti.spacing, cfg)
    for z in range(1, sv.shape[2]):  # labels never shared between slices
        assert not set(np.unique(sv[:, :, z])) - {0} & set(np.unique(sv[:, :, :z])) - {0}
    organ_slice = sv[8:20, 10:30, 4]
    assert np.unique(organ_slice).size == 1 and organ_slice[0, 0] > 0
    seg = felzenszwalb_2d(np.zeros((6, 6, 3)), min_size=1)
    assert list(np.unique(seg)) == [0, 1, 2]


def test_slice_pairs_and_relabel():
    sv = np.zeros((20, 20, 3), np.int32)
    sv[:, :13, :] = 1  # 260 px on each slice
    sv[:, 13:, :2] = 2  # 140 px: too small
    sv[:, 13:, 2] = 3
    pairs = supervoxel_slice_pairs(sv)
    assert pairs.dtype == np.int32 and pairs.tolist() == [[0, 1], [1, 1]]
    same_slice = supervoxel_slice_pairs(sv, min_pixels=100, offset=0)
    assert same_slice.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2], [2, 1], [2, 3]]
    seg = np.array([[[0, 5, 5, 2, 7]]])
    mask = np.array([[[True, True, False, True, False]]])
    out = mask_and_relabel(seg, mask)
    assert out.tolist() == [[[1, 3, 0, 2, 0]]]


def reference_felzenszwalb(image, scale, min_size, spacing, connectivity, n_buckets=None):
    """Plain-Python Felzenszwalb over every edge, for checking: sorted exactly by weight (ties by
    direction then voxel), or with ``n_buckets`` in the documented bucket order (bucket of
    ``sqrt(weight)``, ties in the bucket by direction then voxel, whatever their weights)."""
    steps = neighbour_steps(connectivity)
    weights = step_weights(steps, spacing)
    shape = image.shape
    flat = image.ravel().astype(np.float32)
    edges = []
    for d, (dx, dy, dz) in enumerate(steps):
        for x in range(max(0, -dx), shape[0] - max(0, dx)):
            for y in range(max(0, -dy), shape[1] - max(0, dy)):
                for z in range(max(0, -dz), shape[2] - max(0, dz)):
                    a = np.ravel_multi_index((x, y, z), shape)
                    b = np.ravel_multi_index((x + dx, y + dy, z + dz), shape)
                    edges.append((float(abs(flat[a] - flat[b])) * weights[d], d, a, b))
    if n_buckets is None:
        edges.sort()
    else:
        q = (n_buckets - 1) / np.sqrt(float(flat.max() - flat.min()) * float(weights.max()))
        edges.sort(key=lambda e: (min(int(np.sqrt(e[0]) * q), n_buckets - 1), e[1], e[2]))
    parent, size, inner = list(range(flat.size)), [1] * flat.size, [0.0] * flat.size

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    k = scale / 255.0
    for w, _, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb and w < min(inner[ra] + k / size[ra], inner[rb] + k / size[rb]):
            parent[rb] = ra
            size[ra] += size[rb]
            inner[ra] = max(w, inner[ra], inner[rb])
    for _, _, a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb and (size[ra] < min_size or size[rb] < min_size):
            parent[rb] = ra
            size[ra] += size[rb]
    roots = np.array([find(i) for i in range(flat.size)])
    return roots.reshape(shape)


def same_partition(a, b):
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize(("scale", "min_size"), [(1.0, 1), (1.0, 10), (2000.0, 1), (2000.0, 10)])
def test_matches_plain_reference(connectivity, scale, min_size):
    rng = np.random.default_rng(3)
    image = (rng.integers(0, 6, (7, 6, 5)) * 20 + rng.integers(0, 3, (7, 6, 5))).astype(np.float32)
    spacing = (1.0, 1.5, 3.0)
    ours = felzenszwalb_3d(image, scale=scale, min_size=min_size, spacing=spacing, connectivity=connectivity)
    ref = reference_felzenszwalb(image, scale, min_size, spacing, connectivity)
    assert same_partition(ours, ref)
    assert 1 < len(np.unique(ours)) < image.size


@pytest.mark.parametrize("n_buckets", [None, 16])
@pytest.mark.parametrize(("scale", "min_size"), [(300.0, 1), (300.0, 8)])
def test_matches_the_reference_on_non_integer_intensities(n_buckets, scale, min_size, monkeypatch):
    """Continuous intensities put edges of different weights into one bucket of the counting sort
    (with 16 buckets, nearly all of them): the early stops and skips must still give the result of a
    plain run over the same order. With the default 2^16 buckets that order is the exact one here."""
    import sdfsmis.data.supervoxels as SV

    rng = np.random.default_rng(11)
    image = (rng.integers(0, 4, (6, 6, 5)) * 40 + rng.uniform(0, 12, (6, 6, 5))).astype(np.float32)
    assert not np.all(image == np.round(image))
    spacing = (1.0, 1.25, 2.5)
    if n_buckets is not None:
        monkeypatch.setattr(SV, "N_BUCKETS", n_buckets)
    ours = SV.felzenszwalb_3d(image, scale=scale, min_size=min_size, spacing=spacing, connectivity=26)
    ref = reference_felzenszwalb(image, scale, min_size, spacing, 26, n_buckets=n_buckets)
    assert same_partition(ours, ref)
    assert 1 < len(np.unique(ours)) < image.size
