"""experiments/configs/*.json are `sdfsmis train --config` files; experiments/plans/*.json are plans
for scripts/run_experiments.py whose "config" names a config file. Plans are checked, expanded per
fold, and own their output folder, so no two plans write to the same run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sdfsmis.train import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_experiments import PlanError, claim_output, load_plan  # noqa: E402
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.json"))
PLANS = sorted((ROOT / "experiments" / "plans").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_load_as_training_configs(path):
    assert load_config(path).iterations >= 1


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_plans_are_plans_and_name_existing_configs(path):
    plan = json.loads(path.read_text())
    assert plan["runs"] and all("name" in r for r in plan["runs"])
    if "config" in plan:
        assert (ROOT / plan["config"]).resolve().parent == (ROOT / "experiments" / "configs").resolve()
        assert (ROOT / plan["config"]).is_file()


def test_both_kinds_exist():
    assert CONFIGS and PLANS and not list((ROOT / "experiments").glob("*.json"))


def test_plans_expand_to_distinct_runs_in_distinct_folders():
    plans = [load_plan(p) for p in PLANS]
    outs = [p.out for p in plans]
    assert len(set(outs)) == len(outs), "two plans share an output folder"
    folders = [p.out / r.name for p in plans for r in p.runs]
    assert len(set(folders)) == len(folders)
    s1 = load_plan(ROOT / "experiments" / "plans" / "cpu-abd-mri-s1.json")
    assert [r.name for r in s1.runs] == [f"sdfsmis-abd-mri-s1-f{f}" for f in range(5)]
    assert all(r.overrides[-1] == f"episodes.fold={f}" for f, r in enumerate(s1.runs))


def _write(path: Path, plan: dict) -> Path:
    path.write_text(json.dumps(plan))
    return path


def test_fold_expansion_and_bad_plans(tmp_path):
    plan = load_plan(_write(tmp_path / "p.json", {"out": "o", "runs": [
        {"name": "a", "folds": [2, 3], "overrides": ["x=1", "init_from=r-f{fold}/model"], "evaluate": {"prepared": "d"}},
        {"name": "b", "evaluate": {"prepared": "d", "folds": [0, 1]}}]}))
    assert [(r.name, r.overrides, r.evaluate) for r in plan.runs] == [
        ("a-f2", ["x=1", "init_from=r-f2/model", "episodes.fold=2"], {"prepared": "d", "folds": [2]}),
        ("a-f3", ["x=1", "init_from=r-f3/model", "episodes.fold=3"], {"prepared": "d", "folds": [3]}),
        ("b", [], {"prepared": "d", "folds": [0, 1]})]
    bad = {
        "'out' .* is required": {"runs": [{"name": "a"}]},
        "used twice": {"out": "o", "runs": [{"name": "a", "folds": [0]}, {"name": "a-f0"}]},
        "unknown run key": {"out": "o", "runs": [{"name": "a", "fold": [0]}]},
        "unknown plan key": {"out": "o", "runs": [{"name": "a"}], "bsae": []},
        "fold numbers": {"out": "o", "runs": [{"name": "a", "folds": "0"}]},
        "'name'": {"out": "o", "runs": [{"name": "../a"}]},
    }
    for message, body in bad.items():
        with pytest.raises(PlanError, match=message):
            load_plan(_write(tmp_path / "bad.json", body))


def test_a_folder_belongs_to_one_plan(tmp_path):
    first = load_plan(_write(tmp_path / "first.json", {"out": "o", "runs": [{"name": "a"}]}))
    second = load_plan(_write(tmp_path / "second.json", {"out": "o", "runs": [{"name": "a"}]}))
    claim_output(first, tmp_path / "o")
    record = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert record["plan"] == str((tmp_path / "first.json").resolve()) and record["runs"][0]["name"] == "a"
    claim_output(first, tmp_path / "o")  # the same plan again (a rerun, or after an edit): fine
    with pytest.raises(PlanError, match="first.json"):
        claim_output(second, tmp_path / "o")
