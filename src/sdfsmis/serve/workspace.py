"""The workspace folder: every file the app reads or writes lies inside it (symlinks included)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

SCAN_SUFFIXES = (".nii.gz", ".nii")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SKIP_DIRS = {"results", "support-sets", ".sdfsmis"}


class TooLarge(Exception):
    """An upload is above the size limit."""


class Workspace:
    def __init__(self, root: str | Path):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        for sub in ("uploads", "results", "support-sets", ".sdfsmis/tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def tmp(self) -> Path:
        return self.root / ".sdfsmis" / "tmp"

    def resolve(self, rel: str, must_exist: bool = True) -> Path:
        """``rel`` (a path relative to the workspace) as an absolute path inside it, or InputError.

        Absolute paths, ``..`` and symlinks that lead outside the workspace are refused."""
        if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
            raise InputError(rel or None, "not a valid workspace path")
        parts = Path(rel).parts
        if Path(rel).is_absolute() or any(p in ("..", "") for p in parts):
            raise InputError(rel, "path must be relative to the workspace and stay inside it")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise InputError(rel, "path leads outside the workspace")
        if must_exist and not path.is_file():
            raise InputError(rel, "no such file in the workspace")
        return path

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def scans(self) -> list[str]:
        """NIfTI files under the workspace (not in results/, support-sets/ or hidden folders)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and not (here == self.root and d in SKIP_DIRS))
            for f in sorted(filenames):
                if f.endswith(SCAN_SUFFIXES) and not f.startswith("."):
                    try:
                        found.append(self.rel(self.resolve((here / f).relative_to(self.root).as_posix())))
                    except (InputError, ValueError):
                        continue  # a symlink leading outside
        return found

    def unique(self, folder: Path, name: str) -> Path:
        stem, suffix = _split(name)
        path, i = folder / name, 1
        while path.exists():
            path, i = folder / f"{stem}-{i}{suffix}", i + 1
        return path

    def receive(self, stream: BinaryIO, name: str, limit: int) -> Path:
        """Copy ``stream`` into a temporary file (at most ``limit`` bytes, else TooLarge, nothing kept)."""
        tmp = self.tmp / f"upload-{uuid.uuid4().hex}{_split(name)[1]}"
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(name)
                    out.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


def safe_upload_name(name: str | None, suffixes: tuple[str, ...]) -> str:
    base = os.path.basename(name or "")
    if not SAFE_NAME.match(base) or not base.endswith(suffixes) or base in suffixes:
        raise InputError(name or None, f"file name must be letters, digits, '.', '_' or '-' and end with "
                                       f"{' or '.join(suffixes)}")
    return base


def _split(name: str) -> tuple[str, str]:
    for suffix in (".nii.gz", ".nii", ".sdfset"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    p = Path(name)
    return p.stem, p.suffix


def move_into(tmp: Path, final: Path) -> Path:
    """Rename a finished temporary file to its final name (same file system)."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.move(str(tmp), str(final))
    return final
