"""Speed of ``sdfsmis demo``'s prediction (CHAOS 39 -> 15, 4 organs, 104 slice passes), fp32 against
bf16 autocast, with the time of each stage.

    python benchmarks/predict_speed.py                      # bundled model, CPU, fp32 then bf16
    python benchmarks/predict_speed.py --precision bf16 --repeat 3 --json speed.json

Stages: ``predict``'s own timing (load, intensities, model_load, model, cleanup, write) and, inside
``model``, the model's steps: ``encode`` (query slices -> latents, once per slice), ``support``
(``prepare_support``, once per chunk), ``unet`` (``predict_latents_with_support``), ``decode``
(``probabilities``: latent -> mask). Prints the machine's load average with the figures: timings
taken while other jobs run are not the tool's quiet-machine speed. Beside the wall-clock times it
prints the process's CPU seconds (all threads), total and per model step: on a loaded machine the
wall time grows with the other jobs, the CPU time much less (with ``--threads 1`` it approximates the
single-core wall time of a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

STEPS = {"encode_images": "encode", "prepare_support": "support", "predict_latents_with_support": "unet",
         "probabilities": "decode"}


def _timed(model, totals, cpu):
    for name, stage in STEPS.items():
        fn = getattr(model, name)

        def wrapper(*a, _fn=fn, _stage=stage, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            out = _fn(*a, **k)
            totals[_stage] += time.perf_counter() - t0
            cpu[_stage] += time.process_time() - c0
            return out

        setattr(model, name, wrapper)
    return model


def run(precision: str, device: str, checkpoint: str | None) -> dict:
    from sdfsmis import predict as P
    from sdfsmis.demo import demo_files

    totals: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    load = P.load_model
    P.load_model = lambda path, dev, **overrides: _timed(load(path, dev, **overrides), totals, cpu)
    files = demo_files()
    c0 = time.process_time()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            res = P.predict(files["support_image"], files["support_mask"], files["query"], Path(tmp) / "p.nii.gz",
                            checkpoint=checkpoint, device=device, precision=precision, progress=False)
    finally:
        P.load_model = load
    cpu_total = time.process_time() - c0
    s = res.summary
    return {"precision": precision, "device": s["device"], "threads": s["settings"]["threads"],
            "slices_processed": s["slices_processed"], "seconds": s["seconds"], "slices_per_s": s["slices_per_s"],
            "stages": s["timing"], "model_steps": {k: round(v, 3) for k, v in totals.items()},
            "cpu_seconds": round(cpu_total, 3), "model_steps_cpu": {k: round(v, 3) for k, v in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    rows = []
    for precision in args.precision:
        for _ in range(args.repeat):
            load_before = os.getloadavg()[0]
            row = run(precision, args.device, args.checkpoint)
            row["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            rows.append(row)
            model = " ".join(f"{k} {v:.2f}" for k, v in row["model_steps"].items())
            model_cpu = " ".join(f"{k} {v:.2f}" for k, v in row["model_steps_cpu"].items())
            stages = " ".join(f"{k} {v:.2f}" for k, v in row["stages"].items())
            print(f"{precision:5s} {row['device']} threads={row['threads']} total {row['seconds']:.2f} s "
                  f"({row['slices_processed']} slice passes, {row['slices_per_s']} slices/s) | stages: {stages} "
                  f"| model: {model} | CPU s: total {row['cpu_seconds']:.2f}, model: {model_cpu} | load avg {row['load_avg_1min'][0]} -> {row['load_avg_1min'][1]} "
                  f"on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
