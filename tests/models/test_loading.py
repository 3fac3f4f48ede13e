"""The one model loader (``sdfsmis.models.io.model_dir`` / ``load_model``) used by predict, evaluate,
training's ``init_from`` and ship_model.py."""

from __future__ import annotations

import json

import pytest
import torch

from sdfsmis.errors import InputError
from sdfsmis.models import BackboneConfig, ModelConfig, build
from sdfsmis.models import io as model_io


def test_model_dir_accepts_bundled_model_run_and_checkpoint_folders(tmp_path, tiny_model):
    assert model_io.model_dir("bundled") == model_io.model_dir(None) == model_io.BUNDLED_MODEL_DIR
    assert model_io.model_dir(tiny_model) == tiny_model
    run = tmp_path / "run"  # a run folder: the training config beside model/
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"iterations": 1}))
    for name in ("config.json", "model.safetensors"):
        (run / "model" / name).write_bytes((tiny_model / name).read_bytes())
    assert model_io.model_dir(run) == run / "model"
    with pytest.raises(InputError, match="--method: model folder does not exist; use 'paste', 'bundled'"):
        model_io.model_dir(tmp_path / "none", option="--method", also=("paste",))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # no weights
    with pytest.raises(InputError, match="not a trained model directory") as err:
        model_io.model_dir(tmp_path / "half")
    assert err.value.path == tmp_path / "half"


def test_missing_bundled_model_names_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "BUNDLED_MODEL_DIR", tmp_path / "no-model")
    with pytest.raises(InputError, match="no trained default model is bundled yet; pass init_from DIR"):
        model_io.model_dir("bundled", option="init_from")


def test_load_model_overrides_the_threshold_and_refuses_a_model_that_ignores_the_support(tmp_path, tiny_model):
    model = model_io.load_model(tiny_model, threshold=model_io.parse_threshold("relative:0.5"), few_shot=True)
    assert (model.config.threshold, model.config.threshold_value) == ("relative", 0.5)
    assert not model.training
    prob = torch.tensor([[[0.2, 0.3], [0.5, 0.6]]])
    assert model.threshold(prob).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]  # > 0.5 * max = 0.3
    saved_rule = model_io.load_model(tiny_model)  # the saved rule, absolute 0: p > 0.5
    assert saved_rule.threshold(prob).tolist() == [[[0.0, 0.0], [0.0, 1.0]]]

    sdseg = model_io.save_pretrained(build(ModelConfig(method="sdseg", backbone=BackboneConfig(tier="tiny"))),
                                     tmp_path / "sdseg")
    assert type(model_io.load_model(sdseg)).__name__ == "SDSeg"  # evaluate may compare it
    with pytest.raises(InputError, match="SDSeg does not segment by the support"):
        model_io.load_model(sdseg, few_shot=True)


@pytest.mark.parametrize("text", ["absolute", "relative:x", "median:0.5", ":0.1"])
def test_parse_threshold_rejects_malformed_rules(text):
    with pytest.raises(InputError, match="--threshold"):
        model_io.parse_threshold(text)
