"""A model that marks nothing is loud: evaluate (summary + stderr) and training checkpoints."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
from test_protocol import EmptyPredictor, OraclePredictor  # noqa: E402
from test_protocol import write_prepared as write_eval_prepared  # noqa: E402
from test_train import tiny_cfg, write_prepared  # noqa: E402

from sdfsmis import train as T  # noqa: E402
from sdfsmis.models import build  # noqa: E402
from sdfsmis.training.sampling import sampler_generator  # noqa: E402
from sdfsmis.evaluation.report import run_evaluation  # noqa: E402


def test_evaluate_warns_on_an_empty_predictor(tmp_path):
    root = write_eval_prepared(tmp_path / "prep")
    empty = run_evaluation(EmptyPredictor(), root, tmp_path / "empty", folds=(0,), progress=False)
    assert len(empty.warnings) == 4 and all("marks almost nothing" in w for w in empty.warnings)
    assert "liver" in " ".join(empty.warnings)
    assert json.loads((tmp_path / "empty" / "summary.json").read_text())["warnings"] == empty.warnings
    good = run_evaluation(OraclePredictor(), root, tmp_path / "good", folds=(0,), progress=False)
    assert good.warnings == []


def test_cli_evaluate_prints_the_warning(tmp_path, tiny_model, capsys, monkeypatch):
    from sdfsmis.cli import main
    from sdfsmis.models.predictor import ModelPredictor

    root = write_eval_prepared(tmp_path / "prep")
    monkeypatch.setattr(ModelPredictor, "predict", lambda self, s, m, q: torch.zeros_like(q))
    assert main(["-q", "evaluate", str(root), "--method", str(tiny_model), "--folds", "0",
                 "--organs", "liver", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "marks almost nothing on liver" in err
    assert list(json.loads((tmp_path / "out" / "summary.json").read_text())["organs"]) == ["liver"]


def test_checkpoints_record_and_warn_what_the_model_marks(tmp_path, caplog):
    prepared = write_prepared(tmp_path / "prepared")
    with caplog.at_level(logging.WARNING, logger="sdfsmis.train"):
        T.train(tiny_cfg(tmp_path / "run", prepared), progress=False)
    state = json.loads((T.latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    check = state["foreground"]
    assert check["true_px"] > 0
    empty = check["predicted_px"] < T.EMPTY_FRACTION * check["true_px"]
    assert empty == any("marks almost nothing" in r.message for r in caplog.records)
    # Every checkpoint checks the same fixed batch, drawn outside the training stream.
    checks = [json.loads((c / "state.json").read_text())["foreground"]
              for c in sorted((tmp_path / "run" / "checkpoints").glob("step_*"))]
    assert len(checks) == 2 and checks[0]["true_px"] == checks[1]["true_px"]
    cfg = tiny_cfg(tmp_path / "run", prepared)
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    sampler = T.build_sampler(cfg, "cpu", progress=False, model=model)
    fixed = T.check_batch(sampler, cfg, torch.device("cpu"))
    assert float((fixed["query_masks"] > 0.5).sum()) == checks[0]["true_px"]
    torch.testing.assert_close(T.check_batch(sampler, cfg, torch.device("cpu"))["query_images"], fixed["query_images"])
    # the last checkpoint's record is the final model's check on that batch
    from sdfsmis.models.io import load_pretrained

    again = T.foreground_check(load_pretrained(tmp_path / "run" / "model"), fixed)
    assert again == pytest.approx(checks[-1], rel=1e-5)
    training = sampler.sample(cfg.batch_size, sampler_generator(sampler, T.step_seed(cfg.seed, 3, 0, 0, 0)))
    assert not torch.equal(training["query_images"], fixed["query_images"])
    assert T.warn_if_empty({"predicted_px": 0, "true_px": 400, "max_probability": 0.05}, "x")
    assert not T.warn_if_empty({"predicted_px": 300, "true_px": 400, "max_probability": 0.9}, "x")
    assert not T.warn_if_empty(None, "x")


def test_cli_predict_warns_when_nothing_is_marked(tmp_path, tiny_model, capsys, monkeypatch):
    from test_predict import nifti_pair

    from sdfsmis.cli import main

    paths = list(nifti_pair(tmp_path).values())
    from sdfsmis.inference import slices

    monkeypatch.setattr(slices, "binarise", lambda model, prob: torch.zeros_like(prob, dtype=torch.bool))
    assert main(["-q", "predict", "--support-image", str(paths[0]), "--support-mask", str(paths[1]),
                 "--query", str(paths[2]), "--out", str(tmp_path / "pred"), "--checkpoint", str(tiny_model),
                 "--no-overlay"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: nothing marked for label(s) 3, 7" in err
