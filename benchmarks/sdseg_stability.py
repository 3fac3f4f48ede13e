"""SDSeg's stability (its paper's Table 5): the same query slices predicted from several noise seeds.

    python benchmarks/sdseg_stability.py prepared/abd-ct \
        --model 'runs/cpu-sdseg-ct-f0/sdseg-abd-ct-{organ}-f{fold}/model' --fold 0 --seeds 0 1 2 3 4

SDSeg's one-step inference starts from Gaussian noise (``ModelConfig.noise_seed``), so its masks
depend on the seed. For every organ, the query scans of the fold (the protocol's: every scan of the
fold but the support) and their slices that hold the organ are predicted once per seed, through the
same slice pipeline as ``sdfsmis evaluate``. Printed per organ:

- Dice (3-D, per query over the organ's slices, mean over queries) for every seed, and their mean,
  standard deviation and range: how much the reported Dice moves with the seed;
- pairwise PSNR / SSIM / MS-SSIM between the seeds' probability maps ("score") and thresholded masks
  ("seg") on the model's grid (``sdfsmis.models.sdseg.pairwise_similarity``), as in SDSeg's table.

``--json FILE`` writes the figures too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdfsmis.atomic import write_json
from sdfsmis.errors import InputError
from sdfsmis.evaluation.metrics import dice
from sdfsmis.evaluation.protocol import EvalScan, load_eval_scan, organ_slices, plan_folds, volume_slices
from sdfsmis.evaluation.report import open_prepared
from sdfsmis.inference.slices import SlicePipeline, binarise, common_grids
from sdfsmis.models.io import load_model
from sdfsmis.models.sdseg import pairwise_similarity


def organ_stability(model, scans: list[EvalScan], label_id: int, seeds: list[int],
                    batch_size: int, bar: tqdm) -> dict:
    """Dice per seed (mean over the query ``scans``) and the seeds' pairwise similarity, for one organ."""
    pipeline = SlicePipeline(model, batch_size=batch_size)
    dices = {s: [] for s in seeds}
    score_maps = {s: [] for s in seeds}
    for scan in scans:
        idx = organ_slices(scan.label, label_id)
        if not idx:
            bar.update(len(seeds))
            continue
        slices = volume_slices(scan.image, idx)
        spacing = scan.spacing[:2]
        grid = common_grids(slices.shape[1:], slices.shape[1:], pipeline.size, spacing, spacing)[1]
        x = grid.to_model(slices)
        truth = volume_slices(scan.label == label_id, idx).numpy() > 0
        for seed in seeds:
            model.config.noise_seed = seed
            with torch.inference_mode(), pipeline.autocast():
                prob = torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
            score_maps[seed].append(prob)
            dices[seed].append(dice(binarise(model, grid.from_model(prob)).numpy(), truth))
            bar.update(1)
    per_seed = [float(np.mean(dices[s])) * 100 for s in seeds]
    scores = [torch.cat(score_maps[s]) for s in seeds]
    return {
        "queries": len(dices[seeds[0]]),
        "slices": int(scores[0].shape[0]),
        "dice_per_seed": per_seed,
        "dice_mean": statistics.mean(per_seed),
        "dice_sd": statistics.stdev(per_seed),
        "dice_range": [min(per_seed), max(per_seed)],
        "score": pairwise_similarity(scores),
        "seg": pairwise_similarity([model.threshold(p) for p in scores]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared", type=Path, help="a prepared dataset folder")
    ap.add_argument("--model", required=True,
                    help="SDSeg model folder; '{organ}' and '{fold}' are filled in (one model per organ)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--organs", nargs="+", default=None, help="default: the dataset's evaluated organs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if len(set(args.seeds)) < 2:
        sys.exit("sdseg_stability.py: error: --seeds needs at least two different seeds")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prepared = open_prepared(args.prepared)
        organs, plan = plan_folds(prepared, [args.fold], "last", args.organs)
        queries = plan[args.fold]["queries"]
        models = {o: load_model(args.model.format(organ=o, fold=args.fold)) for o in organs}
    except InputError as err:
        sys.exit(f"sdseg_stability.py: error: {err}")
    t0 = time.time()
    scans = [load_eval_scan(prepared, q) for q in queries]  # read once, used by every organ
    results = {}
    with tqdm(total=len(organs) * len(queries) * len(args.seeds), desc="seeds x queries", unit="pass") as bar:
        for organ in organs:
            results[organ] = organ_stability(models[organ], scans, prepared.spec.label_id(organ),
                                             args.seeds, args.batch_size, bar)
    print(f"\n{args.prepared} fold {args.fold}, queries {queries}, seeds {args.seeds}, "
          f"{time.time() - t0:.0f} s, {torch.get_num_threads()} thread(s)\n")
    print("| organ | slices | Dice per seed | mean ± s.d. | score PSNR / SSIM / MS-SSIM | seg PSNR / SSIM / MS-SSIM |")
    print("|---|---:|---|---:|---:|---:|")
    for organ, r in results.items():
        sim = {k: " / ".join(f"{r[k][m]:.2f}" if m == "psnr" else f"{r[k][m]:.3f}" for m in ("psnr", "ssim", "ms_ssim"))
               for k in ("score", "seg")}
        print(f"| {organ} | {r['slices']} | {', '.join(f'{d:.2f}' for d in r['dice_per_seed'])} | "
              f"{r['dice_mean']:.2f} ± {r['dice_sd']:.2f} | {sim['score']} | {sim['seg']} |")
    means = [r["dice_mean"] for r in results.values()]
    print(f"\nmean Dice over organs: {statistics.mean(means):.2f}")
    if args.json:
        write_json(args.json, {"prepared": str(args.prepared), "fold": args.fold, "queries": queries,
                               "seeds": args.seeds, "organs": results})


if __name__ == "__main__":
    main()
