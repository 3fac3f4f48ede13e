"""Fixtures shared by the prediction and demo tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny (random) SD-FSMIS model directory."""
    from sdfsmis.models.backbones import BackboneConfig
    from sdfsmis.models.config import ModelConfig
    from sdfsmis.models.io import build_model, save_pretrained

    torch.manual_seed(0)
    model = build_model(ModelConfig(method="sdfsmis", backbone=BackboneConfig(tier="tiny", seed=0)))
    return save_pretrained(model, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite runs two tests at a time (pytest -n 2): one intra-op thread each."""
    torch.set_num_threads(1)
