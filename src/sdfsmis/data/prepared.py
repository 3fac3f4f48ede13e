"""Reader of the prepared-dataset format written by :func:`sdfsmis.data.prepare.prepare_dataset`.

Layout (see ``docs/architecture.md``)::

    OUT/dataset.json          format_version, dataset, spec, source, supervoxels, scans[...]
    OUT/scans/<id>.npz        image float16 [X, Y, Z] in [-1, 1], label uint8, body bool,
                              supervoxels int32 (0 outside the body, 1..N), sv_pairs int32 [M, 2]

``PreparedDataset(root).load(id)`` returns a :class:`Scan` with those arrays (as stored, e.g. the
image stays float16) plus its :class:`ScanInfo`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .datasets import DatasetSpec

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
SCAN_ARRAYS = ("image", "label", "body", "supervoxels", "sv_pairs")


class LabelSlices(dict):
    """``label id -> sorted slice indices``; int keys, but ``"1"`` works as well as ``1``."""

    def __getitem__(self, key: Any) -> list[int]:
        return super().__getitem__(int(key))

    def __contains__(self, key: object) -> bool:
        try:
            return super().__contains__(int(key))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass(frozen=True)
class ScanInfo:
    """One ``scans`` entry of ``dataset.json``."""

    id: str
    file: str  # relative to the dataset root
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm along X, Y, Z
    affine: np.ndarray = field(compare=False)  # 4x4 voxel-to-world
    class_slices: LabelSlices = field(compare=False)  # label id -> slices holding it (every spec id)
    n_supervoxels: int = 0
    n_sv_pairs: int = 0
    source: dict = field(default_factory=dict, compare=False)  # source files: name, size, mtime_ns

    @classmethod
    def from_json(cls, entry: dict) -> ScanInfo:
        return cls(
            id=str(entry["id"]),
            file=str(entry["file"]),
            shape=tuple(int(s) for s in entry["shape"]),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in entry["spacing"]),  # type: ignore[arg-type]
            affine=np.asarray(entry["affine"], dtype=np.float64).reshape(4, 4),
            class_slices=LabelSlices({int(k): [int(z) for z in v] for k, v in entry["class_slices"].items()}),
            n_supervoxels=int(entry["n_supervoxels"]),
            n_sv_pairs=int(entry["n_sv_pairs"]),
            source=dict(entry.get("source", {})),
        )


@dataclass
class Scan:
    """One prepared scan: arrays ``[X, Y, Z]`` as stored, ``sv_pairs`` ``[M, 2]`` rows ``(z, sv)``."""

    info: ScanInfo
    image: np.ndarray  # float16 in [-1, 1]
    label: np.ndarray  # uint8 label ids of the spec
    body: np.ndarray  # bool
    supervoxels: np.ndarray  # int32, 0 outside the body, 1..n_supervoxels
    sv_pairs: np.ndarray  # int32 [M, 2]

    @property
    def id(self) -> str:
        return self.info.id


def spec_from_json(raw: dict) -> DatasetSpec:
    known = {f.name for f in fields(DatasetSpec)}
    kwargs = {k: v for k, v in raw.items() if k in known}
    kwargs["labels"] = {str(k): int(v) for k, v in kwargs["labels"].items()}
    kwargs["eval_organs"] = tuple(kwargs["eval_organs"])
    return DatasetSpec(**kwargs)


def read_dataset_json(root: Path) -> dict:
    """The parsed ``dataset.json`` of ``root``; InputError if absent, unreadable or another version."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "prepared dataset folder not found")
    path = root / DATASET_JSON
    if not path.is_file():
        raise InputError(root, f"not a prepared dataset (no {DATASET_JSON}); run `sdfsmis prepare` first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"unreadable ({err})") from err
    if not isinstance(meta, dict):
        raise InputError(path, "not a prepared-dataset description")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            path, f"format_version {version!r}, this sdfsmis reads {FORMAT_VERSION}; re-run `sdfsmis prepare`"
        )
    return meta


class PreparedDataset:
    """Read access to a prepared dataset folder, with a small LRU cache of loaded scans."""

    def __init__(self, root: str | Path, cache_size: int = 4):
        self.root = Path(root)
        meta = read_dataset_json(self.root)
        path = self.root / DATASET_JSON
        try:
            self.spec: DatasetSpec = spec_from_json(meta["spec"])
            infos = [ScanInfo.from_json(e) for e in meta["scans"]]
            self.dataset: str = str(meta["dataset"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(path, f"malformed prepared-dataset description ({err!r})") from err
        self.meta = meta
        self.source: str = str(meta.get("source", ""))
        self.supervoxels: dict = dict(meta.get("supervoxels", {}))
        self._infos: dict[str, ScanInfo] = {i.id: i for i in infos}
        self.scan_ids: list[str] = [i.id for i in infos]  # already sorted by prepare
        self._cache: OrderedDict[str, Scan] = OrderedDict()
        self._cache_size = max(0, int(cache_size))

    def __len__(self) -> int:
        return len(self.scan_ids)

    def __contains__(self, scan_id: object) -> bool:
        return str(scan_id) in self._infos

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.root)!r}, dataset={self.dataset!r}, scans={len(self)})"

    @property
    def pair_offset(self) -> int:
        """Slice offset of ``sv_pairs`` rows: 1 for 3-D supervoxels (z, z+1), 0 for 2-D superpixels."""
        return int(self.supervoxels.get("pair_offset", 1))

    def info(self, scan_id: str | int) -> ScanInfo:
        key = str(scan_id)
        if key not in self._infos:
            raise InputError(self.root, f"no scan {key!r} in this prepared dataset (ids: {self.scan_ids})")
        return self._infos[key]

    def load(self, scan_id: str | int) -> Scan:
        info = self.info(scan_id)
        if info.id in self._cache:
            self._cache.move_to_end(info.id)
            return self._cache[info.id]
        scan = self._read(info)
        if self._cache_size:
            self._cache[info.id] = scan
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return scan

    def _read(self, info: ScanInfo) -> Scan:
        path = self.root / info.file
        if not path.is_file():
            raise InputError(path, "scan file missing from the prepared dataset; re-run `sdfsmis prepare`")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in SCAN_ARRAYS}
        except KeyError as err:
            raise InputError(path, f"scan file lacks array {err}; re-run `sdfsmis prepare`") from err
        except Exception as err:  # zipfile / zlib errors on a damaged file
            raise InputError(path, f"unreadable scan file ({type(err).__name__}: {err})") from err
        for k in ("image", "label", "body", "supervoxels"):
            if arrays[k].shape != info.shape:
                raise InputError(path, f"array {k} has shape {arrays[k].shape}, dataset.json says {info.shape}")
        return Scan(info=info, **arrays)
