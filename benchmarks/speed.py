"""Speed of SD-FSMIS: the straightforward path against the fast path, for inference and training.

    python benchmarks/speed.py --size sd15 --device cuda --json speed.json   # SD-1.5-sized UNet, random weights
    python benchmarks/speed.py --size compact --device cpu                   # compact model, random weights
    python benchmarks/speed.py --model src/sdfsmis/assets/model --device cpu  # a trained model (the bundled one)

Inference (a volume of ``--slices`` query slices in 3 chunks, one support slice per chunk, 256x256):
- straightforward: fp32 weights, bf16 autocast on GPU, eager; every query slice runs the joint
  [query; support] UNet batch and re-encodes its support (32 slices batched);
- fast: the support branch (latents, VTCT embedding, per-block support tokens) computed once per
  support slice and reused (``prepare_support`` / ``predict_with_support``), queries batched,
  bf16 weights, channels-last, SDPA attention, optional ``torch.compile``.
Reported: slices/s for the volume, single-slice latency (a query with its support already prepared,
and cold: support + query), peak GPU memory, and the agreement (Dice) of the two paths' masks.

Training (``--train``): one step on a support + query pair (batch 1), AdamW, clip 1.0;
straightforward (fp32 weights, autocast, foreach AdamW) against fast (frozen VAE / encoder in bf16,
fused AdamW, channels-last, optional compiled UNet). Random weights everywhere: speed only.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext

import torch


def build_model(size: str, device: str):
    from sdfsmis.models import BackboneConfig, ModelConfig, build
    from sdfsmis.models.backbones import random_sd_backbone

    if size in ("compact", "tiny"):
        return build(ModelConfig(method="sdfsmis", backbone=BackboneConfig(tier=size))).to(device)
    backbone = random_sd_backbone(device)
    return build(ModelConfig(method="sdfsmis", backbone=backbone.config), backbone).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def fake_volume(n: int, size: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = ((xx / 0.4) ** 2 + (yy / 0.3) ** 2 < 1).float()
    images = (0.6 * blob + 0.2 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)
    supports = images[[n // 6, n // 2, 5 * n // 6]]
    masks = blob.expand(3, 1, size, size).contiguous()
    return images.to(device), supports.to(device), masks.to(device)


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def inference(model, args) -> dict:
    dev, n = args.device, args.slices
    size = model.image_size
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else nullcontext()
    images, supports, masks = fake_volume(n, size, dev)
    chunks = torch.arange(n).tensor_split(3)
    out: dict = {}

    # straightforward: joint batch, support re-encoded with every query slice
    model.eval()

    @torch.no_grad()
    def straight():
        preds = []
        for c, idx in enumerate(chunks):
            for b in idx.split(32):
                s = supports[c : c + 1, None].expand(len(b), 1, 1, size, size)
                m = masks[c : c + 1, None].expand(len(b), 1, 1, size, size)
                with amp:
                    preds.append(model.segment(images[b], s, m))
        return torch.cat(preds)

    reset_peak(dev)
    t = timed(straight, dev, args.repeat, warmup=1)
    ref = straight()
    out["straightforward"] = {"volume_slices_per_s": n / min(t), "peak_mb": peak_mb(dev)}
    t1 = timed(lambda: straight_one(model, images, supports, masks, amp), dev, args.repeat * 3)
    out["straightforward"]["single_slice_ms"] = 1000 * statistics.median(t1)

    # fast: support cached once per chunk, queries batched, bf16 weights, channels-last, compile
    fast = copy.deepcopy(model)
    if dev.startswith("cuda"):
        fast = fast.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    compiled = False
    if args.compile:
        try:
            fast.compile_modules(args.compile_mode)
            compiled = True
        except Exception as err:  # noqa: BLE001 - report and go on eagerly
            out["compile_error"] = repr(err)

    @torch.no_grad()
    def fast_run():
        preds = []
        with amp:
            for c, idx in enumerate(chunks):
                cache = fast.prepare_support(supports[c : c + 1], masks[c : c + 1])
                for b in idx.split(args.batch):
                    preds.append(fast.threshold(fast.predict_with_support(images[b], cache)))
        return torch.cat(preds)

    reset_peak(dev)
    t0 = time.perf_counter()
    got = fast_run()  # includes compilation when compiling
    sync(dev)
    out["fast_first_call_s"] = time.perf_counter() - t0
    t = timed(fast_run, dev, args.repeat, warmup=1)
    got = fast_run()
    out["fast"] = {"volume_slices_per_s": n / min(t), "peak_mb": peak_mb(dev), "compiled": compiled,
                   "batch": args.batch}
    with torch.no_grad(), amp:
        cache = fast.prepare_support(supports[:1], masks[:1])
        one = lambda: fast.threshold(fast.predict_with_support(images[:1], cache))  # noqa: E731
        out["fast"]["single_slice_ms"] = 1000 * statistics.median(timed(one, dev, args.repeat * 3, warmup=3))
        cold = lambda: fast.threshold(fast.predict_with_support(images[:1], fast.prepare_support(supports[:1], masks[:1])))  # noqa: E731
        out["fast"]["single_slice_cold_ms"] = 1000 * statistics.median(timed(cold, dev, args.repeat * 3, warmup=3))
    inter = (got * ref).sum().item()
    out["agreement_dice"] = 2 * inter / max(got.sum().item() + ref.sum().item(), 1)
    return out


@torch.no_grad()
def straight_one(model, images, supports, masks, amp):
    with amp:
        return model.segment(images[:1], supports[:1, None], masks[:1, None])


def train_step_times(model, args, fast: bool) -> dict:
    dev = args.device
    size = model.image_size
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.startswith("cuda") else nullcontext()
    m = copy.deepcopy(model).train()
    if fast and dev.startswith("cuda"):
        m.frozen_modules_to(torch.bfloat16)
        m = m.to(memory_format=torch.channels_last)
        if args.compile:
            m.unet = torch.compile(m.unet, mode="default")  # the UNet alone: the frozen parts run once
    params = [p for p in m.parameters() if p.requires_grad]
    opt_kw = {"fused": True} if (fast and dev.startswith("cuda")) else {}
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **opt_kw)
    images, supports, masks = fake_volume(2, size, dev)
    batch = {"query_images": images[:1], "query_masks": masks[:1], "support_images": supports[:1, None],
             "support_masks": masks[:1, None]}

    def step():
        with amp:
            loss = m.training_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(dev)
    t = timed(step, dev, args.repeat * 3, warmup=3)
    res = {"step_ms": 1000 * statistics.median(t), "peak_mb": peak_mb(dev)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["sd15", "compact", "tiny"], default="compact")
    ap.add_argument("--model", default=None, help="a saved model directory (instead of --size)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slices", type=int, default=96, help="query slices in the volume")
    ap.add_argument("--batch", type=int, default=64, help="query batch of the fast path")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE (fast path)")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--train", action="store_true", help="also time training steps")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    if args.model:
        from sdfsmis.models import load_pretrained

        model = load_pretrained(args.model, device=args.device)
    else:
        model = build_model(args.size, args.device)
    res: dict = {"size": args.model or args.size, "image_size": model.image_size, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                 else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
                 "unet_params_m": sum(p.numel() for p in model.unet.parameters()) / 1e6,
                 "build_s": time.perf_counter() - t0}
    print(json.dumps(res), flush=True)

    def emit(key, value):
        res[key] = value
        print(json.dumps({key: value}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)

    if args.train:
        emit("train_straightforward", train_step_times(model, args, fast=False))
        emit("train_fast", train_step_times(model, args, fast=True))
    if not args.no_inference:
        emit("inference", inference(model, args))


if __name__ == "__main__":
    main()
