"""The command line: bad input ends with one line naming the file and the problem, exit status 2."""

from __future__ import annotations

import pytest

from sdfsmis.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["prepare", "{tmp}/nowhere", "--dataset", "abd-mri", "--out", "{tmp}/out"], "nowhere"),
    (["prepare", "{tmp}", "--dataset", "no-such-dataset", "--out", "{tmp}/out"], "no-such-dataset"),
    (["evaluate", "{tmp}/nowhere", "--out", "{tmp}/out"], "nowhere"),
    (["evaluate", "{tmp}", "--method", "{tmp}/no-model", "--out", "{tmp}/out"], "no-model"),
    (["train", "--config", "{tmp}/missing.json"], "missing.json"),
    (["train", "no_such_key=1"], "no_such_key"),
])
def test_bad_input_exits_2_with_the_name(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sdfsmis {argv[0]}: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()
