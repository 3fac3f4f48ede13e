"""Episodes per second of :class:`sdfsmis.data.episodes.EpisodeSampler` on a synthetic dataset.

    python benchmarks/episode_speed.py --scans 4 --depth 32 --batch 8 --shots 1 --steps 10

The dataset is built in memory (blocky supervoxels, random images, one organ), with the reader's
interface, so the benchmark needs no prepared folder. Prints one line per augmentation rule.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from sdfsmis.data.datasets import SPECS
from sdfsmis.data.episodes import EpisodeConfig, EpisodeSampler


def synthetic_dataset(n_scans: int, size: int, depth: int, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(np.arange(size), np.arange(size), np.arange(depth), indexing="ij")
    cells = max(size // 32, 1)
    sv = (1 + x // 32 + cells * (y // 32) + cells * cells * (z // 4)).astype(np.int32)
    label = np.zeros((size, size, depth), np.uint8)
    label[size // 4: size // 2, size // 4: size // 2, depth // 3: 2 * depth // 3] = 1
    pairs = np.asarray([(k, s) for k in range(depth - 1)
                        for s in np.intersect1d(np.unique(sv[:, :, k]), np.unique(sv[:, :, k + 1]))], np.int32)
    scans = {str(i): SimpleNamespace(
        image=rng.uniform(-1, 1, (size, size, depth)).astype(np.float16), label=label, supervoxels=sv,
        sv_pairs=pairs) for i in range(n_scans)}
    return SimpleNamespace(spec=SPECS["abd-mri"], scan_ids=sorted(scans), load=scans.__getitem__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=5)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = synthetic_dataset(args.scans, args.size, args.depth)
    for which in ("none", "one", "both"):
        cfg = EpisodeConfig(shots=args.shots, augment_which=which, train_scan_ids=tuple(data.scan_ids))
        sampler = EpisodeSampler(data, cfg, device=args.device, progress=False)
        gen = torch.Generator(device=sampler.device).manual_seed(0)
        sampler.sample(args.batch, gen)  # warm-up
        if sampler.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            batch = sampler.sample(args.batch, gen)
        if sampler.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        print(f"augment={which:4s} device={args.device} batch={args.batch} K={args.shots} "
              f"size={args.size}: {args.batch * args.steps / dt:8.1f} episodes/s "
              f"({1000 * dt / args.steps:.1f} ms/batch, query {tuple(batch['query_images'].shape)})")


if __name__ == "__main__":
    main()
