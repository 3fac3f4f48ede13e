"""The one slice pipeline: masks land where they should in every geometry (oracle model), ``predict``
and ``evaluate``'s predictor give the same masks, and bf16 agrees with fp32 on the bundled model."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sdfsmis import predict as P
from sdfsmis.data.intensity import normalise_image

SHAPE = (32, 32, 10)


class Oracle:
    """A 'model' whose probability is 1 wherever its input image is bright (> 0.5): it returns a known
    shape, so the predicted mask must be exactly the query's bright blob, in the file's geometry."""

    image_size = 32

    def eval(self):
        return self

    def prepare_support(self, images, masks):
        return None

    def predict_with_support(self, images, cache):
        return (images > 0.5).float()


def _volumes(seed: int = 0):
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    body = ((x - 16) / 14) ** 2 + ((y - 16) / 13) ** 2 < 1
    img = np.where(body, 100.0, 0.0) + np.random.default_rng(seed).normal(0, 1, SHAPE)
    blob = (((x - 10) / 4) ** 2 + ((y - 19) / 5) ** 2 < 1) & (z >= 3) & (z <= 7)
    img[blob] = 400.0
    return img.astype(np.float32), blob


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _rot_z(deg: float) -> np.ndarray:
    t = np.radians(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


def _variant(kind: str, data: np.ndarray, zooms=(1.0, 1.0, 3.0)) -> tuple[np.ndarray, np.ndarray]:
    """(file data, affine) of the same scan stored another way."""
    aff = np.diag([*zooms, 1.0])
    if kind == "ras":
        return data, aff
    if kind == "flipped":  # L->R and P->A reversed
        a = aff.copy()
        a[0, 0], a[1, 1] = -zooms[0], -zooms[1]
        return data[::-1, ::-1].copy(), a
    if kind == "transposed":  # slices stored first: (z, y, x)
        a = np.zeros((4, 4))
        a[3, 3] = 1
        a[2, 0], a[1, 1], a[0, 2] = zooms[2], zooms[1], zooms[0]
        return np.transpose(data, (2, 1, 0)).copy(), a
    if kind == "oblique":  # tilted by 30 degrees about S, then 20 about R (same voxels, oblique header)
        r = _rot_z(30)
        t = np.radians(20)
        rx = np.eye(4)
        rx[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        return data, rx @ r @ aff
    raise ValueError(kind)


def _predict_with_oracle(tmp_path, monkeypatch, q_data, q_aff):
    """``predict`` with the oracle model: support = volume 0 (1 x 1 x 3 mm), query = ``q_data``
    stored with ``q_aff``; returns the result and the written label volume."""
    monkeypatch.setattr(P, "load_model", lambda path, device, **overrides: Oracle())
    s_img, s_blob = _volumes(0)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    sup = _save(tmp_path / "s.nii.gz", s_img, aff)
    msk = _save(tmp_path / "m.nii.gz", s_blob.astype(np.uint8), aff)
    query = _save(tmp_path / "q.nii.gz", q_data, q_aff)
    res = P.predict(sup, msk, query, tmp_path / "o.nii.gz", checkpoint="bundled", overlay=False,
                    progress=False, z_margin=None, min_area_mm2=0, device="cpu")
    return res, np.asarray(nib.load(str(res.segmentation)).dataobj)


@pytest.mark.parametrize("kind", ["ras", "flipped", "transposed", "oblique"])
def test_oracle_masks_land_exactly_in_the_query_geometry(kind, tmp_path, monkeypatch):
    q_img, q_blob = _volumes(1)
    q_data, q_aff = _variant(kind, q_img)
    expected = _variant(kind, q_blob)[0]
    res, out = _predict_with_oracle(tmp_path, monkeypatch, q_data, q_aff)
    assert out.shape == q_data.shape
    np.testing.assert_array_equal(out == 1, expected)
    assert res.summary["slice_axis"]["query"]["file_axis"] == (0 if kind == "transposed" else 2)


def test_oracle_masks_with_anisotropic_pixels(tmp_path, monkeypatch):
    """Pixels of 0.8 x 1.2 mm (query) and 1 x 1 mm (support): the slices are resampled to one pixel
    size and back, so the blob comes back within resampling error."""
    q_img, q_blob = _volumes(1)
    _, labels = _predict_with_oracle(tmp_path, monkeypatch, q_img, np.diag([0.8, 1.2, 3.0, 1.0]))
    out = labels == 1
    dice = 2 * (out & q_blob).sum() / (out.sum() + q_blob.sum())
    assert dice > 0.9
    np.testing.assert_allclose(np.argwhere(out).mean(0), np.argwhere(q_blob).mean(0), atol=0.5)


def test_predict_and_the_evaluation_predictor_give_the_same_masks(tiny_model, tmp_path, monkeypatch):
    """``predict`` on a scan pair and ``evaluate``'s predictor (``cli.make_predictor``) on the prepared
    form of the same slices (``normalise_image``, what ``prepare`` stores) give identical masks."""
    from sdfsmis.cli import make_predictor

    monkeypatch.setattr(P, "body_mask", lambda image: np.ones(image.shape, bool))
    s_img, s_blob = _volumes(0)
    q_img, _ = _volumes(1)
    aff = np.diag([1.25, 1.25, 3.0, 1.0])
    q_aff = np.diag([1.0, 1.0, 3.0, 1.0])  # another pixel size: the common grid matters
    sup = _save(tmp_path / "s.nii.gz", s_img, aff)
    msk = _save(tmp_path / "m.nii.gz", s_blob.astype(np.uint8), aff)
    query = _save(tmp_path / "q.nii.gz", q_img[:, :28], q_aff)
    res = P.predict(sup, msk, query, tmp_path / "o.nii.gz", checkpoint=tiny_model, overlay=False, progress=False,
                    z_margin=None, min_area_mm2=0, cleanup=False, device="cpu")
    got = np.asarray(nib.load(str(res.segmentation)).dataobj) == 1
    predictor = make_predictor(str(tiny_model), "cpu", 16)
    s_prep, q_prep = normalise_image(s_img), normalise_image(q_img[:, :28])
    organ, = res.summary["organs"]
    plan = P.plan_organ(1, np.flatnonzero(s_blob.any(axis=(0, 1))), *(res.summary["body_z_range"][k]
                        for k in ("support", "query")), q_prep.shape[2], z_margin=None)
    expected = np.zeros(q_prep.shape, bool)
    for s_z, q_z in zip(plan.support_chunks, plan.query_chunks):
        assert s_z in organ["support_slices"]
        t = lambda v, zs: torch.from_numpy(np.ascontiguousarray(np.moveaxis(v[:, :, zs], 2, 0)).astype(np.float32))
        hard = predictor.predict(t(s_prep, s_z), t(s_blob, s_z), t(q_prep, q_z), spacing=((1.25, 1.25), (1.0, 1.0)))
        expected[:, :, q_z] = np.moveaxis(hard.numpy() >= 0.5, 0, 2)
    assert expected.any()
    np.testing.assert_array_equal(got, expected)


def test_bf16_and_fp32_masks_agree_on_the_bundled_model(tmp_path):
    """The demo pair, right kidney, bundled model: bf16 autocast and fp32 masks agree (Dice >= 0.98)."""
    from sdfsmis.demo import demo_files

    files = demo_files()
    masks = {}
    for precision in ("fp32", "bf16"):
        res = P.predict(files["support_image"], files["support_mask"], files["query"], tmp_path / f"{precision}.nii.gz",
                        labels=[2], overlay=False, progress=False, precision=precision, device="cpu")
        masks[precision] = np.asarray(nib.load(str(res.segmentation)).dataobj) == 2
    a, b = masks["fp32"], masks["bf16"]
    assert a.sum() > 1000
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98


def test_fast_decoding_keeps_every_demo_organ(tmp_path, monkeypatch):
    """The demo pair, 4 organs, bundled model: the windowed mask decoding with the decoder on its own
    thread gives the masks of the whole decoder run in line (Dice >= 0.98 per organ)."""
    from sdfsmis.demo import demo_files
    from sdfsmis.models.vae import FrozenVAE

    files = demo_files()

    def run(name: str) -> np.ndarray:
        res = P.predict(files["support_image"], files["support_mask"], files["query"], tmp_path / f"{name}.nii.gz",
                        overlay=False, progress=False, device="cpu")
        return np.asarray(nib.load(str(res.segmentation)).dataobj)

    fast = run("fast")
    monkeypatch.setattr(FrozenVAE, "decode_masks", FrozenVAE.decode_gray)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no second thread for the decoder
    try:
        whole = run("whole")
    finally:
        torch.set_num_threads(threads)
    for label in (1, 2, 3, 4):
        a, b = fast == label, whole == label
        assert b.sum() > 1000
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98, label


def test_overlap_runs_in_order_and_raises_the_workers_error():
    from sdfsmis.inference.overlap import Overlap

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        with Overlap("cpu") as ov:
            assert ov.enabled and torch.get_num_threads() == 1
            for i in range(6):
                ov.submit(seen.append, i)
        assert seen == list(range(6)) and torch.get_num_threads() == 2

        def fail(i: int) -> None:
            if i == 1:
                raise KeyboardInterrupt
            seen.append(i)

        seen.clear()
        with pytest.raises(KeyboardInterrupt), Overlap("cpu") as ov:
            for i in range(50):
                ov.submit(fail, i)
        assert seen[0] == 0 and 1 not in seen and len(seen) < 49  # stopped within a few tasks
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    with Overlap("cuda") as ov:  # only the CPU overlaps
        assert not ov.enabled


def test_query_prefetch_encodes_from_the_end_and_stops_at_encoded_slices():
    import contextlib
    from types import SimpleNamespace

    from sdfsmis.inference.slices import QueryEncoder, SliceGrid

    calls: list[int] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x[:, :, :2, :2] + 1

    pipe = SimpleNamespace(model=SimpleNamespace(encode_images=encode), device=torch.device("cpu"),
                           autocast=contextlib.nullcontext)
    enc = QueryEncoder(pipe)  # type: ignore[arg-type]
    grid = SliceGrid.fit((8, 8), (1.0, 1.0), 1.0, size=8)
    vol = torch.arange(20 * 64, dtype=torch.float32).reshape(20, 8, 8)
    enc.cache.update({k: torch.zeros(1, 2, 2) for k in range(4)})  # the first 4 slices already encoded
    enc.prefetch(lambda ks: vol[list(ks)], list(range(10)), grid, batch=3)
    assert sorted(enc.cache) == list(range(10)) and calls == [3, 3]  # 9-7, 6-4, then 3-1 were encoded
    torch.testing.assert_close(enc.cache[9], grid.to_model(vol[[9]], -1.0)[0, :, :2, :2] + 1)
