"""The ``sd`` tier end to end, as a user with their own Stable Diffusion weights meets it.

Tiny random checkpoints in the standard diffusers / transformers layouts (SD-1.5 and SD-2.1, with
``text_encoder/``, ``tokenizer/`` and ``scheduler/``; fp16-variant folders) are written to a temp
dir; a run trains a few steps with a relative SD path, the model is loaded from another working
directory, after the SD folder moved (``backbone_path``), and segments a NIfTI query (``predict``).
Checkpoints without optimizer state / with fp16 weights, and ``init_from`` fine-tuning, are here too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_predict import nifti_pair
from test_train import tiny_cfg, write_prepared

from sdfsmis import train as T
from sdfsmis.cli import main
from sdfsmis.errors import InputError
from sdfsmis.models.backbones import BackboneConfig, build_backbone, save_tiny_dinov2, save_tiny_sd_checkpoint
from sdfsmis.models.io import load_pretrained
from sdfsmis.predict import predict


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def _sd_cfg(out_dir: Path, data: Path, sd: str, *extra: str) -> T.TrainConfig:
    return tiny_cfg(out_dir, data, "iterations=2", "model.backbone.tier=sd", f"model.backbone.path={sd}",
                    "model.backbone.image_size=32", "optim.lr_backbone=1e-3", *extra)


@pytest.mark.parametrize("layout", ["sd15", "sd21"])
def test_sd_tier_train_save_move_load_predict(layout, tmp_path, prepared, monkeypatch):
    work = tmp_path / "project"
    work.mkdir()
    sd = save_tiny_sd_checkpoint(work / "ckpt" / f"tiny-{layout}", seed=3, layout=layout, full=True)
    for part in ("text_encoder", "tokenizer", "scheduler", "unet", "vae"):
        assert (sd / part).is_dir()
    extra = ["model.backbone.image_encoder=vae"]  # the VAE-feature VTCT, as the compact tier
    if layout == "sd21":  # DINOv2 condition features, as the paper's sd tier (its default)
        save_tiny_dinov2(work / "ckpt" / "dino", seed=3)
        extra = ["model.backbone.image_encoder=ckpt/dino"]
    monkeypatch.chdir(work)  # relative paths, as typed on a command line
    final = T.train(_sd_cfg(work / "run", prepared, f"ckpt/tiny-{layout}", *extra), progress=False)
    saved = json.loads((final / "config.json").read_text())["backbone"]
    assert saved["path"] == str(sd.resolve())  # stored absolute
    if layout == "sd21":
        assert saved["image_encoder"] == str((work / "ckpt" / "dino").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reference = load_pretrained(final)
    # The SD folder moves: the error names the model's config.json, its keys and the override.
    moved = shutil.move(str(sd), str(tmp_path / "moved-sd"))
    with pytest.raises(InputError) as err:
        load_pretrained(final)
    text = str(err.value)
    assert str(final / "config.json") in text and "backbone.path" in text and "--backbone-path" in text
    assert "\n" not in text
    # Only the frozen parts come from the SD folder: its UNet weights are not read again.
    (Path(moved) / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    model = load_pretrained(final, backbone_path=moved)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)

    scans = nifti_pair(elsewhere / "in")
    (elsewhere / "out").mkdir()
    (elsewhere / "cli").mkdir()
    result = predict(scans["support"], scans["mask"], scans["query"], elsewhere / "out" / "pred",
                     checkpoint=final, backbone_path=moved, progress=False, min_area_mm2=0.0)
    assert result.segmentation.is_file() and [o["label"] for o in result.summary["organs"]] == [3, 7]
    assert result.summary["model"]["checkpoint"] == str(final)
    # The same from the command line.
    rc = main(["-q", "predict", "--support-image", str(scans["support"]), "--support-mask", str(scans["mask"]),
               "--query", str(scans["query"]), "--out", str(elsewhere / "cli" / "pred"), "--checkpoint",
               str(final), "--backbone-path", moved, "--no-overlay"])
    assert rc == 0 and (elsewhere / "cli" / "pred.nii.gz").is_file()


def test_fp16_variant_folder_loads(tmp_path):
    sd = save_tiny_sd_checkpoint(tmp_path / "sd-fp16", seed=1, variant="fp16", full=True)
    assert not (sd / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (sd / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    bb = build_backbone(BackboneConfig(tier="sd", path=str(sd), image_encoder="vae", image_size=32))
    assert bb.unet.dtype == torch.float32
    ref = build_backbone(BackboneConfig(tier="sd", path=str(save_tiny_sd_checkpoint(tmp_path / "sd32", seed=1)),
                                        image_encoder="vae", image_size=32))
    for key, value in ref.unet.state_dict().items():
        torch.testing.assert_close(bb.unet.state_dict()[key], value.half().float())


def test_missing_local_paths_fail_at_once_with_the_real_key(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_backbone(BackboneConfig(tier="sd", path=str(tmp_path / "nowhere"), image_size=32))
    with pytest.raises(InputError, match="does not exist"):
        build_backbone(BackboneConfig(tier="sd", path=str(tmp_path / "v1-5-pruned-emaonly.safetensors")))
    with pytest.raises(InputError, match=r"model\.backbone\.path="):
        build_backbone(BackboneConfig(tier="sd"))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read the single-file checkpoint"):
        build_backbone(BackboneConfig(tier="sd", path=str(bad), image_size=32))


def test_light_checkpoints_and_resume(tmp_path, prepared):
    cfg = tiny_cfg(tmp_path / "run", prepared, "checkpoint_optimizer=false", "checkpoint_fp16=true")
    T.train(cfg, progress=False, max_steps=2)
    ckpt = T.latest_checkpoint(tmp_path / "run")
    assert not (ckpt / "optimizer.pt").exists()
    with safe_open(str(ckpt / "model" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    final = T.train(cfg, progress=False)  # resumes from step 2 with a fresh optimizer
    assert json.loads((T.latest_checkpoint(tmp_path / "run") / "state.json").read_text())["step"] == 4
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_init_from_starts_from_saved_weights_with_a_fresh_optimizer(tmp_path, prepared):
    first = T.train(tiny_cfg(tmp_path / "a", prepared), progress=False)
    # Zero learning rates: the run's final weights are exactly the ones it started from.
    zero = ("optim.lr_scratch=0", "optim.lr_new=0", "optim.lr_backbone=0", "iterations=1")
    for source in (first, tmp_path / "a", T.latest_checkpoint(tmp_path / "a")):
        out = T.train(tiny_cfg(tmp_path / f"b-{source.name}", prepared, f"init_from={source}", *zero),
                      progress=False)
        started = load_pretrained(out).state_dict()
        for key, value in load_pretrained(T.resolve_init_from(str(source))).state_dict().items():
            torch.testing.assert_close(started[key], value)
    assert T.resolve_init_from(str(tmp_path / "a")) == first
    # The bundled model is a compact-tier SD-FSMIS: a tiny-tier run is told what to set.
    with pytest.raises(InputError, match="model.backbone.tier=compact"):
        T.train(tiny_cfg(tmp_path / "c", prepared, "init_from=bundled"), progress=False)
    with pytest.raises(InputError, match="init_from"):
        T.train(tiny_cfg(tmp_path / "d", prepared, f"init_from={tmp_path / 'none'}"), progress=False)


def test_plans_and_configs_name_each_other(tmp_path, capsys):
    import subprocess
    import sys

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"base": ["iterations=2"], "runs": [{"name": "a"}]}))
    assert main(["train", "--config", str(plan)]) == 2
    assert "scripts/run_experiments.py" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"iterations": 2}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_experiments.py"
    res = subprocess.run([sys.executable, str(script), str(config), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "sdfsmis train --config" in res.stderr and len(res.stderr.splitlines()) == 1


def test_log_has_per_group_rates_and_paths_are_absolute(tmp_path, prepared, monkeypatch):
    import csv

    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tmp_path / "run", prepared, "cache_latents=true", "cache_dir=cache", "optim.lr_new=2e-3")
    assert cfg.cache_dir == str(tmp_path / "cache")
    T.train(cfg, progress=False, max_steps=1)
    with (tmp_path / "run" / "log.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["lr_new"]) == 2e-3 and float(row["lr_backbone"]) == 1e-3 and float(row["lr"]) == 2e-3
