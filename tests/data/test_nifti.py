from __future__ import annotations

import numpy as np
import pytest

from sdfsmis.data.nifti import check_pair, check_support_mask, load_volume
from sdfsmis.errors import InputError


def test_load_image_and_label(tmp_path, nifti):
    img_path, lab_path = nifti.scan(tmp_path, "1")
    image = load_volume(img_path, "image")
    label = load_volume(lab_path, "label", label_ids=[1, 2, 3, 4])
    assert image.array.dtype == np.float32 and image.shape == nifti.shape
    assert label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 1, 2}
    assert image.spacing == pytest.approx(nifti.spacing)
    assert np.allclose(image.affine, np.diag([*nifti.spacing, 1.0]))
    check_pair(image, label)  # same grid: no error


def test_trailing_singleton_axis_is_squeezed(tmp_path, nifti):
    image, _ = nifti.phantom()
    path = nifti.save(tmp_path / "image_4d.nii.gz", image[..., None])
    assert load_volume(path).shape == nifti.shape


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 4, 2)])
def test_wrong_dimensionality(tmp_path, nifti, shape):
    path = nifti.save(tmp_path / "image_bad.nii.gz", np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    with pytest.raises(InputError, match="3-D") as err:
        load_volume(path)
    assert err.value.path == path


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_image(tmp_path, nifti, bad):
    image, _ = nifti.phantom()
    image = image.astype(np.float32)
    image[3, 4, 5] = bad
    path = nifti.save(tmp_path / "image_nan.nii.gz", image)
    with pytest.raises(InputError, match="NaN or infinite") as err:
        load_volume(path)
    assert "image_nan.nii.gz" in str(err.value)


def test_constant_image(tmp_path, nifti):
    path = nifti.save(tmp_path / "image_flat.nii.gz", np.full(nifti.shape, 7, np.int16))
    with pytest.raises(InputError, match="constant"):
        load_volume(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        load_volume(tmp_path / "nope.nii.gz")
    assert err.value.path.name == "nope.nii.gz"
    garbage = tmp_path / "image_x.nii.gz"
    garbage.write_bytes(b"this is not a nifti file" * 10)
    with pytest.raises(InputError, match="NIfTI") as err:
        load_volume(garbage)
    assert err.value.path == garbage


def test_truncated_gzip_is_unreadable(tmp_path, nifti):
    path = nifti.save(tmp_path / "image_t.nii.gz", nifti.phantom()[0])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError) as err:
        load_volume(path)
    assert err.value.path == path


def test_label_values(tmp_path, nifti):
    _, label = nifti.phantom()
    frac = nifti.save(tmp_path / "label_frac.nii.gz", label.astype(np.float32) * 0.5)
    with pytest.raises(InputError, match="integers"):
        load_volume(frac, "label")
    neg = nifti.save(tmp_path / "label_neg.nii.gz", label.astype(np.int16) - 1)
    with pytest.raises(InputError, match="non-negative"):
        load_volume(neg, "label")
    whole = nifti.save(tmp_path / "label_float.nii.gz", label.astype(np.float32))  # integer-valued floats are fine
    assert load_volume(whole, "label").array.dtype == np.uint8
    unknown = label.copy()
    unknown[0, 0, 0] = 9
    path = nifti.save(tmp_path / "label_9.nii.gz", unknown)
    with pytest.raises(InputError, match=r"label ids \[9\]") as err:
        load_volume(path, "label", label_ids=[1, 2, 3, 4])
    assert err.value.path == path


def test_check_pair_shape_and_affine(tmp_path, nifti):
    img_path, _ = nifti.scan(tmp_path, "1")
    image = load_volume(img_path)
    _, label = nifti.phantom()
    small = load_volume(nifti.save(tmp_path / "label_small.nii.gz", label[:, :, :8]), "label")
    with pytest.raises(InputError, match="shape") as err:
        check_pair(image, small)
    assert err.value.path.name == "label_small.nii.gz"
    shifted = np.diag([*nifti.spacing, 1.0])
    shifted[0, 3] = 0.5
    moved = load_volume(nifti.save(tmp_path / "label_moved.nii.gz", label, affine=shifted), "label")
    with pytest.raises(InputError, match="affine"):
        check_pair(image, moved)
    shifted[0, 3] = 1e-5  # within tolerance
    close = load_volume(nifti.save(tmp_path / "label_close.nii.gz", label, affine=shifted), "label")
    check_pair(image, close)


def test_support_mask_checks():
    mask = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="empty"):
        check_support_mask(mask, "m.nii.gz")
    mask[2:4, 2:4, 1] = 1
    mask[5:7, 5:7, 1] = 3
    with pytest.raises(InputError, match="several"):
        check_support_mask(mask, "m.nii.gz")
    fg = check_support_mask(mask, "m.nii.gz", label_id=3)
    assert fg.dtype == bool and fg.sum() == 4
    with pytest.raises(InputError, match="absent"):
        check_support_mask(mask, "m.nii.gz", label_id=2)
    with pytest.raises(InputError, match="non-negative"):
        check_support_mask(mask.astype(np.int8) - 1, "m.nii.gz")
    with pytest.raises(InputError, match="integers"):
        check_support_mask(mask * 0.3, "m.nii.gz")
    assert check_support_mask((mask == 3).astype(np.float32), "m.nii.gz").sum() == 4
