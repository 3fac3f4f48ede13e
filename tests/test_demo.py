"""The bundled demo: its CHAOS assets are valid NIfTI pairs, and it runs end to end (tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sdfsmis import demo as D
from sdfsmis.data.nifti import check_pair, load_volume
from sdfsmis.errors import InputError
from sdfsmis.models import io as model_io


def test_demo_assets_are_valid_and_small():
    files = D.demo_files()
    total = sum(p.stat().st_size for p in D.DEMO_DIR.iterdir())
    assert total < 5 * 2**20
    for image_key, label_key in (("support_image", "support_mask"), ("query", "query_label")):
        image = load_volume(files[image_key], "image")
        label = load_volume(files[label_key], "label")
        check_pair(image, label)
        assert image.shape[:2] == (256, 256) and 20 <= image.shape[2] <= 60
        assert set(np.unique(label.array).tolist()) == {0, 1, 2, 3, 4}
        assert np.allclose(image.spacing, (1.25, 1.25, 7.7), atol=0.01)
    text = (D.DEMO_DIR / "ATTRIBUTION.md").read_text()
    for needed in ("CHAOS", "Kavur", "Medical Image Analysis", "2021", "CC BY-SA 4.0", "Changes"):
        assert needed in text


def test_demo_runs_end_to_end(tiny_model, tmp_path, capsys):
    report = D.run_demo(tmp_path / "demo", checkpoint=tiny_model, labels=[2], progress=False)
    out = capsys.readouterr().out
    assert set(report["dice"]) == {"right kidney"}
    value = report["dice"]["right kidney"]
    # the Dice of the written segmentation against the query's labels (CHAOS id 2), recomputed here
    pred = np.asarray(nib.load(report["segmentation"]).dataobj) == 2
    truth = np.asarray(nib.load(D.demo_files()["query_label"]).dataobj) == 2
    assert pred.any() and value == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    for key in ("segmentation", "overlay", "summary", "dice_file"):
        assert Path(report[key]).is_file() and report[key] in out
    seg = nib.load(report["segmentation"])
    query = nib.load(D.demo_files()["query"])
    assert seg.shape == query.shape and np.allclose(seg.affine, query.affine)
    assert json.loads(Path(report["dice_file"]).read_text())["dice"] == report["dice"]
    assert "Dice right kidney" in out


def test_demo_passes_shots_and_chunks_to_predict(tiny_model, tmp_path):
    report = D.run_demo(tmp_path / "demo", checkpoint=tiny_model, labels=[2], progress=False, verbose=False,
                        shots=2, chunks=5)
    summary = json.loads(Path(report["summary"]).read_text())
    assert (summary["settings"]["shots"], summary["settings"]["chunks"]) == (2, 5)
    assert all(len(z) == 2 for z in summary["organs"][0]["support_slices"])


def test_demo_without_a_bundled_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "BUNDLED_MODEL_DIR", tmp_path / "no-model")
    with pytest.raises(InputError, match="no trained default model is bundled yet"):
        D.run_demo(tmp_path / "demo", progress=False, verbose=False)
    assert list((tmp_path / "demo").iterdir()) == []


def test_bundled_model_loads_on_the_cpu_and_is_small():
    from sdfsmis.models.io import load_pretrained

    folder = model_io.BUNDLED_MODEL_DIR
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    assert "sdfsmis train" in (folder / "README.md").read_text()
    model = load_pretrained(folder)
    assert model.config.method == "sdfsmis" and model.config.backbone.tier == "compact"
    assert not any(p.is_cuda for p in model.parameters())
