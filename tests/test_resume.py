"""Resuming with cached latents, what a resume may and may not change, and Setting 2 through the
cached sampler and ``train()``; the real tiny model on the synthetic prepared data of test_train."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import same_weights, tiny_cfg, write_prepared

from sdfsmis import train as T
from sdfsmis.errors import InputError
from sdfsmis.models import build


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def test_interrupted_run_with_cached_latents_resumes_exactly(tmp_path, prepared):
    extra = ("cache_latents=true", f"cache_dir={tmp_path / 'cache'}")
    final = T.train(tiny_cfg(tmp_path / "full", prepared, *extra), progress=False)
    stopped = T.train(tiny_cfg(tmp_path / "part", prepared, *extra), progress=False, max_steps=3)
    assert stopped.name == "step_0000002"
    resumed = T.train(tiny_cfg(tmp_path / "part", prepared, *extra), progress=False)
    assert same_weights(final, resumed)
    assert not same_weights(tmp_path / "full" / "checkpoints" / "step_0000002" / "model", final)


def test_what_a_resume_may_change(tmp_path, prepared, caplog):
    out = tmp_path / "run"
    T.train(tiny_cfg(out, prepared), progress=False, max_steps=2)
    for changed, key in (("optim.lr_new=5e-4", "optim"), ("cache_latents=true", "cache_latents"),
                         ("model.qe=false", "model")):
        with pytest.raises(InputError, match=f"different {key}.*init_from=") as err:
            T.train(tiny_cfg(out, prepared, changed), progress=False)
        assert "\n" not in str(err.value)
    # iterations may change (a run extended): said on the console, and the run goes on to the new end
    with caplog.at_level(logging.INFO, logger="sdfsmis.train"):
        final = T.train(tiny_cfg(out, prepared, "iterations=6"), progress=False)
    assert any("planned for 4 steps, now iterations=6" in r.message for r in caplog.records)
    with (out / "log.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]
    assert final == out / "model"
    # the refused change is what init_from is for: the weights, a fresh optimizer
    ckpt = T.latest_checkpoint(out)
    other = T.train(tiny_cfg(tmp_path / "new", prepared, "optim.lr_new=5e-4", f"init_from={ckpt}",
                             "iterations=1"), progress=False)
    assert other.is_dir()


def _liver_on_slice_1_only(root):
    """The synthetic scans with their liver (a test organ) cut down to slice 1: Setting 2 then keeps
    slices 0 and 2-5 (slices 2-5 give adjacent query / support pairs)."""
    meta = json.loads((root / "dataset.json").read_text())
    for scan in meta["scans"]:
        path = root / scan["file"]
        arrays = dict(np.load(path))
        arrays["label"][:, :, 2:] = 0
        np.savez_compressed(path, **arrays)
        scan["class_slices"] = {"1": [1]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_setting2_through_the_cached_sampler_and_train(tmp_path):
    prepared = _liver_on_slice_1_only(write_prepared(tmp_path / "prepared"))
    cfg = tiny_cfg(tmp_path / "s2", prepared, "episodes.setting=2", "cache_latents=true",
                   f"cache_dir={tmp_path / 'cache'}", "episodes.augment_which=none")
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    cached = T.build_sampler(cfg, progress=False, model=model).samplers[0]
    plain = T.build_sampler(dataclasses.replace(cfg, cache_latents=False, cache_dir=""), progress=False).samplers[0]
    excluded = {sid: set(np.flatnonzero(plain.excluded_slices(sid)).tolist()) for sid in plain.train_ids}
    assert all(z == {1} for z in excluded.values())  # the liver's slice
    for seed in range(5):
        _, episodes = plain.sample_with_info(4, torch.Generator().manual_seed(seed))
        used = {(e.scan_id, z) for e in episodes for z in (e.query_z, *e.support_z)}
        assert used and not any(z in excluded[sid] for sid, z in used)
        a = cached.sample(4, torch.Generator().manual_seed(seed))
        b = plain.sample(4, torch.Generator().manual_seed(seed))
        assert torch.equal(a["support_masks"], b["support_masks"])  # the same Setting-2 episodes
        with torch.no_grad():
            assert torch.allclose(a["query_latents"].float(), model.encode_images(b["query_images"]), atol=1e-2)

    final = T.train(cfg, progress=False)
    assert (final / "model.safetensors").is_file()
    # every mask the run encoded (and stored) lies on a slice Setting 2 keeps
    stored = [load_file(str(p)) for p in (tmp_path / "cache").rglob("*.safetensors")]
    keys = [k for s in stored if "mask_keys" in s for k in s["mask_keys"][:, 0].tolist()]
    assert keys and 1 not in keys and set(keys) <= {2, 3, 4, 5}
