"""ModelConfig round trips, build determinism, save_pretrained / load_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdfsmis.errors import InputError
from sdfsmis.models import BackboneConfig, ModelConfig, build
from sdfsmis.models.backbones import unet_config
from sdfsmis.models.diffews import DiffewS
from sdfsmis.models.io import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained
from sdfsmis.models.sdfsmis import SDFSMIS


def _inputs(k: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(0)
    q = torch.rand(2, 1, size, size, generator=g) * 2 - 1
    s = torch.rand(2, k, 1, size, size, generator=g) * 2 - 1
    m = (torch.rand(2, k, 1, size, size, generator=g) > 0.5).float()
    return q, s, m


def _perturb(model: torch.nn.Module) -> None:
    """Move every trainable weight away from its initialisation (as training would)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_config_round_trip_and_defaults():
    cfg = ModelConfig(method="diffews", backbone=BackboneConfig(tier="tiny", seed=3), qe_tau=0.5)
    assert cfg.threshold == "relative" and cfg.threshold_value == 0.25
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert ModelConfig(threshold="relative").threshold_value == 0.25
    assert ModelConfig().threshold == "absolute" and ModelConfig().threshold_value == 0.0
    with pytest.raises(InputError):
        ModelConfig(method="unet")
    with pytest.raises(InputError):
        ModelConfig.from_dict({"method": "sdfsmis", "qe_tua": 0.7})
    with pytest.raises(InputError):
        ModelConfig(threshold="otsu")


def test_build_is_deterministic():
    cfg = ModelConfig(backbone=BackboneConfig(tier="tiny", seed=0))
    torch.manual_seed(123)
    a = build(cfg).state_dict()
    torch.manual_seed(456)
    b = build(cfg).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sdfsmis", "diffews", "sdseg"])
def test_save_load_round_trip(tmp_path, method):
    cfg = ModelConfig(method=method, backbone=BackboneConfig(tier="tiny", seed=0), null_embedding="learned")
    model = build(cfg).eval()
    _perturb(model)
    q, s, m = _inputs()
    with torch.no_grad():
        expected = model(q, s, m)
    out = model.save_pretrained(tmp_path / "m")
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    expected_cfg = cfg.to_dict()
    expected_cfg["backbone"]["image_encoder"] = "tiny-dinov2"  # the tier's default, written out
    assert json.loads((out / CONFIG_NAME).read_text()) == expected_cfg
    loaded = type(model).from_pretrained(out)
    assert not loaded.training
    with torch.no_grad():
        got = loaded(q, s, m)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(v, loaded_state[k]) for k, v in saved_state.items())


def test_fast_path_survives_round_trip(tmp_path):
    model = build(ModelConfig(backbone=BackboneConfig(tier="tiny"))).eval()
    _perturb(model)
    q, s, m = _inputs(k=3)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    with torch.no_grad():
        a = model.predict_with_support(q, model.prepare_support(s[0], m[0]))
        b = loaded.predict_with_support(q, loaded.prepare_support(s[0], m[0]))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(TypeError):
        DiffewS.from_pretrained(tmp_path)


def test_half_precision_save_loads_as_float32(tmp_path):
    model = build(ModelConfig(backbone=BackboneConfig(tier="tiny", seed=0))).eval()
    _perturb(model)
    save_pretrained(model, tmp_path, dtype=torch.float16)
    assert {v.dtype for v in load_file(tmp_path / WEIGHTS_NAME).values() if v.is_floating_point()} == {torch.float16}
    loaded = load_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    q, s, m = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(q, s, m), model(q, s, m), atol=2e-2, rtol=0)


def test_frozen_external_modules_are_not_saved(tmp_path):
    """compact tier: the packaged TAESD and its feature encoder are rebuilt from the config."""
    small = {k: v for k, v in unet_config("tiny").items() if k != "sample_size"}
    cfg = ModelConfig(backbone=BackboneConfig(tier="compact", unet=small, image_size=32))
    model = build(cfg).eval()
    _perturb(model)
    save_pretrained(model, tmp_path)
    keys = load_file(str(tmp_path / WEIGHTS_NAME)).keys()
    assert not [k for k in keys if k.startswith(("vae.", "image_encoder."))]
    assert any(k.startswith("sii_layers.") for k in keys) and any(k.startswith("vtct.") for k in keys)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, SDFSMIS)
    q, s, m = _inputs(k=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(q, s, m), model(q, s, m), atol=0, rtol=0)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_pretrained(tmp_path)
    model = build(ModelConfig(method="diffews", backbone=BackboneConfig(tier="tiny")))
    save_pretrained(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="model.safetensors"):
        load_pretrained(tmp_path)
    # weights of another architecture
    save_pretrained(build(ModelConfig(backbone=BackboneConfig(tier="tiny"))), tmp_path / "other")
    (tmp_path / "other" / CONFIG_NAME).write_text((tmp_path / CONFIG_NAME).read_text())
    with pytest.raises(InputError, match="do not match"):
        load_pretrained(tmp_path / "other")
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        load_pretrained(tmp_path)
