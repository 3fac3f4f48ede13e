"""Training speed of finished runs, from the files ``sdfsmis train`` writes: one Markdown row per run.

    python benchmarks/train_runs.py runs/cpu-ct-s1/*/ [--json runs.json]

Per run: method, tier, image size, episodes per step, device, steps, wall time (all calls of
``train`` of a resumed run added up; model build, data loading and encoding included), median step
time and iterations/s (over the logged windows, so encoding and checkpoints are left out), and peak
memory (the CUDA allocator's peak on a GPU, the process's peak resident set on a CPU). From
``config.json``, ``log.csv`` and ``invocations.csv`` (see ``sdfsmis.train``; runs written before it
had that name hold the same rows in ``sittings.csv``, a run resumed across the rename in both); a
run written before either existed gets its steps and step time from ``log.csv`` and no wall time
or memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_speed(run: Path) -> dict:
    """The figures of one run folder (module docstring); raises ``ValueError`` if it is no run."""
    if not (run / "config.json").is_file() or not (run / "log.csv").is_file():
        raise ValueError(f"{run}: not a training run folder (config.json and log.csv expected)")
    cfg = json.loads((run / "config.json").read_text())
    calls = _rows(run / "sittings.csv") + _rows(run / "invocations.csv")  # the earlier name first
    log = _rows(run / "log.csv")
    window_s = [float(r["sec_per_step"]) for r in log]
    median = statistics.median(window_s) if window_s else float("nan")
    episodes = cfg["batch_size"] * cfg.get("gradient_accumulation_steps", 1)
    return {
        "run": run.name, "method": cfg["model"]["method"], "tier": cfg["model"]["backbone"]["tier"],
        "image_size": cfg["episodes"]["image_size"], "episodes_per_step": episodes,
        "device": calls[-1]["device"] if calls else None,
        "steps": int(log[-1]["step"]) if log else 0,
        "wall_s": sum(float(s["wall_s"]) for s in calls) if calls else None,
        "median_step_s": median, "iterations_per_s": 1 / median,
        "peak_memory_mib": max(float(s["peak_memory_mib"]) for s in calls) if calls else None,
        "memory": calls[-1]["memory"] if calls else None,
    }


def markdown(rows: list[dict]) -> str:
    def fmt(v, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = ["| run | method | tier | px | episodes/step | device | steps | wall time (min) | median step (s) "
             "| iterations/s | peak memory (MiB) |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        memory = fmt(r["peak_memory_mib"], ".0f") + ("" if r["memory"] is None else f" ({r['memory']})")
        lines.append(f"| {r['run']} | {r['method']} | {r['tier']} | {r['image_size']} | {r['episodes_per_step']} "
                     f"| {r['device'] or '–'} | {r['steps']} | {fmt(None if r['wall_s'] is None else r['wall_s'] / 60, '.1f')} "
                     f"| {r['median_step_s']:.3f} | {r['iterations_per_s']:.2f} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (the out_dir of 'sdfsmis train')")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    try:
        rows = [run_speed(run) for run in args.runs]
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
