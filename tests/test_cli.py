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


def test_version_quiet_anywhere_and_help_texts(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("sdfsmis ")
    from sdfsmis.cli import build_parser

    args = build_parser().parse_args(["table", "x.json", "-q"])  # -q after the subcommand
    assert args.quiet
    assert not getattr(build_parser().parse_args(["table", "x.json"]), "quiet", False)
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "example:" in text and "(default: 0.2)" in text and "(default: auto)" in text


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    import sdfsmis.demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sdfsmis.demo, "run_demo", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d"), "-q"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "sdfsmis demo: interrupted"


def test_names_and_flag_names_in_messages(tmp_path, capsys):
    from sdfsmis.cli import parse_names
    from sdfsmis.errors import InputError

    assert parse_names(["1=liver", "2=kidney_r"]) == {1: "liver", 2: "kidney_r"}
    assert parse_names(["labels.json"]) == "labels.json" and parse_names(None) is None
    with pytest.raises(InputError, match="--names"):
        parse_names(["1=liver", "spleen"])
    for file in ("s", "m", "q"):
        (tmp_path / f"{file}.nii.gz").write_bytes(b"")
    base = ["predict", "--support-image", str(tmp_path / "s.nii.gz"), "--support-mask", str(tmp_path / "m.nii.gz"),
            "--query", str(tmp_path / "q.nii.gz"), "--out", str(tmp_path / "o.nii.gz"), "-q"]
    assert main([*base, "--min-area", "-1"]) == 2
    assert "--min-area" in capsys.readouterr().err
    assert main([*base[:-2], "/proc/x.nii.gz", "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot create files in the output folder /proc" in err and "--out" in err
