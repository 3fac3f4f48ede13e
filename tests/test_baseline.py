"""Training-free TAESD prototype baseline: interface on tiny inputs, and liver on one real pair."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdfsmis.baseline import BaselineConfig, PrototypeBaseline
from sdfsmis.errors import InputError

DATA = Path(os.environ.get("SDFSMIS_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="module")
def tiny():
    return PrototypeBaseline(BaselineConfig(size=32, feature="features64"))


def test_predict_shapes_range_and_threshold(tiny):
    g = torch.Generator().manual_seed(0)
    s_img = torch.rand(2, 24, 24, generator=g) * 2 - 1
    s_msk = torch.zeros(2, 24, 24)
    s_msk[:, 6:18, 6:18] = 1
    q = torch.rand(3, 20, 28, generator=g) * 2 - 1
    prob = tiny.predict(s_img, s_msk, q)
    assert prob.shape == (3, 20, 28) and prob.dtype == torch.float32
    assert float(prob.min()) >= 0 and float(prob.max()) <= 1
    # the 0.5 cut of the protocol is exactly similarity >= threshold
    from sdfsmis.inference.slices import common_grids

    g_s, g_q, _ = common_grids((24, 24), (20, 28), tiny.config.size)  # the shared slice pipeline's grids
    sim = tiny.similarity(tiny.prototype(s_img, s_msk, g_s), q, g_q)
    assert torch.equal(prob >= 0.5, sim >= tiny.config.threshold)
    assert tiny.config.threshold == 0.85


def test_k_shot_prototype_is_the_mean_of_one_shot_prototypes(tiny):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(2, 32, 32, generator=g) * 2 - 1
    msks = (torch.rand(2, 32, 32, generator=g) > 0.5).float()
    both = tiny.prototype(imgs, msks)
    singles = torch.stack([tiny.prototype(imgs[k: k + 1], msks[k: k + 1]) for k in range(2)])
    assert torch.allclose(both, singles.mean(0), atol=1e-5)
    assert both.shape == (64,)


def test_bad_support(tiny):
    with pytest.raises(InputError, match="empty"):
        tiny.predict(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16), torch.zeros(2, 16, 16))
    with pytest.raises(InputError):
        tiny.predict(torch.zeros(1, 16, 16), torch.ones(2, 16, 16), torch.zeros(2, 16, 16))
    with pytest.raises(InputError):
        PrototypeBaseline(feature="pixels")


def _normalise(v: np.ndarray) -> np.ndarray:
    """The protocol normalisation: z-score, clip to the 0.5/99.5 percentiles, map to [-1, 1]."""
    v = (v - v.mean()) / v.std()
    lo, hi = np.percentile(v, [0.5, 99.5])
    return ((np.clip(v, lo, hi) - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def test_liver_on_real_abd_mri_pair():
    nib = pytest.importorskip("nibabel")
    root = DATA / "abd-mri"
    if not (root / "image_2.nii.gz").is_file():
        pytest.skip(f"no Abd-MRI data in {root}")
    torch.manual_seed(0)

    def load(i):
        img = _normalise(np.asarray(nib.load(root / f"image_{i}.nii.gz").dataobj, dtype=np.float32))
        return img, np.asarray(nib.load(root / f"label_{i}.nii.gz").dataobj) == 1  # liver

    s_img, s_lab = load(1)
    q_img, q_lab = load(2)
    s_z = np.flatnonzero(s_lab.any((0, 1)))
    q_z = np.flatnonzero(q_lab.any((0, 1)))
    mid = s_z[len(s_z) // 2]
    q_sel = q_z[len(q_z) // 2 - 2: len(q_z) // 2 + 2]  # 4 middle liver slices of the query
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 2, 0), dtype=np.float32))  # noqa: E731
    prob = PrototypeBaseline().predict(to_t(s_img[:, :, [mid]]), to_t(s_lab[:, :, [mid]]), to_t(q_img[:, :, q_sel]))
    pred = prob.numpy() >= 0.5
    gt = np.moveaxis(q_lab[:, :, q_sel], 2, 0)
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    # measured 0.515 (support scan 1 -> query scan 2); chance level (all foreground) is ~0.2
    assert dice > 0.40, dice
