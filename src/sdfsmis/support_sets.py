"""Support sets: annotated slices saved once and reused on other scans.

A support set holds the annotated axial slices of one scan (image intensities as in the file, the
label masks on them), the label names and colours, the scan's voxel spacing and where the slices lie
in it (slice index, number of slices, the scan's body z-range). It is one file, a zip archive
(``NAME.sdfset``) with

- ``support_set.json``: ``{"format": "sdfsmis-support-set", "version": 1, "name", "labels": [{"id",
  "name", "colour"}], "spacing": [dx, dy, dz], "slices": [z, ...], "depth", "body_z_range",
  "source", "created"}``;
- ``image.nii.gz`` / ``mask.nii.gz``: the slices stacked along the third axis, in the closest
  canonical (RAS+) voxel order, with the scan's spacing.

To apply a set, :func:`materialise` rebuilds a support volume of the source scan's depth: each slice
inside the source's body z-range repeats the nearest annotated slice, slices outside it are the
darkest value, and the mask holds the annotations on their own slices only. ``predict`` then sees the
organ at the same relative z-position of the body as in the source scan, so its slice planning is the
same as when the annotated scan itself is the support.
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import atomic
from .errors import InputError

FORMAT = "sdfsmis-support-set"
SUFFIX = ".sdfset"
MAX_SET_BYTES = 512 * 1024 * 1024  # uncompressed members of an imported set
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
DEFAULT_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f032e6", "#42d4f4", "#f58231", "#911eb4"]


@dataclass
class LabelInfo:
    id: int
    name: str
    colour: str


@dataclass
class SupportSet:
    name: str
    labels: list[LabelInfo]
    spacing: tuple[float, float, float]
    slices: list[int]  # canonical axial slice index of each stacked slice
    depth: int  # axial slices of the source scan
    body_z_range: tuple[int, int]
    image: np.ndarray = field(repr=False)  # [X, Y, len(slices)] float32
    mask: np.ndarray = field(repr=False)  # [X, Y, len(slices)] uint16
    source: str = ""
    created: str = ""

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "name": self.name,
                "labels": [{"id": lab.id, "name": lab.name, "colour": lab.colour} for lab in self.labels],
                "spacing": [float(s) for s in self.spacing], "slices": [int(z) for z in self.slices],
                "depth": int(self.depth), "body_z_range": [int(z) for z in self.body_z_range],
                "source": self.source, "created": self.created}


def check_name(name: str) -> str:
    name = str(name).strip()
    if not NAME_RE.match(name):
        raise InputError(None, f"support set name {name!r} is not allowed: use 1-64 letters, digits, "
                               "spaces, '.', '_' or '-', starting with a letter or digit")
    return name


def label_infos(present: list[int], given: list[dict] | None = None) -> list[LabelInfo]:
    """Names and colours for the label ids ``present``; ``given`` entries ({id, name, colour}) win."""
    by_id: dict[int, dict] = {}
    for item in given or []:
        try:
            by_id[int(item["id"])] = item
        except (KeyError, TypeError, ValueError):
            raise InputError(None, f"label entry {item!r} needs an integer 'id'") from None
    out = []
    for i, lab in enumerate(present):
        item = by_id.get(lab, {})
        colour = str(item.get("colour") or DEFAULT_COLOURS[(lab - 1) % len(DEFAULT_COLOURS)])
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", colour):
            raise InputError(None, f"label {lab}: colour {colour!r} is not #rrggbb")
        out.append(LabelInfo(id=int(lab), name=str(item.get("name") or f"label {lab}")[:64], colour=colour))
    return out


def from_annotation(image_path: str | Path, mask_path: str | Path, name: str,
                    labels: list[dict] | None = None) -> SupportSet:
    """Collect the annotated axial slices of ``mask_path`` (and ``image_path``) into a set."""
    from .data.intensity import normalise_image
    from .inference.planning import body_z_range
    from .inference.scans import load_inputs

    name = check_name(name)
    inputs = load_inputs(image_path, mask_path, image_path)
    mask = inputs.mask.data
    zs = [int(z) for z in np.flatnonzero(mask.any(axis=(0, 1)))]
    body = body_z_range(normalise_image(inputs.support.data))
    return SupportSet(name=name, labels=label_infos(inputs.labels, labels),
                      spacing=tuple(float(z) for z in inputs.support.zooms),  # type: ignore[arg-type]
                      slices=zs, depth=int(mask.shape[2]), body_z_range=body,
                      image=inputs.support.data[:, :, zs].astype(np.float32),
                      mask=mask[:, :, zs].astype(np.uint16), source=Path(image_path).name,
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _nifti_bytes(arr: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    img = nib.Nifti1Image(arr, np.diag([*spacing, 1.0]))
    buf = io.BytesIO()
    file_map = img.make_file_map({"image": buf})
    img.to_file_map(file_map)
    import gzip

    return gzip.compress(buf.getvalue(), mtime=0)


def save(sset: SupportSet, path: str | Path) -> Path:
    """Write ``sset`` to ``path`` (temporary name, then renamed: never a partial file)."""
    path = Path(path)

    def write(fileobj) -> None:
        with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("support_set.json", json.dumps(sset.meta(), indent=2) + "\n")
            zf.writestr("image.nii.gz", _nifti_bytes(sset.image.astype(np.float32), sset.spacing))
            zf.writestr("mask.nii.gz", _nifti_bytes(sset.mask.astype(np.uint16), sset.spacing))

    atomic.write_stream(path, write)
    return path


def _read_nifti(data: bytes) -> np.ndarray:
    img = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(data))
    return np.asanyarray(img.dataobj)


def load(path: str | Path) -> SupportSet:
    """Read and check a support set file; :class:`InputError` names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "support set file does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            for member in ("support_set.json", "image.nii.gz", "mask.nii.gz"):
                if member not in infos:
                    raise InputError(path, f"not a support set: {member} is missing")
            if sum(i.file_size for i in infos.values()) > MAX_SET_BYTES:
                raise InputError(path, "support set is larger than 512 MiB unpacked")
            meta = json.loads(zf.read("support_set.json"))
            image = _read_nifti(zf.read("image.nii.gz")).astype(np.float32)
            mask = _read_nifti(zf.read("mask.nii.gz"))
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise InputError(path, f"not a readable support set ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != 1:
        raise InputError(path, f"not a support set (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        sset = SupportSet(name=check_name(meta["name"]), labels=[LabelInfo(int(x["id"]), str(x["name"]), str(x["colour"]))
                                                                 for x in meta["labels"]],
                          spacing=tuple(float(s) for s in meta["spacing"]),  # type: ignore[arg-type]
                          slices=[int(z) for z in meta["slices"]], depth=int(meta["depth"]),
                          body_z_range=tuple(int(z) for z in meta["body_z_range"]),  # type: ignore[arg-type]
                          image=image, mask=mask, source=str(meta.get("source", "")),
                          created=str(meta.get("created", "")))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(path, f"support set description is incomplete ({type(err).__name__}: {err})") from None
    n = len(sset.slices)
    if image.ndim != 3 or mask.shape != image.shape or image.shape[2] != n or n == 0:
        raise InputError(path, f"image {image.shape} / mask {mask.shape} do not match {n} slices")
    if not np.isfinite(image).all() or mask.dtype.kind not in "ui" or not (mask > 0).any():
        raise InputError(path, "support set image is not finite or its mask is empty/not integer")
    if min(sset.slices) < 0 or max(sset.slices) >= sset.depth or len(set(sset.slices)) != n:
        raise InputError(path, f"slice indices {sset.slices} do not fit a scan of {sset.depth} slices")
    if min(s for s in sset.spacing) <= 0:
        raise InputError(path, f"voxel spacing {sset.spacing} is not positive")
    return sset


def materialise(sset: SupportSet, folder: str | Path) -> tuple[Path, Path]:
    """Write a support image and mask volume for ``predict`` into ``folder`` (see the module doc)."""
    folder = Path(folder)
    nx, ny, _ = sset.image.shape
    z_at = np.asarray(sset.slices)
    lo, hi = sset.body_z_range
    image = np.full((nx, ny, sset.depth), float(sset.image.min()), dtype=np.float32)
    mask = np.zeros((nx, ny, sset.depth), dtype=np.uint16)
    for z in range(max(0, lo), min(sset.depth - 1, hi) + 1):
        image[:, :, z] = sset.image[:, :, int(np.argmin(np.abs(z_at - z)))]
    for i, z in enumerate(sset.slices):
        image[:, :, z] = sset.image[:, :, i]
        mask[:, :, z] = sset.mask[:, :, i]
    affine = np.diag([*sset.spacing, 1.0])
    img_path, mask_path = folder / "support_image.nii.gz", folder / "support_mask.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(img_path))
    nib.save(nib.Nifti1Image(mask, affine), str(mask_path))
    return img_path, mask_path


def predict_with_set(set_path: str | Path, query: str | Path, out: str | Path, **kwargs: Any):
    """``sdfsmis.predict.predict`` with a saved support set as the support."""
    import tempfile

    from .predict import predict

    sset = load(set_path)
    with tempfile.TemporaryDirectory(prefix="sdfsmis-set-") as tmp:
        image, mask = materialise(sset, tmp)
        return predict(image, mask, query, out, **kwargs)
