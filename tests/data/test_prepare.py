from __future__ import annotations

import json
import os
import shutil
import time

import nibabel as nib
import numpy as np
import pytest

import sdfsmis.data.prepare as prep
from sdfsmis.data.datasets import SPECS
from sdfsmis.data.intensity import normalise_image
from sdfsmis.data.prepare import find_scans, prepare_dataset
from sdfsmis.data.prepared import FORMAT_VERSION, PreparedDataset
from sdfsmis.errors import InputError

MIN_SIZE = 1000  # the synthetic organs hold ~1300-1400 voxels


@pytest.fixture
def count_process(monkeypatch):
    """Counts the scans actually computed (the work that a re-run must skip)."""
    calls: list[str] = []
    real = prep._process

    def counting(scan, *args):
        calls.append(scan.id)
        return real(scan, *args)

    monkeypatch.setattr(prep, "_process", counting)
    return calls


def test_prepare_writes_the_documented_format(scan_folder, tmp_path):
    out = prepare_dataset(scan_folder, "abd-mri", tmp_path / "out", min_size=MIN_SIZE, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["dataset"] == "abd-mri"
    assert meta["spec"]["labels"] == SPECS["abd-mri"].labels
    assert meta["source"] == str(scan_folder.resolve())
    sv_meta = meta["supervoxels"]
    assert sv_meta["method"] == "felzenszwalb3d" and sv_meta["min_size"] == MIN_SIZE and sv_meta["sigma"] == 0.0
    assert "scale" in sv_meta and sv_meta["pair_offset"] == 1
    assert [s["id"] for s in meta["scans"]] == ["1", "2", "10"]  # numeric order

    ds = PreparedDataset(out)
    assert ds.scan_ids == ["1", "2", "10"] and ds.spec == SPECS["abd-mri"]
    for scan_id in ds.scan_ids:
        info = ds.info(scan_id)
        scan = ds.load(scan_id)
        src_label = np.asarray(nib.load(str(scan_folder / f"label_{scan_id}.nii.gz")).dataobj)
        assert info.shape == src_label.shape and info.file == f"scans/{scan_id}.npz"
        assert info.spacing == pytest.approx((1.25, 1.25, 4.0))
        assert np.allclose(info.affine, np.diag([1.25, 1.25, 4.0, 1.0]))
        assert scan.image.dtype == np.float16 and scan.label.dtype == np.uint8
        assert scan.body.dtype == bool and scan.supervoxels.dtype == np.int32 and scan.sv_pairs.dtype == np.int32
        assert float(scan.image.min()) == -1.0 and float(scan.image.max()) == 1.0
        assert np.array_equal(scan.label, src_label)
        # class_slices: every spec id, slices that hold it
        assert info.class_slices[1] == [2, 3, 4, 5, 6, 7] and info.class_slices["2"] == [3, 4, 5, 6, 7, 8]
        assert info.class_slices[3] == [] and info.class_slices[4] == []
        # supervoxels: 0 outside the body, 1..N inside
        assert (scan.supervoxels[~scan.body] == 0).all() and (scan.supervoxels[scan.body] > 0).all()
        assert info.n_supervoxels == scan.supervoxels.max() >= 3
        # sv_pairs: exactly the (z, sv) with >= 200 px on z and z+1
        sv = scan.supervoxels
        expected = [
            [z, s]
            for z in range(sv.shape[2] - 1)
            for s in range(1, info.n_supervoxels + 1)
            if (sv[:, :, z] == s).sum() >= 200 and (sv[:, :, z + 1] == s).sum() >= 200
        ]
        assert scan.sv_pairs.tolist() == expected and info.n_sv_pairs == len(expected) > 0
    assert ds.load("2") is ds.load("2")  # cached


def test_rerun_skips_done_scans_and_redoes_changed_ones(scan_folder, tmp_path, count_process, nifti):
    out = tmp_path / "out"
    prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE, progress=False)
    assert sorted(count_process) == ["1", "10", "2"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "scans").glob("*.npz")}
    meta_before = json.loads((out / "dataset.json").read_text())

    count_process.clear()
    prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE, progress=False)
    assert count_process == []
    assert {p.name: p.stat().st_mtime_ns for p in (out / "scans").glob("*.npz")} == before
    assert json.loads((out / "dataset.json").read_text()) == meta_before

    image2, _ = nifti.scan(scan_folder, "2", seed=7)  # a changed source scan
    os.utime(image2, ns=(time.time_ns(), time.time_ns() + 10**9))
    (out / "scans" / "10.npz").unlink()  # a missing output
    prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE, progress=False)
    assert sorted(count_process) == ["10", "2"]
    assert PreparedDataset(out).scan_ids == ["1", "2", "10"]

    count_process.clear()
    prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE + 1, progress=False)  # new parameters
    assert sorted(count_process) == ["1", "10", "2"]

    count_process.clear()
    (scan_folder / "image_10.nii.gz").unlink()
    (scan_folder / "label_10.nii.gz").unlink()
    prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE + 1, progress=False, overwrite=True)
    assert sorted(count_process) == ["1", "2"]
    assert sorted(p.name for p in (out / "scans").iterdir()) == ["1.json", "1.npz", "2.json", "2.npz"]


def test_other_dataset_in_out_needs_overwrite(scan_folder, tmp_path):
    out = prepare_dataset(scan_folder, "abd-mri", tmp_path / "out", min_size=MIN_SIZE, progress=False)
    with pytest.raises(InputError, match="abd-mri"):
        prepare_dataset(scan_folder, "card-mri", out, min_size=MIN_SIZE, progress=False)
    prepare_dataset(scan_folder, "card-mri", out, min_size=MIN_SIZE, progress=False, overwrite=True)
    assert PreparedDataset(out).dataset == "card-mri"


def test_2d_superpixels_and_workers(scan_folder, tmp_path):
    out = prepare_dataset(
        scan_folder, "abd-mri", tmp_path / "o2", supervoxels="2d", min_size=200, workers=2, progress=False
    )
    ds = PreparedDataset(out)
    assert ds.supervoxels["method"] == "felzenszwalb2d" and ds.pair_offset == 0
    scan = ds.load("1")
    for z, s in scan.sv_pairs:  # 2-D rows: >= 200 px on slice z itself
        assert (scan.supervoxels[:, :, z] == s).sum() >= 200
    assert len(scan.sv_pairs) > 0


def _bad_cases(nifti):
    """name -> (function breaking the source folder, file the error must name, message fragment)."""

    def missing_label(src):
        (src / "label_2.nii.gz").unlink()

    def shape_mismatch(src):
        _, label = nifti.phantom()
        nifti.save(src / "label_2.nii.gz", label[:, :, :-1])

    def affine_mismatch(src):
        _, label = nifti.phantom()
        nifti.save(src / "label_2.nii.gz", label, affine=np.diag([1.25, 1.25, 5.0, 1.0]))

    def unknown_label(src):
        _, label = nifti.phantom()
        label[1, 1, 1] = 9
        nifti.save(src / "label_2.nii.gz", label)

    def nan_image(src):
        image, _ = nifti.phantom()
        image = image.astype(np.float32)
        image[5, 5, 5] = np.nan
        nifti.save(src / "image_2.nii.gz", image)

    def two_d_image(src):
        nifti.save(src / "image_2.nii.gz", nifti.phantom()[0][:, :, 4])

    def unreadable(src):
        (src / "image_2.nii.gz").write_bytes(b"\x1f\x8b not really gzip")

    return {
        "missing label": (missing_label, "label_2.nii.gz", "missing"),
        "shape mismatch": (shape_mismatch, "label_2.nii.gz", "shape"),
        "affine mismatch": (affine_mismatch, "label_2.nii.gz", "affine"),
        "unknown label id": (unknown_label, "label_2.nii.gz", "not defined"),
        "nan": (nan_image, "image_2.nii.gz", "NaN"),
        "2-d": (two_d_image, "image_2.nii.gz", "3-D"),
        "unreadable": (unreadable, "image_2.nii.gz", "NIfTI"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(None)))
def test_bad_input_names_the_file_and_writes_nothing(scan_folder, tmp_path, nifti, case):
    breaker, name, fragment = _bad_cases(nifti)[case]
    breaker(scan_folder)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=fragment) as err:
        prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE, progress=False)
    assert err.value.path is not None and err.value.path.name == name
    assert name in str(err.value)
    assert not out.exists()


def test_bad_input_on_rerun_keeps_the_previous_dataset(scan_folder, tmp_path, nifti):
    out = prepare_dataset(scan_folder, "abd-mri", tmp_path / "out", min_size=MIN_SIZE, progress=False)
    before = (out / "dataset.json").read_text()
    _bad_cases(nifti)["nan"][0](scan_folder)
    with pytest.raises(InputError, match="image_2.nii.gz"):
        prepare_dataset(scan_folder, "abd-mri", out, min_size=MIN_SIZE, progress=False)
    assert (out / "dataset.json").read_text() == before


def test_source_folder_problems(tmp_path, nifti):
    with pytest.raises(InputError, match="not found"):
        find_scans(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image_"):
        prepare_dataset(empty, "abd-mri", tmp_path / "out", progress=False)
    nifti.save(empty / "label_3.nii.gz", nifti.phantom()[1])
    nifti.save(empty / "image_4.nii", nifti.phantom()[0])
    nifti.save(empty / "label_4.nii", nifti.phantom()[1])
    with pytest.raises(InputError, match="no matching image_3") as err:
        find_scans(empty)
    assert err.value.path.name == "label_3.nii.gz"
    with pytest.raises(InputError, match="unknown dataset"):
        prepare_dataset(empty, "no-such-dataset", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_prepared_dataset_rejects_other_folders(tmp_path, scan_folder):
    with pytest.raises(InputError, match="not a prepared dataset"):
        PreparedDataset(scan_folder)
    out = prepare_dataset(scan_folder, "abd-mri", tmp_path / "out", min_size=MIN_SIZE, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (out / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="format_version"):
        PreparedDataset(out)


def test_normalisation_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(50, 10, (20, 20, 10)).astype(np.float32)
    x[0, 0, 0] = 1e4  # an outlier beyond the 99.5th percentile
    y = normalise_image(x)
    assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == pytest.approx(1.0)
    assert (y == y.max()).sum() >= 10  # clipped at the percentile, not stretched to the outlier
    assert np.allclose(normalise_image(3 * x + 7), y, atol=1e-5)  # per-volume: affine-invariant


@pytest.mark.slow
def test_prepare_one_real_abd_mri_scan(real_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for kind in ("image", "label"):
        os.symlink(real_data / "abd-mri" / f"{kind}_2.nii.gz", src / f"{kind}_2.nii.gz")
    out = prepare_dataset(src, "abd-mri", tmp_path / "out", progress=False)
    ds = PreparedDataset(out)
    info, scan = ds.info("2"), ds.load("2")
    assert info.shape == (256, 256, 31) and info.spacing == pytest.approx((1.25, 1.25, 7.7))
    assert info.n_supervoxels >= 5 and info.n_sv_pairs > 0
    assert all(len(info.class_slices[i]) > 0 for i in (1, 2, 3, 4))  # all four organs present
    assert -1.0 <= float(scan.image.min()) < -0.9 and float(scan.image.max()) == 1.0
    # every supervoxel inside the body holds at least min_size voxels before masking: few tiny ones
    sizes = np.bincount(scan.supervoxels.ravel())[1:]
    assert np.median(sizes) > 1000
    shutil.rmtree(out)


def test_ct_dataset_in_hounsfield_units_is_windowed(tmp_path):
    """A CT dataset (modality "CT") stored in raw HU is clipped to the abdominal window before the
    normalisation; the same voxels under an MR spec, or CT already windowed to 0..255, are not."""
    from conftest import phantom, save_nifti

    image, label = phantom(0)
    hu = np.where(image > 0, image - 60.0, -1000.0)  # body 40 HU, organs 140 / 240 HU, air -1000
    hu[5:8, 18:22, :] = 1200.0  # bone, far above the window
    src = tmp_path / "src"
    src.mkdir()
    save_nifti(src / "image_0.nii.gz", hu.astype(np.int16))
    save_nifti(src / "label_0.nii.gz", label)
    ct = PreparedDataset(prepare_dataset(src, "abd-ct", tmp_path / "ct", progress=False)).load("0").image
    mr = PreparedDataset(prepare_dataset(src, "abd-mri", tmp_path / "mr", progress=False)).load("0").image
    windowed = normalise_image(np.clip(hu, -125, 275).astype(np.float32))
    assert np.allclose(ct.astype(np.float32), windowed, atol=2e-3)
    assert not np.allclose(mr.astype(np.float32), windowed, atol=0.05)
