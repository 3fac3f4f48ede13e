"""Dataset description files: the documented keys, defaults, and one-line errors naming the key."""

from __future__ import annotations

import json

import pytest

from sdfsmis.cli import main
from sdfsmis.data.datasets import SPEC_KEYS, get_spec
from sdfsmis.errors import InputError

CARDIAC = {"name": "my-cine", "labels": {"lv_myo": 1, "lv_bp": 2, "rv": 3},
           "eval_organs": ["lv_bp", "lv_myo", "rv"], "supervoxel_min_size": 1000, "modality": "MR"}


def _write(tmp_path, obj, name="spec.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_full_and_minimal_descriptions(tmp_path):
    spec = get_spec(_write(tmp_path, CARDIAC))
    assert spec.labels == {"lv_myo": 1, "lv_bp": 2, "rv": 3} and spec.eval_organs == ("lv_bp", "lv_myo", "rv")
    assert spec.supervoxel_min_size == 1000 and spec.modality == "MR"
    minimal = get_spec(_write(tmp_path, {"name": "ct", "labels": {"liver": 6, "spleen": 1}}, "m.json"))
    assert minimal.eval_organs == ("liver", "spleen") and minimal.supervoxel_min_size == 5000
    assert minimal.modality == "MR" and set(SPEC_KEYS) == {"name", "labels", "eval_organs",
                                                          "supervoxel_min_size", "modality", "notes"}


@pytest.mark.parametrize("change, key", [
    ({"supervoxel_minsize": 500}, "supervoxel_minsize"),  # a typo is not silently ignored
    ({"labels": ["rv", "lv_myo", "lv_bp"]}, "labels"),
    ({"labels": {"rv": "3"}}, "labels"),
    ({"labels": {"rv": True}}, "labels"),
    ({"eval_organs": "rv"}, "eval_organs"),
    ({"supervoxel_min_size": 10.5}, "supervoxel_min_size"),
    ({"supervoxel_min_size": 0}, "supervoxel_min_size"),
    ({"modality": "MRI"}, "modality"),
    ({"name": 7}, "name"),
])
def test_bad_keys_are_one_line_errors_naming_the_key(tmp_path, change, key):
    path = _write(tmp_path, {**CARDIAC, **change})
    with pytest.raises(InputError) as err:
        get_spec(path)
    text = str(err.value)
    assert key in text and str(path) in text and "\n" not in text


def test_missing_keys_and_cli_exit_status(tmp_path, capsys):
    path = _write(tmp_path, {"labels": {"rv": 3}})
    with pytest.raises(InputError, match="missing key 'name'"):
        get_spec(path)
    bad = _write(tmp_path, {**CARDIAC, "labels": ["rv"]}, "bad.json")
    assert main(["prepare", str(tmp_path), "--dataset", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "labels" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
