"""Slice axis (acquisition axis, overrides, round trips), CT windowing and the 3-D clean-up."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sdfsmis.data.intensity import apply_window, detect_modality, model_intensities, normalise_image
from sdfsmis.errors import InputError
from sdfsmis.inference.cleanup import clean_labels, clean_mask
from sdfsmis.inference.geometry import slice_axis, to_file_order, to_slice_order

DATA = Path(os.environ.get("SDFSMIS_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))


def _rot_x(deg: float) -> np.ndarray:
    t = np.radians(deg)
    r = np.eye(4)
    r[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


def _affine(zooms, perm=(0, 1, 2), signs=(1, 1, 1)) -> np.ndarray:
    """Voxel axis j points along world axis perm[j] with sign signs[j] and spacing zooms[j]."""
    a = np.eye(4)
    a[:3, :3] = 0
    for j, (w, s, z) in enumerate(zip(perm, signs, zooms)):
        a[w, j] = s * z
    return a


def test_acquisition_axis_is_the_thickest_one_whatever_the_voxel_order():
    assert slice_axis(_affine((1, 1, 5))).file_axis == 2
    cut = slice_axis(_affine((5, 1, 1), perm=(2, 0, 1)))  # slices stored first: file axis 0 runs along S
    assert cut.file_axis == 0 and cut.view == "axial" and "".join(cut.directions) == "RAS"
    cor = slice_axis(_affine((1, 4, 1)))  # thick along A: a coronal acquisition
    assert cor.file_axis == 1 and cor.view == "coronal" and cor.directions == ("R", "S", "A")
    assert slice_axis(_affine((1, 1, 1), perm=(1, 2, 0))).file_axis == 1  # isotropic: ties go to S-I
    forced = slice_axis(_affine((1, 4, 1)), "axial")
    assert forced.file_axis == 2 and forced.view == "axial"


def test_oblique_short_axis_stack_is_cut_on_its_acquired_slices():
    aff = _rot_x(35) @ _affine((1.25, 1.25, 8.0), perm=(0, 2, 1), signs=(1, -1, 1))  # tilted, thick axis ~A
    cut = slice_axis(aff)
    assert cut.file_axis == 2 and cut.oblique_deg == pytest.approx(35, abs=0.5)
    # the Card-MRI headers carry such a tilt: the 8 mm axis is still the one cut
    card = sorted((DATA / "card-mri").glob("image_*.nii.gz"))
    if card:
        img = nib.load(str(card[0]))
        assert slice_axis(img.affine).file_axis == 2
        assert img.shape[2] < 30  # the short-axis stack, not 256 reformatted slices


@pytest.mark.parametrize("perm,signs", [((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (-1, 1, -1)), ((1, 2, 0), (1, -1, 1))])
def test_slice_order_round_trip_and_affine(perm, signs):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 9, (5, 6, 7))
    aff = _affine((1.0, 2.0, 3.0), perm, signs)
    cut = slice_axis(aff)
    out, new_aff = to_slice_order(data, aff, cut)
    np.testing.assert_array_equal(to_file_order(out, cut), data)
    assert nib.aff2axcodes(new_aff) == cut.directions
    # every voxel keeps its world position
    i, j, k = 1, 2, 3
    src = np.argwhere(data == out[i, j, k])
    world = new_aff @ [i, j, k, 1]
    assert any(np.allclose(aff @ [*s, 1], world) for s in src)


# ------------------------------------------------------------------------------------- CT windows
def test_synthetic_hu_volume_is_recognised_and_windowed():
    x, y, z = np.meshgrid(np.arange(40), np.arange(40), np.arange(6), indexing="ij")
    body = (x - 20) ** 2 + (y - 20) ** 2 < 15 ** 2
    hu = np.where(body, 40.0, -1000.0)  # soft tissue in air
    hu[(x - 20) ** 2 + (y - 26) ** 2 < 9] = 1200.0  # bone
    hu[(x - 14) ** 2 + (y - 20) ** 2 < 16] = 60.0  # a slightly brighter organ
    assert detect_modality(hu) == "ct"
    assert detect_modality(np.abs(hu) / 4) == "mr"  # non-negative magnitudes: MR
    windowed, used = model_intensities(hu)
    assert used == "ct"
    np.testing.assert_allclose(windowed, normalise_image(np.clip(hu, -125, 275)), atol=1e-6)
    raw, _ = model_intensities(hu, modality="mr")
    organ, tissue = (x - 14) ** 2 + (y - 20) ** 2 < 4, body & ((x - 26) ** 2 + (y - 14) ** 2 < 4)
    # the window spreads the 20 HU organ/tissue difference over far more of [-1, 1] than raw HU does
    assert windowed[organ].mean() - windowed[tissue].mean() > 4 * (raw[organ].mean() - raw[tissue].mean())
    with pytest.raises(InputError, match="--window"):
        apply_window(hu, (300, 100))


def test_shared_ct_mapped_back_to_hu_gives_the_prepared_normalisation():
    path = DATA / "abd-ct" / "image_0.nii.gz"
    if not path.is_file():
        pytest.skip("shared Abd-CT data not available")
    stored = np.asarray(nib.load(str(path)).dataobj)[::2, ::2, ::4].astype(np.float32)  # 0..255 = [-125, 275] HU
    hu = stored / 255.0 * 400.0 - 125.0
    hu[stored == 0] = -1024.0  # below the window: air and fat (the stored file clipped them)
    assert detect_modality(hu) == "ct"
    out, used = model_intensities(hu)
    np.testing.assert_allclose(out, normalise_image(stored), atol=2e-4)
    mr = np.asarray(nib.load(str(DATA / "abd-mri" / "image_1.nii.gz")).dataobj)
    assert detect_modality(mr) == "mr"


# -------------------------------------------------------------------------------------- clean-up
def test_clean_mask_keeps_the_largest_component_and_fills_holes():
    m = np.zeros((20, 20, 10), bool)
    m[4:14, 4:14, 2:7] = True
    m[8:10, 8:10, 4] = False  # an inner hole
    m[6:8, 6:8, 6] = False  # a hole open at the organ's top slice
    m[17:19, 17:19, 9] = True  # a far false positive
    out = clean_mask(m)
    assert out[4:14, 4:14, 2:7].all() and out.sum() == 10 * 10 * 5
    assert not clean_mask(np.zeros_like(m)).any()


def test_clean_labels_does_not_fill_into_another_organ():
    lab = np.zeros((12, 12, 3), np.uint8)
    lab[2:10, 2:10, :] = 1
    lab[5:7, 5:7, :] = 2  # organ 2 inside organ 1
    lab[0, 11, 0] = 1  # stray voxel
    out = clean_labels(lab)
    assert (out == 2).sum() == 12 and out[0, 11, 0] == 0 and (out == 1).sum() == 64 * 3 - 12


def test_support_in_plane_axes_follow_the_query():
    """Two short-axis stacks tilted 43 and 46 degrees (closest canonical planes differ: coronal and
    sagittal): the support's in-plane axes still match the query's, so the slices look alike."""
    from sdfsmis.inference.geometry import _out_vectors, align_to, normal_angle

    def tilted(deg: float) -> np.ndarray:
        t = np.radians(deg)
        r = np.eye(4)
        r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        return r @ _affine((1.25, 1.25, 8.0), perm=(2, 0, 1))  # in-plane axes along S and R, slices along A

    s_aff, q_aff = tilted(43), tilted(46)
    q_aff = q_aff @ np.diag([-1, 1, -1, 1])  # and stored with two axes reversed
    q_cut = slice_axis(q_aff)
    s_own = slice_axis(s_aff)
    s_cut = align_to(s_aff, s_own, q_aff, q_cut)
    assert s_own.view != q_cut.view  # canonical planes alone would disagree
    vs, vq = _out_vectors(s_aff, s_cut), _out_vectors(q_aff, q_cut)
    assert all(vs[i] @ vq[i] > 0.9 for i in range(3))
    assert normal_angle(s_aff, s_cut, q_aff, q_cut) < 10
    axial, coronal = _affine((1, 1, 5)), _affine((1, 5, 1))
    assert normal_angle(axial, slice_axis(axial), coronal, slice_axis(coronal)) == pytest.approx(90)


def test_clean_mask_on_the_bounding_box_equals_the_whole_volume():
    """Random blobs, some touching the volume's faces: the boxed clean-up is the whole-volume one."""
    from scipy import ndimage

    from sdfsmis.inference.cleanup import _CONNECTIVITY, _clean, clean_mask

    def whole(mask):  # the clean-up rule run on the whole volume, no bounding box
        return _clean(mask.copy())

    rng = np.random.default_rng(0)
    for trial in range(6):
        vol = ndimage.gaussian_filter(rng.random((40, 36, 12)), 2.0) > 0.52
        vol[8:22, 8:22, 0:9] = True  # the largest component, with a closed cavity and a hole open at z = 0
        vol[11:19, 11:19, 3:6] = False
        vol[12:15, 12:15, 0:2] = False
        if trial % 2:
            vol[:, :, 0] |= vol[:, :, 1]  # organs on the first slice and the volume's faces
            vol[0] |= vol[1]
        assert ndimage.label(vol, structure=_CONNECTIVITY)[1] > 1 and (whole(vol) & ~vol).sum() > 100
        np.testing.assert_array_equal(clean_mask(vol), whole(vol))
