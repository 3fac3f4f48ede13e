"""Episode samplers on a small synthetic prepared dataset written in the documented format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdfsmis.data.augment import AugmentConfig
from sdfsmis.data.datasets import SPECS
from sdfsmis.data.episodes import (
    EpisodeConfig, EpisodeSampler, resize_slices, slices_with_labels, training_scan_ids,
)
from sdfsmis.data.folds import fold_indices
from sdfsmis.data.prepared import PreparedDataset
from sdfsmis.errors import InputError

SPEC = SPECS["abd-ct"]  # eval organs: spleen 1, right kidney 2, left kidney 3, liver 6; stomach 7 is not
X = Y = 20
Z = 8
SIZE = 16  # training resolution: 20 -> 16 exercises the resize
MIN_PX = 20  # quadrant supervoxels cover 64 px at 16x16, the tiny one ~4 px
EXCLUDED_Z = {2, 3, 6}  # slices holding liver (2, 3) or spleen (6)
TINY_SV = 9


def _volumes(i: int) -> dict[str, np.ndarray]:
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    image = (((x + 2 * y + 5 * z + 7 * i) % 23) / 11.0 - 1.0).clip(-1, 1).astype(np.float16)
    quadrant = (x >= X // 2).astype(np.int32) + 2 * (y >= Y // 2)
    sv = (1 + quadrant + 4 * (z // 4)).astype(np.int32)  # 8 supervoxels, each 4 slices deep
    sv[:3, :3, :] = TINY_SV
    label = np.zeros((X, Y, Z), np.uint8)
    label[2:10, 2:10, 2:4] = 6  # liver on slices 2, 3
    label[11:19, 11:19, 4:7] = 7  # stomach on slices 4..6
    label[11:17, 2:9, 6] = 1  # spleen on slice 6
    pairs = [(k, s) for k in range(Z - 1) for s in np.unique(sv[:, :, k])
             if s and np.any(sv[:, :, k + 1] == s)]  # deliberately ignores the size rule
    return {"image": image, "label": label, "body": np.ones((X, Y, Z), bool), "supervoxels": sv,
            "sv_pairs": np.asarray(pairs, np.int32)}


def write_prepared(root: Path, n_scans: int = 5) -> Path:
    """A prepared-dataset folder (docs/architecture.md) with ``n_scans`` synthetic scans."""
    (root / "scans").mkdir(parents=True)
    scans = []
    for i in range(n_scans):
        v = _volumes(i)
        np.savez_compressed(root / "scans" / f"{i}.npz", **v)
        class_slices = {str(l): np.nonzero((v["label"] == l).any(axis=(0, 1)))[0].tolist()
                        for l in np.unique(v["label"]) if l}
        scans.append({"id": str(i), "file": f"scans/{i}.npz", "shape": [X, Y, Z], "spacing": [1.0, 1.0, 3.0],
                      "affine": np.eye(4).tolist(), "class_slices": class_slices,
                      "n_supervoxels": int(v["supervoxels"].max()), "n_sv_pairs": len(v["sv_pairs"])})
    meta = {"format_version": 1, "dataset": SPEC.name, "spec": dataclasses.asdict(SPEC), "source": str(root),
            "supervoxels": {"method": "felzenszwalb3d", "min_size": 5000, "sigma": 0.0, "scale": 1.0},
            "scans": scans}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return PreparedDataset(write_prepared(tmp_path_factory.mktemp("prepared")))


def make(dataset, **kw) -> EpisodeSampler:
    base = dict(image_size=SIZE, min_mask_px=MIN_PX, augment_which="none")
    return EpisodeSampler(dataset, EpisodeConfig(**{**base, **kw}), progress=False)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, fold, test_idx", [
    (20, 0, range(0, 5)), (20, 4, [0, 16, 17, 18, 19]),
    (30, 1, range(6, 13)), (30, 4, [0, *range(24, 30)]),
    (35, 2, range(14, 22)), (35, 4, [0, *range(28, 35)]),
])
def test_training_scans_are_outside_the_fold(n, fold, test_idx):
    ids = [f"s{i:02d}" for i in range(n)]
    assert sorted(fold_indices(n, fold)) == sorted(test_idx)
    train = training_scan_ids(ids, fold)
    assert train == [ids[i] for i in range(n) if i not in set(test_idx)]
    assert training_scan_ids(ids, fold, override=[ids[3], ids[1]]) == [ids[3], ids[1]]
    with pytest.raises(InputError):
        training_scan_ids(ids, fold, override=["nope"])


def test_sampler_draws_only_training_scans(dataset):
    sampler = make(dataset, fold=0)  # 5 scans: fold 0 tests {0, 1}
    assert sampler.train_ids == ["2", "3", "4"]
    _, episodes = sampler.sample_with_info(40, _gen(0))
    assert {e.scan_id for e in episodes} <= {"2", "3", "4"} and len({e.scan_id for e in episodes}) == 3
    only = make(dataset, train_scan_ids=("0",))
    assert {e.scan_id for e in only.draw(10, _gen(0))} == {"0"}
    from_folder = EpisodeSampler(str(dataset.root), EpisodeConfig(image_size=SIZE, min_mask_px=MIN_PX), progress=False)
    assert from_folder.train_ids == sampler.train_ids


def test_setting2_drops_every_slice_with_a_test_organ(dataset):
    label = dataset.load("2").label
    assert set(np.nonzero(slices_with_labels(label, [1, 2, 3, 6]))[0]) == EXCLUDED_Z
    s2, s1 = make(dataset, setting=2, shots=3), make(dataset, setting=1, shots=3)
    assert set(np.nonzero(s2.excluded_slices("2"))[0]) == EXCLUDED_Z
    assert not s1.excluded_slices("2").any()
    rows = s2.usable_rows("2")
    assert len(rows) and not (set(rows[:, 0]) | set(rows[:, 0] + 1)) & EXCLUDED_Z
    used2 = {z for e in s2.draw(200, _gen(1)) for z in (e.query_z, *e.support_z)}
    used1 = {z for e in s1.draw(200, _gen(1)) for z in (e.query_z, *e.support_z)}
    assert used2 and not used2 & EXCLUDED_Z
    assert used1 & EXCLUDED_Z  # Setting 1 does train on slices that hold test organs


def test_adjacent_slices_and_same_supervoxel(dataset):
    sampler = make(dataset)
    batch, episodes = sampler.sample_with_info(12, _gen(2))
    for b, e in enumerate(episodes):
        z = min(e.query_z, e.support_z[0])
        assert {e.query_z, e.support_z[0]} == {z, z + 1} and e.support_scan_id == e.scan_id
        assert any((row == (z, e.target)).all() for row in sampler.usable_rows(e.scan_id))
        scan = dataset.load(e.scan_id)
        sv = resize_slices(scan.supervoxels, SIZE, "nearest", torch.device("cpu"))
        img = resize_slices(scan.image, SIZE, "bilinear", torch.device("cpu")).float()
        assert torch.equal(batch["query_masks"][b, 0], (sv[e.query_z] == e.target).float())
        assert torch.equal(batch["support_masks"][b, 0, 0], (sv[e.support_z[0]] == e.target).float())
        assert torch.equal(batch["query_images"][b, 0], img[e.query_z])
        assert torch.equal(batch["support_images"][b, 0, 0], img[e.support_z[0]])
    assert {e.query_z - e.support_z[0] for e in episodes} == {-1, 1}  # order is random


def test_small_masks_are_never_drawn(dataset):
    sampler = make(dataset, shots=3)
    assert TINY_SV not in set(sampler.usable_rows("2")[:, 1])
    batch, episodes = sampler.sample_with_info(50, _gen(3))
    assert TINY_SV not in {e.target for e in episodes}
    assert batch["query_masks"].sum((1, 2, 3)).min() >= MIN_PX
    assert batch["support_masks"].sum((2, 3, 4)).min() >= MIN_PX
    with pytest.raises(InputError, match="no usable training episodes"):
        make(dataset, min_mask_px=SIZE * SIZE)


@pytest.mark.parametrize("k", [1, 3])
def test_k_shot_shapes_and_ranges(dataset, k):
    sampler = make(dataset, shots=k, augment_which="one")
    batch = sampler.sample(4, _gen(4))
    assert batch["query_images"].shape == (4, 1, SIZE, SIZE) and batch["query_masks"].shape == (4, 1, SIZE, SIZE)
    assert batch["support_images"].shape == (4, k, 1, SIZE, SIZE) == batch["support_masks"].shape
    for t in batch.values():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
    for key in ("query_images", "support_images"):
        assert batch[key].min() >= -1 and batch[key].max() <= 1
    for key in ("query_masks", "support_masks"):
        assert set(batch[key].unique().tolist()) <= {0.0, 1.0}


def test_k_shot_supports_are_the_neighbouring_slices(dataset):
    episodes = make(dataset, shots=3).draw(30, _gen(5))
    for e in episodes:
        zs = sorted((e.query_z, *e.support_z))
        assert zs == list(range(zs[0], zs[0] + 4)) and zs[0] // 4 == zs[-1] // 4  # one 4-slice supervoxel
    # Setting 2: supervoxels 1..4 only keep slices 0, 1 -> the third support repeats, augmented
    short = make(dataset, shots=3, setting=2, augment_which="one").draw(30, _gen(6))
    repeated = [e for e in short if len(set(e.support_z)) < 3]
    assert repeated
    for e in repeated:
        assert e.augmented[-1] and e.support_z[-1] in e.support_z[:-1]


def test_augment_one_side(dataset):
    episodes = make(dataset, augment_which="one").draw(40, _gen(7))
    assert all(sum(e.augmented) == 1 for e in episodes)
    assert {e.augmented[0] for e in episodes} == {True, False}
    assert all(all(e.augmented) for e in make(dataset, augment_which="both").draw(5, _gen(7)))


def test_same_seed_same_batches(dataset):
    sampler = make(dataset, shots=2, augment_which="one", augment=AugmentConfig())
    a, b, c = (sampler.sample(6, _gen(s)) for s in (11, 11, 12))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)
    state = sampler.state_dict()
    first = sampler.sample(3)
    sampler.load_state_dict(state)
    assert all(torch.equal(first[key], v) for key, v in sampler.sample(3).items())


def test_supervised_mode(dataset):
    sampler = make(dataset, mode="supervised", shots=2)
    batch, episodes = sampler.sample_with_info(30, _gen(8))
    assert {e.target for e in episodes} <= {6, 7} and {e.target for e in episodes} == {6, 7}
    for b, e in enumerate(episodes):
        assert e.query_z not in e.support_z and e.support_scan_id == e.scan_id
        lab = resize_slices(dataset.load(e.scan_id).label, SIZE, "nearest", torch.device("cpu"))
        assert torch.equal(batch["query_masks"][b, 0], (lab[e.query_z] == e.target).float())
    # Setting 2: liver/spleen slices are gone, stomach remains on slices 4, 5 (6 also holds spleen)
    s2 = make(dataset, mode="supervised", setting=2).draw(30, _gen(9))
    assert {e.target for e in s2} == {7}
    assert {z for e in s2 for z in (e.query_z, *e.support_z)} == {4, 5}
    cross = make(dataset, mode="supervised", pairing="cross_scan").draw(20, _gen(10))
    assert all(e.support_scan_id != e.scan_id for e in cross)


def test_same_slice_pseudo_pairs(dataset):
    episodes = make(dataset, pseudo_pairs="same_slice", augment_which="one").draw(20, _gen(11))
    assert all(e.support_z == (e.query_z,) and sum(e.augmented) == 1 for e in episodes)
    assert make(dataset).pseudo_pairs == "adjacent"  # 3-D supervoxels (pair_offset 1)
    flat = SimpleNamespace(spec=dataset.spec, scan_ids=dataset.scan_ids, load=dataset.load, pair_offset=0)
    assert make(flat).pseudo_pairs == "same_slice"  # 2-D superpixels: "auto" follows the dataset
    with pytest.raises(InputError, match="2-D"):
        make(flat, pseudo_pairs="adjacent")


def test_bad_configuration(dataset):
    with pytest.raises(InputError):
        EpisodeConfig(mode="nope")
    with pytest.raises(InputError):
        EpisodeConfig(shots=0)
    with pytest.raises(InputError, match="not labels"):
        make(dataset, setting=2, exclude_organs=("heart",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sampler_matches_cpu_sampler(dataset):
    """Volumes live on the GPU; a CPU generator gives the same episodes as on the CPU."""
    cfg = dict(shots=2, augment_which="one")
    cpu, gpu = make(dataset, **cfg), EpisodeSampler(
        dataset, EpisodeConfig(image_size=SIZE, min_mask_px=MIN_PX, **cfg), device="cuda", progress=False)
    a, ea = cpu.sample_with_info(8, _gen(13))
    b, eb = gpu.sample_with_info(8, _gen(13))
    assert ea == eb and all(t.device.type == "cuda" for t in b.values())
    assert all(torch.allclose(a[k], b[k].cpu(), atol=1e-3) for k in ("query_images", "support_images"))
    cuda_gen = torch.Generator(device="cuda").manual_seed(13)
    c = gpu.sample(8, cuda_gen)
    assert c["query_images"].shape == (8, 1, SIZE, SIZE)


def test_query_gap_draws_other_slices_of_the_supervoxel(dataset):
    """query_gap=G: the query is 1..G slices from the first support, on a slice that still holds the
    supervoxel (large enough, not excluded); with G=3 the 4-slice supervoxels give gaps up to 3."""
    sampler = make(dataset, query_gap=3, shots=2)
    episodes = sampler.draw(200, _gen(9))
    gaps = {abs(e.query_z - e.support_z[0]) for e in episodes}
    assert gaps == {1, 2, 3}
    for e in episodes:
        assert e.query_z // 4 == e.support_z[0] // 4  # one supervoxel: slices 4k..4k+3
        assert e.query_z not in e.support_z
    s2 = make(dataset, query_gap=3, setting=2)
    assert not {z for e in s2.draw(100, _gen(9)) for z in (e.query_z, *e.support_z)} & EXCLUDED_Z
    assert make(dataset, query_gap=1).draw(20, _gen(10)) == make(dataset).draw(20, _gen(10))
    with pytest.raises(InputError, match="query_gap"):
        EpisodeConfig(query_gap=0)


def test_drawable_masks_cover_every_drawn_mask(dataset):
    sampler = make(dataset, query_gap=3, shots=2)
    drawable = {sid: set(map(tuple, sampler.drawable_masks(sid).tolist())) for sid in sampler.train_ids}
    for e in sampler.draw(200, _gen(11)):
        assert {(z, e.target) for z in (e.query_z, *e.support_z)} <= drawable[e.scan_id]
    assert all(t != TINY_SV for rows in drawable.values() for _, t in rows)
