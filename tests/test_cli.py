"""The command line: bad input ends with one line naming the file and the problem, exit status 2."""

from __future__ import annotations

import pytest

from sdfsmis.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["prepare", "{tmp}/nowhere", "--dataset", "abd-mri", "--out", "{tmp}/out"], "nowhere"),
    (["prepare", "{tmp}", "--dataset", "no-such-dataset", "--out", "{tmp}/out"], "no-such-dataset"),
    (["evaluate", "{tmp}/nowhere", "--out", "{tmp}/out"], "nowhere"),
    (["evaluate", "{tmp}", "--method", "{tmp}/no-model", "--out", "{tmp}/out"], "no-model"),
    (["evaluate", "{tmp}", "--method", "{tmp}/run-f{fold}/model", "--folds", "3", "--out", "{tmp}/out"],
     "run-f3"),
    (["evaluate", "{tmp}/nowhere", "--method", "{tmp}/run-{organ}/model", "--out", "{tmp}/out"], "nowhere"),
    (["evaluate", "{tmp}", "--threshold", "half", "--out", "{tmp}/out"], "absolute:V"),
    (["train", "--config", "{tmp}/missing.json"], "missing.json"),
    (["train", "no_such_key=1"], "no_such_key"),
])
def test_bad_input_exits_2_with_the_name(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sdfsmis {argv[0]}: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_table_combines_summaries(tmp_path, capsys):
    import json
    from pathlib import Path

    summary = Path(__file__).resolve().parents[1] / "results" / "baseline" / "abd-mri" / "summary.json"
    other = json.loads(summary.read_text())
    other["method"], other["setting"] = "another method", "1"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["table", str(summary), str(tmp_path / "other.json")]) == 0
    out = capsys.readouterr().out
    assert "| TAESD prototype (training-free) |" in out and "| another method | 1 |" in out
    assert main(["table", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
