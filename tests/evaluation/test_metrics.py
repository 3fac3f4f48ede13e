"""Metrics: hand-computed Dice / HD95 / ASSD, empty-mask rules, anisotropic spacing, aggregation."""

import math

import numpy as np
import pytest

from sdfsmis.evaluation.metrics import (
    MetricAccumulator, all_metrics, assd, confusion_counts, dice, dice_from_counts, hd95,
)


def _vol(*voxels, shape=(5, 5, 5)):
    v = np.zeros(shape, dtype=bool)
    for x, y, z in voxels:
        v[x, y, z] = True
    return v


def test_dice_hand_values():
    gt = np.zeros((4, 4, 2), bool)
    gt[0:2, 0:3, 0] = True  # 6 voxels
    pred = np.zeros_like(gt)
    pred[1:3, 0:2, 0] = True  # 4 voxels; overlap: row 1, cols 0..1 = 2 voxels
    tp, fp, fn = confusion_counts(pred, gt)
    assert (tp, fp, fn) == (2, 2, 4)
    assert dice(pred, gt) == pytest.approx(2 * 2 / (4 + 6))
    assert dice(gt, gt) == 1.0
    assert dice_from_counts(3, 1, 2) == pytest.approx(6 / 9)


def test_empty_mask_rules():
    empty = np.zeros((5, 5, 5), bool)
    one = _vol((2, 2, 2))
    sp = (1.0, 1.0, 1.0)
    assert dice(empty, empty) == 1.0 and dice_from_counts(0, 0, 0) == 1.0
    assert hd95(empty, empty, sp) == 0.0 and assd(empty, empty, sp) == 0.0
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    for a, b in ((one, empty), (empty, one)):
        assert math.isnan(hd95(a, b, sp)) and math.isnan(assd(a, b, sp))


def test_surface_distances_anisotropic_hand_computed():
    # pred: one voxel; gt: that voxel and its neighbour along z.
    pred = _vol((2, 2, 1))
    gt = _vol((2, 2, 1), (2, 2, 2))
    # spacing z = 2 mm: directed pred->gt {0}, gt->pred {0, 2};
    # HD95 = max(0, percentile95([0, 2]) = 1.9); ASSD = (0 + 0 + 2) / 3.
    assert hd95(pred, gt, (1.0, 1.0, 2.0)) == pytest.approx(1.9)
    assert assd(pred, gt, (1.0, 1.0, 2.0)) == pytest.approx(2 / 3)
    # the same masks with z = 7.7 mm scale with the z spacing only
    assert hd95(pred, gt, (1.25, 1.25, 7.7)) == pytest.approx(0.95 * 7.7)
    assert assd(pred, gt, (1.25, 1.25, 7.7)) == pytest.approx(7.7 / 3)
    # a neighbour along x instead is measured with the x spacing
    gt_x = _vol((2, 2, 1), (3, 2, 1))
    assert assd(pred, gt_x, (0.5, 1.0, 7.7)) == pytest.approx(0.5 / 3)


def test_surface_distance_two_points_3d():
    pred = _vol((0, 0, 0))
    gt = _vol((2, 2, 1), (2, 2, 2))
    sp = (1.0, 1.0, 2.0)
    d1, d2 = math.sqrt(4 + 4 + 4), math.sqrt(4 + 4 + 16)
    # directed pred->gt: [d1]; gt->pred: [d1, d2] -> 95th percentile d1 + 0.95 (d2 - d1)
    assert hd95(pred, gt, sp) == pytest.approx(d1 + 0.95 * (d2 - d1))
    assert assd(pred, gt, sp) == pytest.approx((d1 + d1 + d2) / 3)


def test_shifted_slab_distance_equals_shift():
    gt = np.zeros((12, 12, 4), bool)
    gt[2:6, :, :] = True  # a slab spanning y and z
    pred = np.roll(gt, 2, axis=0)
    m = all_metrics(pred, gt, (1.5, 1.0, 3.0))
    assert (m["tp"], m["fp"], m["fn"]) == (2 * 12 * 4, 2 * 12 * 4, 2 * 12 * 4)
    assert m["dice"] == pytest.approx(0.5)
    # the farthest edges are the x faces, 2 voxels x 1.5 mm apart; MONAI also counts the faces on
    # the volume border as edges (some at distance 0), so the average is below the shift
    assert m["hd95"] == pytest.approx(2 * 1.5)
    assert 0 < m["assd"] < 2 * 1.5


def test_bad_inputs():
    with pytest.raises(ValueError):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 2)))
    with pytest.raises(ValueError):
        hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))
    with pytest.raises(ValueError):
        dice(np.zeros((3, 3)), np.zeros((3, 3)))


def test_accumulator_means_over_queries_then_folds():
    acc = MetricAccumulator(organs=("spleen", "liver"))
    nan = float("nan")
    acc.add({"fold": 0, "organ": "liver", "dice": 0.2, "hd95": 10.0, "assd": 2.0, "n_slices": 10, "seconds": 1.0})
    acc.add({"fold": 0, "organ": "liver", "dice": 0.4, "hd95": nan, "assd": nan, "n_slices": 10, "seconds": 1.0})
    acc.add({"fold": 1, "organ": "liver", "dice": 0.9, "hd95": 4.0, "assd": 1.0, "n_slices": 20, "seconds": 2.0})
    acc.add({"fold": 0, "organ": "spleen", "dice": 0.5, "hd95": 6.0, "assd": 3.0, "n_slices": 5, "seconds": 5.0})
    s = acc.summary()
    liver = s["organs"]["liver"]
    assert liver["per_fold"][0]["dice"] == pytest.approx(0.3)
    assert liver["dice"] == pytest.approx((0.3 + 0.9) / 2)  # not the pooled 0.5
    assert liver["hd95"] == pytest.approx((10.0 + 4.0) / 2)  # NaN left out of fold 0
    assert liver["n_undefined"] == 1 and liver["n_cases"] == 3
    assert liver["slices_per_s"] == pytest.approx(40 / 4.0)
    assert list(s["organs"]) == ["spleen", "liver"]
    assert s["mean"]["dice"] == pytest.approx((0.6 + 0.5) / 2)
    assert s["mean"]["slices_per_s"] == pytest.approx(45 / 9.0)
    with pytest.raises(KeyError):
        acc.add({"fold": 0, "organ": "liver"})
