"""Atomic writes: a file or folder is written under a temporary name beside its target and renamed
into place when complete, so a reader (or a rerun after a crash) sees the old version or the new
one, never a part.

- :func:`replacing` (context manager): the temporary path of one file, for any writer that takes a
  path (safetensors, ``np.savez`` on an open file, ``torch.save``, matplotlib with ``format=``);
- :func:`write_stream`: ``write(fileobj)`` into the temporary file, opened for binary writing;
- :func:`write_text`, :func:`write_json`: the common cases;
- :func:`write_files`: several text files of one folder, renamed only after all were written;
- :class:`Staging`: several files of any writer (NIfTI, PNG, JSON), renamed together on ``commit()``;
- :func:`write_dir`: a whole folder, filled in a temporary sibling, replacing an older one.

Temporary names start with ``.`` and end with ``.tmp`` (files; ``Staging`` keeps the final suffix
after it) or start with ``.tmp-`` (folders);
they are removed when writing fails. Files get the usual mode (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO


@functools.cache
def _file_mode() -> int:
    umask = os.umask(0o022)  # read once: os.umask can only be read by setting it
    os.umask(umask)
    return 0o666 & ~umask


def _temporary(path: Path, suffix: str = "") -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    os.chmod(tmp, _file_mode())  # mkstemp creates 0600
    return Path(tmp)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """``with replacing(path) as tmp: write(tmp)``: ``tmp`` is renamed to ``path`` when the block
    ends without an error, and removed otherwise. The parent folder must exist."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_stream(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(fileobj)`` into a temporary file opened ``"wb"``, renamed to ``path`` when complete."""
    with replacing(path) as tmp, tmp.open("wb") as fh:
        write(fh)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (with a final newline) to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_files(folder: str | Path, files: Mapping[str, str]) -> dict[str, Path]:
    """Write every ``name: text`` of ``files`` into ``folder`` (created) under a temporary name, then
    rename them all: a failure while writing leaves every target as it was. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with Staging() as staging:
        for name, text in files.items():
            staging.temp(folder / name).write_text(text, encoding="utf-8")
        staging.commit()
    return {name: folder / name for name in files}


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the finished folder ``tmp`` to ``final`` (replacing an older one) with renames only."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder ``.tmp-NAME-PID`` with ``write(tmp)`` and rename it to
    ``final`` (replacing an older folder); on any error the temporary folder is removed and
    ``final`` is left as it was. Returns ``final``."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        return replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Staging:
    """Several files written together: ``temp(final)`` names a temporary file beside ``final`` that
    keeps its suffix (``.nii.gz``, ``.png``: writers that pick the format by name), ``commit()``
    renames them all; leaving the ``with`` block without a commit removes them."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def temp(self, final: Path) -> Path:
        final = Path(final)
        tmp = _temporary(final, ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix)
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        self.pending = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
