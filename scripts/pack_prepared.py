"""Pack a prepared dataset into one small archive to move it between machines, and unpack it.

    python scripts/pack_prepared.py pack prepared/abd-mri abd-mri.tar.xz
    python scripts/pack_prepared.py unpack abd-mri.tar.xz prepared/abd-mri

The archive keeps everything of the prepared format except the image precision: images are stored
as uint8 (256 levels over [-1, 1], zero outside the body mask is kept exactly as the volume's
minimum) and restored to float16, so a run on an unpacked copy sees images quantised to 8 bits
(the same precision as the Abd-CT source data). Everything else is exact. Use ``--scans`` to pack a
subset of the scans (e.g. the training scans of one fold).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np


def _quantise(image: np.ndarray) -> np.ndarray:
    return np.round((image.astype(np.float32) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def _dequantise(q: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) / 127.5 - 1).astype(np.float16)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(root: Path, archive: Path, scans: list[str] | None = None) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    if scans:
        meta["scans"] = [s for s in meta["scans"] if s["id"] in set(scans)]
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for entry in meta["scans"]:
            with np.load(root / entry["file"]) as z:
                arrays = {k: z[k] for k in z.files}
            arrays["image"] = _quantise(arrays["image"])
            sv = arrays["supervoxels"]
            if sv.max() < 2**16:
                arrays["supervoxels"] = sv.astype(np.uint16)
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            _add(tar, entry["file"], buf.getvalue())
            sidecar = root / Path(entry["file"]).with_suffix(".json")
            if sidecar.is_file():
                _add(tar, str(Path(entry["file"]).with_suffix(".json")), sidecar.read_bytes())
        _add(tar, "dataset.json", json.dumps(meta, indent=1).encode())


def unpack(archive: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            target = root / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.name.endswith(".npz"):
                with np.load(io.BytesIO(data)) as z:
                    arrays = {k: z[k] for k in z.files}
                arrays["image"] = _dequantise(arrays["image"])
                arrays["supervoxels"] = arrays["supervoxels"].astype(np.int32)
                np.savez_compressed(target, **arrays)
            elif member.name != "dataset.json":
                target.write_bytes(data)
        (root / "dataset.json").write_bytes(tar.extractfile("dataset.json").read())  # last: marks complete


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("root", type=Path)
    p.add_argument("archive", type=Path)
    p.add_argument("--scans", nargs="*", default=None, help="scan ids to keep (default: all)")
    u = sub.add_parser("unpack")
    u.add_argument("archive", type=Path)
    u.add_argument("root", type=Path)
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.root, args.archive, args.scans)
    else:
        unpack(args.archive, args.root)


if __name__ == "__main__":
    main()
