"""How well the frozen TAESD autoencoder reconstructs medical slices and organ masks.

    python benchmarks/vae_check.py --data DATA/abd-mri --slices 64

Reads ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` pairs, normalises each volume by the protocol
rule (z-score, clip to the 0.5 / 99.5 percentiles, map to [-1, 1]), draws ``--slices`` slices that
contain an evaluated organ (seeded, spread over the volumes), resizes them to ``--size`` (bilinear
images, nearest masks), and reports encode -> decode -> channel average against the input:
MSE and PSNR in the [-1, 1] range (data range 2), SSIM (scikit-image), and for the binary organ
masks (mapped to {-1, 1}) also the Dice after thresholding at 0. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from tqdm import tqdm

from sdfsmis.data.datasets import SPECS
from sdfsmis.errors import InputError
from sdfsmis.models import FrozenVAE, load_taesd


def normalise(volume: np.ndarray) -> np.ndarray:
    """Per-volume z-score, clipped to its 0.5 / 99.5 percentiles and mapped to [-1, 1]."""
    z = (volume - volume.mean()) / max(float(volume.std()), 1e-8)
    lo, hi = np.percentile(z, [0.5, 99.5])
    return (np.clip((z - lo) / max(hi - lo, 1e-8), 0, 1) * 2 - 1).astype(np.float32)


def find_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(id, image file, label file) for every ``image_<id>.nii.gz`` with a matching label."""
    if not folder.is_dir():
        raise InputError(folder, "dataset folder not found")
    pairs = []
    for image in sorted(folder.glob("image_*.nii.gz")):
        scan_id = re.sub(r"^image_|\.nii\.gz$", "", image.name)
        label = folder / f"label_{scan_id}.nii.gz"
        if label.is_file():
            pairs.append((scan_id, image, label))
    if not pairs:
        raise InputError(folder, "no image_<id>.nii.gz / label_<id>.nii.gz pairs")
    return pairs


def sample_slices(folder: Path, n_slices: int, organ_ids: list[int] | None, seed: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Seeded choice of ``n_slices`` slices (round-robin over volumes); returns images and masks.

    Each chosen slice gives one image and one binary mask per organ present on it.
    """
    rng = np.random.default_rng(seed)
    pairs = find_pairs(folder)
    order = rng.permutation(len(pairs))
    per_volume = -(-n_slices // len(pairs))
    images, masks = [], []
    for idx in order:
        if len(images) >= n_slices:
            break
        _, image_file, label_file = pairs[idx]
        volume = normalise(np.asarray(nib.load(image_file).dataobj, dtype=np.float32))
        label = np.asarray(nib.load(label_file).dataobj).astype(np.int64)
        ids = organ_ids or [int(v) for v in np.unique(label) if v > 0]
        candidates = [z for z in range(label.shape[2]) if np.isin(label[:, :, z], ids).any()]
        take = rng.choice(candidates, size=min(per_volume, len(candidates), n_slices - len(images)),
                          replace=False)
        for z in sorted(take.tolist()):
            images.append(volume[:, :, z])
            masks.extend((label[:, :, z] == c).astype(np.float32) for c in ids if (label[:, :, z] == c).any())
    return images, masks


def _resize(batch: np.ndarray, size: int, mode: str) -> torch.Tensor:
    t = torch.from_numpy(np.stack(batch))[:, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return t


def reconstruct(vae: FrozenVAE, x: torch.Tensor, batch: int, progress: bool, what: str) -> torch.Tensor:
    """Encode -> decode -> channel average, ``batch`` slices at a time. [N, 1, H, W] -> same."""
    out = []
    for i in tqdm(range(0, len(x), batch), desc=what, disable=not progress, file=sys.stderr):
        out.append(vae.decode_gray(vae.encode_gray(x[i:i + batch])))
    return torch.cat(out)


def metrics(target: torch.Tensor, recon: torch.Tensor, binary: bool) -> dict[str, np.ndarray]:
    """Per-slice MSE, PSNR (data range 2), SSIM and, for binary targets, Dice after threshold 0."""
    t, r = target[:, 0].numpy().astype(np.float64), recon[:, 0].numpy().astype(np.float64)
    mse = ((t - r) ** 2).mean(axis=(1, 2))
    out = {
        "mse": mse,
        "psnr": 10 * np.log10(4.0 / np.maximum(mse, 1e-12)),
        "ssim": np.array([structural_similarity(a, b, data_range=2.0) for a, b in zip(t, r)]),
    }
    if binary:
        pos, pred = t > 0, r > 0
        out["dice"] = 2 * (pos & pred).sum((1, 2)) / np.maximum(pos.sum((1, 2)) + pred.sum((1, 2)), 1)
    return out


def _fmt(values: np.ndarray | None, digits: int) -> str:
    return "–" if values is None else f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def markdown_table(rows: dict[str, dict[str, np.ndarray]]) -> str:
    lines = ["| input | n | MSE | PSNR (dB) | SSIM | Dice (threshold 0) |", "|---|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {len(m['mse'])} | {_fmt(m['mse'], 5)} | {_fmt(m['psnr'], 2)} | "
                     f"{_fmt(m['ssim'], 4)} | {_fmt(m.get('dice'), 4)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="folder of image_<id>.nii.gz / label_<id>.nii.gz")
    p.add_argument("--slices", type=int, default=64, help="number of slices (each gives its organ masks)")
    p.add_argument("--size", type=int, default=256, help="working size (a multiple of 8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--taesd", type=Path, default=None, help="TAESD folder (default: packaged weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    spec = SPECS.get(args.data.name)
    organ_ids = [spec.labels[o] for o in spec.eval_organs] if spec else None
    images, masks = sample_slices(args.data, args.slices, organ_ids, args.seed)
    vae = load_taesd(args.taesd)
    start = time.perf_counter()
    img = _resize(images, args.size, "bilinear")
    msk = _resize(masks, args.size, "nearest") * 2 - 1
    rows = {
        "images": metrics(img, reconstruct(vae, img, args.batch, not args.no_progress, "images"), False),
        "organ masks": metrics(msk, reconstruct(vae, msk, args.batch, not args.no_progress, "masks"), True),
    }
    seconds = time.perf_counter() - start
    organs = ", ".join(spec.eval_organs) if spec else "all labels"
    print(f"TAESD ({vae.kind}) encode -> decode -> channel average on {args.data.name}: {len(images)} slices "
          f"at {args.size}x{args.size}, masks of {organs}; values in [-1, 1]; seed {args.seed}; "
          f"{seconds:.1f} s for {len(img) + len(msk)} round trips\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
