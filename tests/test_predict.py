"""predict: NIfTI in, NIfTI out.

End-to-end tests run the real tiny model (random weights, saved with ``save_pretrained``) on small
synthetic volumes with a non-trivial affine; the input checks are also thrown random files
(hypothesis). Geometry, label ids, reorientation, atomic outputs and every bad-input case are checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from sdfsmis import predict as P
from sdfsmis.data.intensity import normalise_image
from sdfsmis.errors import InputError
from sdfsmis.models import io as model_io

SHAPE = (20, 24, 8)  # X, Y, Z of the synthetic scans
ZOOMS = (1.5, 1.25, 4.0)


# ---------------------------------------------------------------------------- synthetic scans
def _ras_affine() -> np.ndarray:
    aff = np.diag([*ZOOMS, 1.0])
    aff[:3, 3] = (-14.0, 20.0, -3.0)
    return aff


def _scan(seed: int, labels: tuple[int, int] = (3, 7)) -> tuple[np.ndarray, np.ndarray]:
    """A body ellipse with two brighter blobs (``labels``) in a RAS volume of SHAPE."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    body = ((x - 10) / 9) ** 2 + ((y - 12) / 11) ** 2 < 1
    image = np.where(body, 300.0, 20.0) + rng.normal(0, 10, SHAPE)
    label = np.zeros(SHAPE, np.uint16)
    a = (((x - 7) / 3.5) ** 2 + ((y - 9) / 4) ** 2 < 1) & (z >= 1) & (z <= 5 + seed % 2)
    b = (((x - 13) / 3) ** 2 + ((y - 15) / 3) ** 2 < 1) & (z >= 3) & (z <= 6)
    label[a], label[b] = labels
    image[a] += 250
    image[b] += 150
    return image.astype(np.int16), label


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    img = nib.Nifti1Image(data, affine, dtype=dtype or data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def nifti_pair(folder: Path) -> dict[str, Path]:
    """The support image, its mask and a query (``_scan(0)``, ``_scan(1)``, RAS) saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (s_img, s_lab), (q_img, _) = _scan(0), _scan(1)
    aff = _ras_affine()
    return {"support": _save(folder / "s.nii.gz", s_img, aff),
            "mask": _save(folder / "m.nii.gz", s_lab.astype(np.uint8), aff),
            "query": _save(folder / "q.nii.gz", q_img, aff)}


def _reoriented(path: Path, data: np.ndarray, affine: np.ndarray, codes: str) -> Path:
    """Save ``data`` (RAS) in the voxel order of ``codes`` with the matching affine."""
    ras = nib.Nifti1Image(data, affine, dtype=data.dtype)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(tuple(codes)))
    img = ras.as_reoriented(ornt)
    assert "".join(nib.aff2axcodes(img.affine)) == codes
    nib.save(img, str(path))
    return path


@pytest.fixture()
def scans(tmp_path: Path) -> dict[str, Path]:
    """Support (RAS) and query, the latter stored in PSL voxel order (axes permuted and flipped)."""
    s_img, s_lab = _scan(0)
    q_img, _ = _scan(1)
    aff = _ras_affine()
    d = tmp_path / "in"
    d.mkdir()
    return {
        "support": _save(d / "support.nii.gz", s_img, aff),
        "mask": _save(d / "mask.nii.gz", s_lab.astype(np.uint8), aff),
        "query": _reoriented(d / "query.nii.gz", q_img, aff, "PSL"),
        "query_ras": _save(d / "query_ras.nii.gz", q_img, aff),
        "dir": d,
    }


def _run(scans, out: Path, tiny_model: Path, **kw):
    kw.setdefault("min_area_mm2", 0.0)
    return P.predict(scans["support"], scans["mask"], kw.pop("query", scans["query"]), out,
                     checkpoint=tiny_model, progress=False, **kw)


# ----------------------------------------------------------------------------- end to end
def test_predict_writes_query_geometry_and_support_ids(scans, tiny_model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = _run(scans, out_dir / "seg", tiny_model)  # ".nii.gz" is added
    assert res.segmentation == out_dir / "seg.nii.gz"
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.json", "seg.nii.gz", "seg.png"]
    q = nib.load(scans["query"])
    o = nib.load(res.segmentation)
    assert o.shape == q.shape and q.shape != SHAPE  # the query's own (permuted) voxel order
    np.testing.assert_allclose(o.affine, q.affine, atol=1e-6)
    assert nib.aff2axcodes(o.affine) == ("P", "S", "L")
    assert int(o.header["sform_code"]) == int(q.header["sform_code"])
    assert o.get_data_dtype() == np.uint8
    data = np.asarray(o.dataobj)
    ids = set(np.unique(data).tolist())
    assert ids <= {0, 3, 7} and ids & {3, 7}  # a random model still marks something
    summary = json.loads(res.summary_path.read_text())
    assert summary == res.summary
    organs = {o["label"]: o for o in summary["organs"]}
    assert set(organs) == {3, 7}
    vox_ml = float(np.prod(ZOOMS)) / 1000
    for label, organ in organs.items():
        assert organ["voxels"] == int((data == label).sum())
        assert organ["volume_ml"] == pytest.approx(organ["voxels"] * vox_ml, abs=1e-3)
        assert all(len(c) == 1 for c in organ["support_slices"])  # one shot per chunk
        assert 0 < organ["seconds"] <= summary["seconds"]
    # organ 3 spans z 1..5 of the support: chunks [1, 2], [3, 4], [5] -> middle slices 2, 4, 5
    assert organs[3]["support_slices"] == [[2], [4], [5]]
    assert summary["model"]["checkpoint"] == str(tiny_model)
    assert sum(o["seconds"] for o in organs.values()) <= summary["seconds"]
    assert "3 left_kidney" in str(res)  # CHAOS names of known ids by default


def test_labels_option_uint16_ids_and_shots(tmp_path, tiny_model):
    s_img, s_lab = _scan(0, labels=(300, 7))
    q_img, _ = _scan(1)
    aff = _ras_affine()
    paths = {"support": _save(tmp_path / "s.nii.gz", s_img, aff),
             "mask": _save(tmp_path / "m.nii.gz", s_lab, aff),
             "query": _save(tmp_path / "q.nii", q_img, aff)}
    res = _run(paths, tmp_path / "o.nii", tiny_model, labels=[300], shots=2, overlay=False)
    assert res.overlay is None and not (tmp_path / "o.png").exists()
    o = nib.load(res.segmentation)
    assert o.get_data_dtype() == np.uint16
    assert set(np.unique(np.asarray(o.dataobj)).tolist()) <= {0, 300}
    organ, = res.summary["organs"]
    assert organ["label"] == 300 and organ["support_slices"] == [[1, 2], [3, 4], [5]]  # 2 shots per chunk


def test_reorientation_round_trip(scans, tiny_model, tmp_path):
    """The same scan stored in two voxel orders gives the same prediction, mapped back to each."""
    a = _run(scans, tmp_path / "a.nii.gz", tiny_model, query=scans["query_ras"], labels=[7], overlay=False)
    b = _run(scans, tmp_path / "b.nii.gz", tiny_model, query=scans["query"], labels=[7], overlay=False)
    pa = np.asarray(nib.load(a.segmentation).dataobj)
    ob = nib.load(b.segmentation)
    pb = np.asarray(nib.as_closest_canonical(ob).dataobj)
    assert pa.shape == SHAPE and ob.shape != SHAPE
    assert pa.any()
    np.testing.assert_array_equal(pa, pb)


# --------------------------------------------------------------------------------- bad input
def _expect(call, path: Path, out_dir: Path, words: str) -> None:
    before = sorted(out_dir.iterdir())
    with pytest.raises(InputError) as err:
        call()
    assert err.value.path is not None and Path(err.value.path).name == Path(path).name, str(err.value)
    assert path.name in str(err.value) and words in str(err.value).lower(), str(err.value)
    assert sorted(out_dir.iterdir()) == before  # nothing written, no temp file left


def _variant(scans, tmp_path: Path, **files: Path):
    args = {k: scans[k] for k in ("support", "mask", "query")} | files
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    return args, out_dir


@pytest.mark.parametrize("case", ["missing", "garbage", "mgh", "2d", "4d", "nan", "shape", "affine", "empty",
                                  "fraction", "label"])
def test_bad_input_names_the_file(case, scans, tmp_path, tiny_model):
    d = scans["dir"]
    q = nib.load(scans["query_ras"])
    qd = np.asarray(q.dataobj).astype(np.float32)
    m = np.asarray(nib.load(scans["mask"]).dataobj)
    kw: dict = {}
    if case == "missing":
        bad, key, words = d / "nope.nii.gz", "query", "not found"
    elif case == "garbage":
        bad, key, words = d / "garbage.nii.gz", "query", "nifti"
        bad.write_bytes(b"this is not an image" * 10)
    elif case == "mgh":
        bad, key, words = d / "scan.mgz", "query", "not a nifti"
        nib.save(nib.MGHImage(qd, q.affine), str(bad))
    elif case == "2d":
        bad, key, words = _save(d / "flat.nii.gz", qd[:, :, 0], q.affine), "query", "3-d"
    elif case == "4d":
        bad, key, words = _save(d / "t.nii.gz", np.stack([qd, qd], -1), q.affine), "support", "3-d"
    elif case == "nan":
        qd[3, 4, 5] = np.nan
        bad, key, words = _save(d / "nan.nii.gz", qd, q.affine), "query", "nan"
    elif case == "shape":
        bad, key, words = _save(d / "m2.nii.gz", m[:, :, :-1], q.affine), "mask", "shape"
    elif case == "affine":
        aff = q.affine.copy()
        aff[0, 3] += 5
        bad, key, words = _save(d / "m3.nii.gz", m, aff), "mask", "affine"
    elif case == "empty":
        bad, key, words = _save(d / "m4.nii.gz", np.zeros_like(m), q.affine), "mask", "empty"
    elif case == "fraction":
        bad, key, words = _save(d / "m5.nii.gz", m * 0.5, q.affine, np.float32), "mask", "integer"
    else:  # a label id the mask does not hold
        bad, key, words, kw = scans["mask"], "mask", "absent", {"labels": [3, 9]}
    args, out_dir = _variant(scans, tmp_path, **{key: bad})
    _expect(lambda: P.predict(args["support"], args["mask"], args["query"], out_dir / "o.nii.gz",
                              checkpoint=tiny_model, progress=False, **kw), bad, out_dir, words)


def test_unwritable_output_is_checked_first(scans, tmp_path, tiny_model):
    missing_query = scans["dir"] / "missing.nii.gz"  # would fail later: the output is checked first
    for query, out, words in ((missing_query, tmp_path / "no" / "such" / "o.nii.gz", "does not exist"),
                              (scans["query"], scans["query"], "overwrite an input")):
        with pytest.raises(InputError, match=words) as err:
            P.predict(scans["support"], scans["mask"], query, out, checkpoint=tiny_model, progress=False)
        assert err.value.path == out
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        P.predict(scans["support"], scans["mask"], missing_query, tmp_path / "dir", checkpoint=tiny_model)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(InputError, match="not writable"):
                P.predict(scans["support"], scans["mask"], missing_query, ro / "o.nii.gz", checkpoint=tiny_model)
        finally:
            ro.chmod(0o700)


def test_missing_default_model_is_a_clear_error(scans, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "BUNDLED_MODEL_DIR", tmp_path / "assets" / "model")
    with pytest.raises(InputError, match="no trained default model is bundled yet; pass --checkpoint DIR"):
        P.predict(scans["support"], scans["mask"], scans["query"], tmp_path / "o.nii.gz", progress=False)
    assert not list(tmp_path.glob("o.*"))
    with pytest.raises(InputError, match="not a trained model directory"):
        P.predict(scans["support"], scans["mask"], scans["query"], tmp_path / "o.nii.gz", checkpoint=tmp_path)


def test_failure_during_writing_leaves_nothing(scans, tiny_model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(P, "montage", boom)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        _run(scans, out_dir / "o.nii.gz", tiny_model, labels=[3])
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------ input checks, fuzzed
_DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]
_MUTATIONS = ["2d", "4d", "4d-singleton", "nan", "inf", "complex", "fraction-mask", "empty-mask", "mask-shape",
              "mask-affine", "zero-zoom", "nan-affine", "thin", "absent-label", "big-label"]


@st.composite
def _nifti_case(draw):
    """A valid support/mask/query triple, then zero to two random corruptions of it."""
    shape = tuple(draw(st.integers(8, 11)) for _ in range(3))
    affine = np.eye(4)
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    zooms = draw(st.lists(st.sampled_from([0.5, 1.0, 3.0]), min_size=3, max_size=3))
    affine[:3, :3] = np.eye(3)[:, perm] * np.array(signs) * np.array(zooms)
    affine[:3, 3] = draw(st.lists(st.floats(-50, 50), min_size=3, max_size=3))
    if draw(st.booleans()):
        affine[0, 1] += 0.3  # shear: not a pure permutation
    dtypes = [draw(st.sampled_from(_DTYPES)) for _ in range(3)]
    mutations = draw(st.lists(st.sampled_from(_MUTATIONS), max_size=2, unique=True))
    target = draw(st.sampled_from([0, 1, 2]))  # which file a corruption hits
    labels = draw(st.sampled_from([None, [1], [1, 2]]))
    return shape, affine, dtypes, mutations, target, labels


def _files(shape, affine, dtypes, mutations, target, rng):
    image = lambda: rng.normal(100, 30, shape)  # noqa: E731
    mask = np.zeros(shape)
    mask[2:6, 2:6, 2:6] = 1
    mask[5:7, 5:7, 5:7] = 2
    arrays = [image(), mask, image()]
    affines = [affine.copy() for _ in range(3)]
    for m in mutations:
        a = arrays[target]
        if m == "2d":
            arrays[target] = a[:, :, 0]
        elif m == "4d":
            arrays[target] = np.stack([a, a], -1)
        elif m == "4d-singleton":
            arrays[target] = a[..., None]
        elif m in ("nan", "inf"):
            arrays[target] = a.astype(np.float64)
            arrays[target].flat[rng.integers(a.size)] = np.nan if m == "nan" else np.inf
        elif m == "complex":
            arrays[target] = a.astype(np.complex64)
        elif m == "fraction-mask":
            arrays[1] = arrays[1] + 0.5
        elif m == "empty-mask":
            arrays[1] = np.zeros_like(arrays[1])
        elif m == "mask-shape":
            arrays[1] = arrays[1][:-1]
        elif m == "mask-affine":
            affines[1][2, 3] += 2.0
        elif m == "zero-zoom":
            affines[target][:3, rng.integers(3)] = 0.0
        elif m == "nan-affine":
            affines[target][1, 3] = np.nan
        elif m == "thin":
            arrays[target] = a[:3]
        elif m == "big-label":
            arrays[1] = arrays[1] * 40000
    out = []
    for a, aff, dt in zip(arrays, affines, dtypes):
        if a.dtype.kind != "c" and not (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
            big = dt in (np.uint8, np.int16) and a.max(initial=0) > np.iinfo(dt).max
            a = a.astype(np.float64 if big else dt)
        out.append((a, aff))
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_nifti_case(), seed=st.integers(0, 2**16))
def test_input_checks_pass_or_raise_input_error(case, seed, tmp_path_factory):
    """Valid triples pass; corrupted ones pass or raise InputError naming one of the files."""
    shape, affine, dtypes, mutations, target, labels = case
    if "absent-label" in mutations:
        labels = [1, 3]
    rng = np.random.default_rng(seed)
    d = tmp_path_factory.mktemp("fuzz")
    paths = []
    for name, (a, aff) in zip("smq", _files(shape, affine, dtypes, mutations, target, rng)):
        try:
            paths.append(_save(d / f"{name}.nii.gz", a, aff))
        except Exception:  # nibabel refuses to write it: nothing to check
            event("not writable by nibabel")
            assume(False)
    try:
        inputs = P.load_inputs(*paths, labels=labels)
    except InputError as err:
        assert mutations, f"a valid triple was refused: {err}"
        assert err.path is not None and Path(err.path).parent == d, str(err)
        event("InputError")
        return
    event("accepted" if not mutations else "accepted despite " + "+".join(sorted(mutations)))
    for vol in (inputs.support, inputs.mask, inputs.query):
        assert vol.data.ndim == 3 and np.all(np.isfinite(vol.data))
        assert min(vol.data.shape[:2]) >= 8
    assert inputs.labels == (labels or [1, 2])


# ----------------------------------------------------------------------------- the pieces
def test_slice_grid_keeps_physical_aspect_and_maps_back():
    grid = P.SliceGrid.fit((40, 20), (1.0, 3.0), pixel_mm=60 / 32, size=32)  # 40 x 60 mm
    assert grid.scaled == (21, 32) and grid.offset == (5, 0)
    yy = torch.linspace(0, 1, 20)
    smooth = (torch.linspace(0, 1, 40)[:, None] * yy[None, :])[None]
    model_in = grid.to_model(smooth, pad_value=-1.0)
    assert model_in.shape == (1, 1, 32, 32) and float(model_in[0, 0, 0, 0]) == -1.0
    back = grid.from_model(model_in)
    assert back.shape == (1, 40, 20)
    assert float((back - smooth).abs().mean()) < 0.03


def test_normalise_image_range():
    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, 50.0, (16, 16, 4)).astype(np.float32)
    n = normalise_image(v)
    assert n.dtype == np.float32 and n.shape == v.shape
    assert n.min() == pytest.approx(-1.0, abs=1e-5) and n.max() == pytest.approx(1.0, abs=1e-5)
    assert np.corrcoef(n.ravel(), v.ravel())[0, 1] > 0.9
    assert not normalise_image(np.ones((4, 4, 2))).any()


def test_plan_organ_chunks_and_margin():
    plan = P.plan_organ(1, range(10, 19), (0, 29), (0, 59), 60, z_margin=0.0)
    assert plan.core_range == (20, 37) and plan.support_chunks == [[11], [14], [17]]
    assert [c[0] for c in plan.query_chunks] == [20, 26, 32] and plan.query_chunks[-1][-1] == 37
    wide = P.plan_organ(1, range(10, 19), (0, 29), (0, 59), 60, z_margin=0.1, shots=3)
    assert wide.query_chunks[0][0] == 14 and wide.query_chunks[-1][-1] == 43
    assert wide.support_chunks == [[10, 11, 12], [13, 14, 15], [16, 17, 18]]
    every = P.plan_organ(1, [4], (0, 9), (0, 9), 10, z_margin=None)
    assert every.support_chunks == [[4]] and every.query_chunks == [list(range(10))]


def test_output_paths():
    assert P.output_paths("x/seg.nii.gz") == (Path("x/seg.nii.gz"), Path("x/seg.png"), Path("x/seg.json"))
    assert P.output_paths("seg.nii")[1:] == (Path("seg.png"), Path("seg.json"))
    assert P.output_paths("seg")[0] == Path("seg.nii.gz")


def test_query_latent_reuse_matches_predict_with_support(tiny_model):
    """Encoding query slices once for all organs gives the model's own ``predict_with_support``."""
    from sdfsmis.inference.slices import QueryEncoder, SlicePipeline
    from sdfsmis.models.io import load_pretrained

    model = load_pretrained(tiny_model)
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.uniform(-1, 1, (5, 20, 24)).astype(np.float32))
    pipe = SlicePipeline(model, "cpu", batch_size=16, precision="fp32")
    g_s, g_q, _ = pipe.grids((20, 24), (20, 24))
    sup = torch.rand(1, 20, 24) * 2 - 1
    cache = pipe.prepare_support(sup, (sup > 0).float(), g_s)
    enc = QueryEncoder(pipe)
    first = pipe.probabilities(q[[1, 3]], cache, g_q, enc, keys=[1, 3])
    again = pipe.probabilities(q, cache, g_q, enc, keys=[0, 1, 2, 3, 4])  # 1 and 3 reuse their latents
    pipe.split = False
    ref = pipe.probabilities(q, cache, g_q)
    assert first.shape == (2, 20, 24) and set(enc.cache) == {0, 1, 2, 3, 4}
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first, ref[[1, 3]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [{"shots": 0}, {"batch_size": "8"}, {"chunks": None}, {"z_margin": -0.1},
                                {"min_area_mm2": float("nan")}, {"device": "nonsense"}])
def test_bad_options_are_input_errors(kw, scans, tmp_path, tiny_model):
    with pytest.raises(InputError):
        P.predict(scans["support"], scans["mask"], scans["query"], tmp_path / "o.nii.gz", checkpoint=tiny_model,
                  progress=False, **kw)
    assert not list(tmp_path.glob("o.*"))


def test_cli_predict_writes_outputs_and_reports_bad_input(scans, tiny_model, tmp_path, capsys):
    from sdfsmis.cli import main

    out = tmp_path / "cli" / "pred.nii.gz"
    (tmp_path / "cli").mkdir()
    args = ["-q", "predict", "--support-image", str(scans["support"]), "--support-mask", str(scans["mask"]),
            "--query", str(scans["query"]), "--out", str(out), "--checkpoint", str(tiny_model),
            "--chunks", "2", "--min-area", "0", "--all-slices"]
    assert main(args) == 0
    assert out.is_file() and out.with_suffix("").with_suffix(".json").is_file()
    assert nib.load(str(out)).shape == nib.load(str(scans["query"])).shape
    bad = tmp_path / "cli" / "bad.nii.gz"
    args[args.index("--query") + 1] = str(tmp_path / "missing.nii.gz")
    args[args.index("--out") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing.nii.gz" in err and "error" in err
    assert not bad.exists()


def test_predictions_stay_inside_the_query_body(scans, tiny_model, tmp_path, monkeypatch):
    """A query slice without body (all at the volume's minimum) keeps no prediction, although the
    model marks it when the body mask is switched off."""
    q_img, _ = _scan(1)
    q_img[:, :, 0] = q_img.min()
    query = _save(scans["dir"] / "blank0.nii.gz", q_img, _ras_affine())
    kw = {"query": query, "z_margin": None}
    with_body = np.asarray(nib.load(_run(scans, tmp_path / "a.nii.gz", tiny_model, **kw).segmentation).dataobj)
    monkeypatch.setattr(P, "body_mask", lambda image: np.ones(image.shape, bool))
    no_body = np.asarray(nib.load(_run(scans, tmp_path / "b.nii.gz", tiny_model, **kw).segmentation).dataobj)
    assert no_body[:, :, 0].any() and not with_body[:, :, 0].any()
    assert np.all((with_body == no_body) | (with_body == 0))  # the mask only removes


def test_degenerate_inputs_are_warned_about(scans, tiny_model, tmp_path):
    """A one-slice query and an organ of a single support voxel are accepted, with a warning each."""
    q_img, _ = _scan(1)
    one = _save(scans["dir"] / "one.nii.gz", q_img[:, :, 3:4], _ras_affine())
    s_img, s_lab = _scan(0)
    s_lab[s_lab == 7] = 0
    s_lab[10, 12, 4] = 7
    mask = _save(scans["dir"] / "tiny_mask.nii.gz", s_lab.astype(np.uint8), _ras_affine())
    with pytest.warns(UserWarning) as caught:
        res = P.predict(scans["support"], mask, one, tmp_path / "o.nii.gz", checkpoint=tiny_model, progress=False,
                        overlay=False, device="cpu")
    text = " ".join(str(w.message) for w in caught)
    assert "single slice" in text and "label 7 has only 1 voxel" in text
    assert res.summary["warnings"] and "warning: " in str(res)
    assert nib.load(res.segmentation).shape == (20, 24, 1)


def test_model_cache_reuses_the_model_until_its_files_change(tmp_path, monkeypatch):
    import shutil

    from sdfsmis import predict as P

    loads = []
    monkeypatch.setattr(P, "load_model", lambda path, device, **kw: loads.append(path) or object())
    folder = tmp_path / "model"
    shutil.copytree(model_io.BUNDLED_MODEL_DIR, folder)
    cache = P.ModelCache()
    first = cache.get(folder, torch.device("cpu"))
    assert cache.get(folder, torch.device("cpu")) is first and len(loads) == 1
    assert cache.get(folder, torch.device("cpu"), backbone_path="x") is not first and len(loads) == 2
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    cache.get(folder, torch.device("cpu"))
    assert len(loads) == 3


def test_summary_records_threads_and_the_decoding_thread(tmp_path):
    from sdfsmis import predict as P
    from sdfsmis.demo import demo_files

    files = demo_files()
    threads = torch.get_num_threads()
    try:
        for n, expected in ((1, False), (2, True)):
            torch.set_num_threads(n)
            res = P.predict(files["support_image"], files["support_mask"], files["query"], tmp_path / f"t{n}.nii.gz",
                            labels=[2], overlay=False, progress=False, device="cpu", z_margin=0.0, chunks=1)
            assert res.summary["settings"]["threads"] == n and torch.get_num_threads() == n
            assert res.summary["settings"]["decode_thread"] is expected
    finally:
        torch.set_num_threads(threads)
