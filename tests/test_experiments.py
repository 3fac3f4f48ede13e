"""experiments/configs/*.json are `sdfsmis train --config` files; experiments/plans/*.json are plans
for scripts/run_experiments.py whose "config" names a config file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdfsmis.train import load_config

ROOT = Path(__file__).resolve().parents[1]
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
