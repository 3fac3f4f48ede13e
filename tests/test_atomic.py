"""sdfsmis.atomic: a failed write leaves the target as it was and no temporary behind."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sdfsmis import atomic


def test_write_json_replaces_whole_with_the_usual_mode(tmp_path):
    path = atomic.write_json(tmp_path / "a.json", {"x": 1})
    atomic.write_json(path, {"x": 2}, indent=None)
    assert path.read_text() == '{"x": 2}\n'
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic.write_text(tmp_path / "log.csv", "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    def broken(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_stream(path, broken)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_write_files_renames_only_after_every_file_is_written(tmp_path):
    atomic.write_files(tmp_path, {"a.txt": "1", "b.txt": "1"})
    with pytest.raises(FileNotFoundError):  # the second file cannot be written: nothing is renamed
        atomic.write_files(tmp_path, {"a.txt": "2", "no-such-folder/b.txt": "2"})
    assert (tmp_path / "a.txt").read_text() == "1" and (tmp_path / "b.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    paths = atomic.write_files(tmp_path / "new", {"c.json": json.dumps([1])})
    assert paths == {"c.json": tmp_path / "new" / "c.json"} and json.loads(paths["c.json"].read_text()) == [1]


def test_write_dir_replaces_a_folder_or_leaves_it(tmp_path):
    final = tmp_path / "model"
    atomic.write_dir(final, lambda d: (d / "w").write_text("1"))
    atomic.write_dir(final, lambda d: (d / "w").write_text("2"))
    assert (final / "w").read_text() == "2"

    def fails(d):
        (d / "w").write_text("3")
        raise SystemExit("too large")  # also for exits, e.g. a script's size check

    with pytest.raises(SystemExit):
        atomic.write_dir(final, fails)
    assert (final / "w").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
