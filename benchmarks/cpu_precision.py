"""fp32 against bf16 autocast on the CPU, stage by stage, for the compact SD-FSMIS model.

    python benchmarks/cpu_precision.py                         # the bundled model, 1 and 2 threads
    python benchmarks/cpu_precision.py --model MODEL_DIR --threads 2 --batch 32
    python benchmarks/cpu_precision.py --threads 1 --image-size 256     # the same weights at 256 px

Stages (real slices of the bundled CHAOS demo scan at the model's size):
- ``encode slices``: TAESD trunk -> latents + VTCT features of image slices (cache building);
- ``encode masks``: TAESD latents of binary masks (the training targets, cache building);
- ``train step``: forward + backward + AdamW on a batch of 8 cached episodes (the CPU training loop);
- ``predict``: ``predict_with_support`` on query slices with the support prepared once.
Each stage prints ms per item for fp32 and for ``torch.autocast("cpu", dtype=torch.bfloat16)``,
the speed-up, and how the outputs agree (relative error of latents; Dice of predicted masks).
``--image-size`` runs the model at another working size (its layers are convolutions and attention,
so the weights apply at any multiple of the VAE's downsampling, 8): what training or predicting at that size would cost.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext
from importlib.resources import files

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def timed(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def demo_slices(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and the liver mask of the demo query scan, ``[Z, 1, size, size]``."""
    from sdfsmis.data.intensity import normalise_image

    demo = files("sdfsmis") / "assets" / "demo"
    image = normalise_image(np.asarray(nib.load(str(demo / "query_image.nii.gz")).dataobj, np.float32))
    label = np.asarray(nib.load(str(demo / "query_label.nii.gz")).dataobj)
    img = torch.from_numpy(np.moveaxis(image, 2, 0)).float()[:, None]
    msk = torch.from_numpy(np.moveaxis(label == 1, 2, 0)).float()[:, None]
    keep = msk.flatten(1).sum(1) > 0
    img, msk = img[keep], msk[keep]
    return (F.interpolate(img, size=(size, size), mode="bilinear", antialias=True),
            F.interpolate(msk, size=(size, size), mode="nearest-exact"))


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32, help="slices or masks per encoder call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="working size in px (default: the model's)")
    args = parser.parse_args()

    from sdfsmis.models import load_pretrained

    path = args.model or str(files("sdfsmis") / "assets" / "model")
    model = load_pretrained(path, device="cpu").float().eval()
    if args.image_size:  # the backbone's rule: a whole number of latent pixels
        down = model.vae.downsample
        if args.image_size % down:
            parser.error(f"--image-size {args.image_size} is not a multiple of {down}")
        model.image_size, model.latent_size = args.image_size, args.image_size // down
    size = int(model.image_size)
    images, masks = demo_slices(size)
    n = min(args.batch, len(images))
    images, masks = images[:n], masks[:n]
    print(f"model {path} ({size} px), {n} slices of the demo query scan, torch {torch.__version__}")

    def contexts():
        return {"fp32": nullcontext(), "bf16": torch.autocast("cpu", dtype=torch.bfloat16)}

    def train_step(ctx):
        m = copy.deepcopy(model).train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)
        with torch.no_grad():
            z, feats = m.encode_images_and_features(images[:16])
            zm = m.encode_masks(masks[:16])
        batch = {"query_latents": z[:8], "query_mask_latents": zm[:8],
                 "support_latents": z[8:16, None], "support_mask_latents": zm[8:16, None],
                 "support_masks": masks[8:16, None]}
        if feats is not None:
            batch["support_features"] = feats[8:16, None]

        def step():
            with ctx():
                loss = m.training_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s)\n")
        print("| stage | fp32 ms/item | bf16 ms/item | speed-up | agreement |")
        print("|---|---:|---:|---:|---|")
        rows = {}
        for name, ctx_name in [(s, p) for s in ("encode slices", "encode masks", "train step", "predict")
                               for p in ("fp32", "bf16")]:
            ctx = lambda: contexts()[ctx_name]  # noqa: E731
            if name == "encode slices":
                def fn():
                    with torch.inference_mode(), ctx():
                        return model.encode_images_and_features(images)[0].float()
                per = n
            elif name == "encode masks":
                def fn():
                    with torch.inference_mode(), ctx():
                        return model.encode_masks(masks).float()
                per = n
            elif name == "train step":
                fn, per = train_step(ctx), 1
            else:
                def fn():
                    with torch.inference_mode(), ctx():
                        cache = model.prepare_support(images[n // 2: n // 2 + 1], masks[n // 2: n // 2 + 1])
                        return model.threshold(model.predict_with_support(images, cache).float())
                per = n
            seconds, out = timed(fn, args.repeat)
            rows[(name, ctx_name)] = (1000 * seconds / per, out)
        for name in ("encode slices", "encode masks", "train step", "predict"):
            (t32, o32), (t16, o16) = rows[(name, "fp32")], rows[(name, "bf16")]
            if name == "predict":
                agree = f"Dice {dice(o32, o16):.4f}"
            elif name == "train step":
                agree = "(loss values differ by rounding)"
            else:
                agree = f"rel. error {float((o16 - o32).norm() / o32.norm()):.4f}"
            print(f"| {name} | {t32:.1f} | {t16:.1f} | {t32 / t16:.2f}x | {agree} |")


if __name__ == "__main__":
    main()
