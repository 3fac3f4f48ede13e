"""The helper scripts: packing a prepared dataset, and running a plan of trainings + evaluations."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sdfsmis.data.prepared import PreparedDataset
from test_train import write_prepared

ROOT = Path(__file__).resolve().parents[1]


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_pack_unpack_round_trip(tmp_path):
    src = write_prepared(tmp_path / "src", n_scans=2)
    res = _script(str(ROOT / "scripts" / "pack_prepared.py"), "pack", str(src), str(tmp_path / "p.tar.xz"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _script(str(ROOT / "scripts" / "pack_prepared.py"), "unpack", str(tmp_path / "p.tar.xz"),
                  str(tmp_path / "dst"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    a, b = PreparedDataset(src), PreparedDataset(tmp_path / "dst")
    assert a.scan_ids == b.scan_ids
    for sid in a.scan_ids:
        x, y = a.load(sid), b.load(sid)
        assert np.array_equal(x.supervoxels, y.supervoxels) and np.array_equal(x.label, y.label)
        assert np.abs(x.image.astype(np.float32) - y.image.astype(np.float32)).max() <= 2 / 255 + 1e-3


def test_run_experiments_trains_and_evaluates_a_plan(tmp_path):
    data = write_prepared(tmp_path / "data", n_scans=5)
    meta = json.loads((data / "dataset.json").read_text())
    meta["spec"]["eval_organs"] = ["liver"]  # the synthetic scans hold only a liver
    (data / "dataset.json").write_text(json.dumps(meta))
    (tmp_path / "recipe.json").write_text(json.dumps({"model": {"backbone": {"tier": "tiny"}}, "iterations": 2}))
    base = ["episodes.image_size=32", "episodes.min_mask_px=20", "log_every=1", "checkpoint_every=2"]
    plan = {"out": "unused", "config": "recipe.json", "base": base, "runs": [
        {"name": "a", "overrides": [f"data={json.dumps([str(data)])}"],
         "evaluate": {"prepared": str(data), "folds": [0], "args": ["--batch-size", "4"]}},
        {"name": "b", "overrides": [f"data={json.dumps([str(data)])}", "model.method=diffews"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    res = _script(str(ROOT / "scripts" / "run_experiments.py"), str(tmp_path / "plan.json"), "--out",
                  str(tmp_path / "out"), "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "out" / "a" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "b" / "model" / "config.json").is_file()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## a" in summary and "Dice" in summary and "## b" in summary
    # the training-speed table of the two runs, from their config.json, log.csv and invocations.csv
    res = _script(str(ROOT / "benchmarks" / "train_runs.py"), str(tmp_path / "out" / "a"), str(tmp_path / "out" / "b"),
                  "--json", str(tmp_path / "speed.json"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["run"], r["method"], r["steps"], r["device"]) for r in speed] == \
        [("a", "sdfsmis", 2, "cpu"), ("b", "diffews", 2, "cpu")]
    assert all(r["wall_s"] > r["median_step_s"] > 0 for r in speed)
    for r in speed:  # the peak of the run's calls of train, as they recorded it
        with (tmp_path / "out" / r["run"] / "invocations.csv").open() as fh:
            peaks = [float(row["peak_memory_mib"]) for row in csv.DictReader(fh)]
        assert r["peak_memory_mib"] == max(peaks)
    assert res.stdout.count("\n| a | sdfsmis | tiny | 32 |") == 1
    res = _script(str(ROOT / "benchmarks" / "train_runs.py"), str(tmp_path), cwd=tmp_path)
    assert res.returncode != 0 and "not a training run folder" in res.stderr


def test_ship_model_bundles_float16_weights_with_a_portable_config(tmp_path, tiny_model):
    """ship_model.py writes float16 weights, the run's config with paths below the current folder made
    relative, and a README with the command; the shipped model loads and replaces an older one."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from sdfsmis.models.io import load_pretrained

    run = tmp_path / "runs" / "r"
    shutil.copytree(tiny_model, run / "model")
    cfg = {"data": [str(tmp_path / "prepared" / "x"), "/elsewhere/y"], "out_dir": str(run), "iterations": 3,
           "cache_dir": str(tmp_path / "cache"), "init_from": str(tmp_path / "runs" / "first" / "model")}
    (run / "config.json").write_text(json.dumps(cfg))
    target = tmp_path / "bundled"
    target.mkdir()
    (target / "stale.txt").write_text("the old model")
    res = _script(str(ROOT / "scripts" / "ship_model.py"), "runs/r", "--target", str(target), "--note", "made in a test",
                  "--threshold", "absolute:-0.75", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in target.iterdir()} == {"model.safetensors", "config.json", "train_config.json", "README.md"}
    assert {v.dtype for v in load_file(target / "model.safetensors").values()} == {torch.float16}
    shipped = json.loads((target / "train_config.json").read_text())
    assert shipped["data"] == ["prepared/x", "/elsewhere/y"] and shipped["out_dir"] == "runs/r"
    assert shipped["cache_dir"] == "cache" and shipped["init_from"] == "runs/first/model"
    readme = (target / "README.md").read_text()
    assert "made in a test" in readme and "--threshold absolute:-0.75" in readme
    model = load_pretrained(target)
    assert type(model).__name__ == "SDFSMIS"
    assert (model.config.threshold, model.config.threshold_value) == ("absolute", -0.75)


def test_fill_cache_encodes_every_drawable_mask(tmp_path):
    """scripts/fill_cache.py fills the config's store (slices, bank copies, every drawable mask); a
    config without cache_dir is a one-line error with exit 2 and writes nothing."""
    from safetensors.torch import load_file

    data = write_prepared(tmp_path / "data", n_scans=5)
    common = [f"data={data}", "model.backbone.tier=tiny", "episodes.image_size=32", "episodes.min_mask_px=20",
              "cache_latents=true", "cache_bank=1", "episodes.query_gap=2"]
    script = str(ROOT / "scripts" / "fill_cache.py")
    res = _script(script, *common, cwd=tmp_path)
    assert res.returncode == 2 and "cache_dir" in res.stderr and not list(tmp_path.glob("**/*.safetensors"))
    res = _script(script, *common, f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    files = {p.stem: load_file(p) for p in (tmp_path / "cache").glob("*/*.safetensors")}
    assert sorted(files) == ["2", "3", "4"]  # the training scans of fold 0
    sampler_masks = sum(len(f["mask_keys"]) for f in files.values())
    assert sampler_masks > 0 and all(sum(k.startswith("latents") for k in f) == 2 for f in files.values())


def test_cpu_precision_runs_the_bundled_model_at_another_size(tmp_path):
    res = _script(str(ROOT / "benchmarks" / "cpu_precision.py"), "--threads", "1", "--batch", "16", "--repeat", "1",
                  "--image-size", "64", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(64 px)" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith(("| encode", "| train", "| predict"))]
    assert [r.split(" | ")[0] for r in rows] == ["| encode slices", "| encode masks", "| train step", "| predict"]
    assert "Dice" in rows[-1]
    res = _script(str(ROOT / "benchmarks" / "cpu_precision.py"), "--image-size", "60", cwd=tmp_path)
    assert res.returncode != 0 and "not a multiple of 8" in res.stderr
