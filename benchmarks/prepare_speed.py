"""Time the ``prepare`` stage on a dataset folder.

    python benchmarks/prepare_speed.py --source /path/to/abd-mri --dataset abd-mri --out /tmp/prep --workers 2

Prints wall seconds, scans, voxels per second and supervoxel counts. The output folder is prepared
from scratch (``overwrite=True``) so that nothing is skipped.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder of image_<id>.nii.gz / label_<id>.nii.gz")
    parser.add_argument("--dataset", required=True, help="abd-mri, abd-ct, card-mri or a dataset .json")
    parser.add_argument("--out", required=True, help="output folder (overwritten)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--supervoxels", choices=["3d", "2d"], default="3d")
    parser.add_argument("--min-size", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()

    from sdfsmis.data.prepare import prepare_dataset
    from sdfsmis.data.prepared import PreparedDataset
    from sdfsmis.data.supervoxels import felzenszwalb_3d

    felzenszwalb_3d(np.zeros((4, 4, 4), np.float32), min_size=2)  # compile (or load the cache) first
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    out = prepare_dataset(
        Path(args.source), args.dataset, Path(args.out), supervoxels=args.supervoxels,
        min_size=args.min_size, workers=args.workers, progress=not args.quiet, overwrite=True,
    )
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    ds = PreparedDataset(out)
    infos = [ds.info(i) for i in ds.scan_ids]
    voxels = sum(int(np.prod(i.shape)) for i in infos)
    n_sv = np.array([i.n_supervoxels for i in infos])
    print(f"dataset        {ds.dataset} ({args.source})")
    print(f"supervoxels    {ds.supervoxels}")
    print(f"workers        {args.workers} (cpu count {os.cpu_count()})")
    print(f"seconds        {seconds:.1f} wall, {cpu:.1f} cpu (this process and its workers)")
    print(f"load average   {os.getloadavg()[0]:.1f} (other work on a shared machine slows the wall time)")
    print(f"scans          {len(infos)}  ({seconds / max(1, len(infos)):.2f} s per scan)")
    print(f"voxels/s       {voxels / seconds:,.0f}  ({voxels:,} voxels)")
    print(f"n supervoxels  mean {n_sv.mean():.1f}, min {n_sv.min()}, max {n_sv.max()}")
    print(f"sv pairs       {sum(i.n_sv_pairs for i in infos)}")


if __name__ == "__main__":
    main()
