"""What an evaluation records: one model per organ really is used per organ, each predictor's config
is in the summary, and the threshold recorded is the cut that produced the masks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_protocol import SPEC, OraclePredictor, write_prepared

from sdfsmis.cli import main, make_predictor
from sdfsmis.evaluation.protocol import evaluate, threshold_record
from sdfsmis.evaluation.report import open_prepared
from sdfsmis.models.backbones import BackboneConfig
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.io import build_model, save_pretrained


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """Three genuinely different tiny models: seed 0 (its own rule), seed 1 with a relative rule, and
    seed 0 cutting at -0.9 (marks far more)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    other = build_model(ModelConfig(method="sdfsmis", threshold="relative", threshold_value=0.25,
                                    backbone=BackboneConfig(tier="tiny", seed=1)))
    paths = {"a": tiny_model, "b": save_pretrained(other, root / "b")}
    low = shutil.copytree(tiny_model, root / "c")
    cfg = json.loads((low / "config.json").read_text())
    cfg["threshold_value"] = -0.9
    (low / "config.json").write_text(json.dumps(cfg))
    paths["c"] = low
    return paths


def _dice(result) -> dict[tuple[str, str], float]:
    return {(c.organ, c.query_id): c.dice for c in result.cases}


def test_a_model_per_organ_is_used_for_its_organ_and_recorded(tmp_path, models):
    root = write_prepared(tmp_path / "prep")
    assign = {"liver": "a", "right_kidney": "b", "left_kidney": "c", "spleen": "b"}
    for organ, key in assign.items():
        (tmp_path / f"model-{organ}").symlink_to(models[key], target_is_directory=True)
    out = tmp_path / "mixed"
    assert main(["-q", "evaluate", str(root), "--method", str(tmp_path / "model-{organ}"), "--folds", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = {r["organ"]: r for r in summary["config"]["predictors"]}
    assert set(records) == set(SPEC.eval_organs)
    for organ, key in assign.items():
        described = records[organ]["predictor_config"]
        expected = {"a": ("absolute", 0.0, 0), "b": ("relative", 0.25, 1), "c": ("absolute", -0.9, 0)}[key]
        assert (described["threshold"], described["threshold_value"]) == expected[:2]
        assert f"'seed': {expected[2]}" in described["backbone"]
    assert summary["config"]["threshold"] == "per predictor (see predictors)"
    assert records["left_kidney"]["threshold"]["foreground_probability_above"] == pytest.approx(0.05)

    # Each organ's figures are those of its own model evaluated alone.
    prepared = open_prepared(root)
    mixed = _dice_from_summary(out)
    alone = {}
    for key in "abc":
        organs = [o for o, k in assign.items() if k == key]
        res = evaluate(make_predictor(str(models[key]), "cpu", 16), prepared, folds=(0,), organs=organs, progress=False)
        alone.update(_dice(res))
    assert mixed == pytest.approx(alone)
    # ... and not those of one model for all: the assignment matters.
    everything_a = _dice(evaluate(make_predictor(str(models["a"]), "cpu", 16), prepared, folds=(0,), progress=False))
    assert everything_a != pytest.approx(mixed)


def _dice_from_summary(out) -> dict[tuple[str, str], float]:
    import csv

    with (out / "cases.csv").open() as fh:
        return {(r["organ"], r["query_id"]): float(r["dice"]) for r in csv.DictReader(fh)}


def test_the_recorded_threshold_is_the_cut_used(tmp_path, models):
    from sdfsmis.evaluation.position import PastePredictor

    model = make_predictor(str(models["a"]), "cpu", 16, threshold=("absolute", -0.75))
    assert threshold_record(model) == {"applied_by": "model", "rule": "absolute", "value": -0.75,
                                       "foreground_probability_above": 0.125}
    assert threshold_record(make_predictor(str(models["b"]), "cpu", 16)) == {
        "applied_by": "model", "rule": "relative", "value": 0.25}
    assert threshold_record(PastePredictor()) == threshold_record(OraclePredictor()) == {
        "applied_by": "protocol", "rule": "probability_at_least", "value": 0.5}
    root = write_prepared(tmp_path / "prep")
    assert main(["-q", "evaluate", str(root), "--method", str(models["a"]), "--folds", "0", "--organs", "liver",
                 "--threshold", "absolute:-0.75", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    config = json.loads((tmp_path / "o" / "summary.json").read_text())["config"]
    assert "prob_threshold" not in config and config["threshold"]["value"] == -0.75
