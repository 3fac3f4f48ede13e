"""Run a plan of trainings concurrently (several on one GPU), then evaluate each with the protocol.

    python scripts/run_experiments.py experiments/plan.json --out runs/exp --max-parallel 16

A plan is JSON::

    {"config": "experiments/recipe.json",                                 # optional: a config file
     "base": ["model.backbone.tier=compact", "batch_size=8", ...],        # overrides for every run
     "runs": [{"name": "sdfsmis-abd-mri-s1-f0",
               "overrides": ["data=[\\"prepared/abd-mri\\"]", "episodes.fold=0"],
               "evaluate": {"prepared": "prepared/abd-mri", "folds": [0]}}, ...]}

Each run trains with ``sdfsmis train [--config CONFIG] BASE... OVERRIDES...`` into ``OUT/NAME`` (its own process, log in ``OUT/NAME.log``),
then ``sdfsmis evaluate`` writes ``OUT/NAME/eval``. ``--only`` picks runs by name. Everything a run
writes (resolved config, CSV log, loss curve, model, per-case results) stays in its folder, and
``OUT/summary.md`` gathers the evaluation tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _run_all(jobs: list[tuple[str, list[str], Path]], max_parallel: int) -> dict[str, int]:
    """Run (name, command, log) jobs, at most ``max_parallel`` at once; returns exit codes."""
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < max_parallel:
            name, cmd, log = pending.pop(0)
            running[name] = _launch(cmd, log)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {proc.returncode}", flush=True)
                del running[name]
        time.sleep(1)
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=None, help="run names to run (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-parallel", type=int, default=8)
    ap.add_argument("--skip-train", action="store_true", help="only evaluate existing models")
    args = ap.parse_args()

    try:
        plan = json.loads(args.plan.read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"run_experiments.py: error: {args.plan}: cannot read the plan ({err})")
    if not isinstance(plan, dict) or "runs" not in plan:
        sys.exit(f"run_experiments.py: error: {args.plan}: not an experiment plan (no 'runs'): a training "
                 f"config is run with 'sdfsmis train --config {args.plan}'")
    runs = [r for r in plan["runs"] if args.only is None or r["name"] in args.only]
    sdfsmis = [sys.executable, "-m", "sdfsmis.cli", "-q"]
    t0 = time.time()
    train_codes: dict[str, int] = {}
    if not args.skip_train:
        config = ["--config", plan["config"]] if "config" in plan else []
        jobs = [(r["name"], sdfsmis + ["train", *config, *plan.get("base", []), *r.get("overrides", []),
                                       *args.extra, f"out_dir={args.out / r['name']}"],
                 args.out / f"{r['name']}.log")
                for r in runs]
        train_codes = _run_all(jobs, args.max_parallel)
    train_s = time.time() - t0
    jobs = []
    for r in runs:
        model_dir = args.out / r["name"] / "model"
        if train_codes.get(r["name"], 0) != 0 or not model_dir.is_dir() or "evaluate" not in r:
            continue
        ev = r["evaluate"]
        jobs.append((r["name"], sdfsmis + [
            "evaluate", ev["prepared"], "--method", str(model_dir), "--out", str(args.out / r["name"] / "eval"),
            "--folds", *map(str, ev.get("folds", [0, 1, 2, 3, 4])), "--device", args.device,
            *ev.get("args", [])], args.out / f"{r['name']}.eval.log"))
    eval_codes = _run_all(jobs, args.max_parallel)

    lines = [f"# Experiments ({args.plan.name})", "",
             f"training wall time {train_s:.0f} s, total {time.time() - t0:.0f} s", ""]
    for r in runs:
        table = args.out / r["name"] / "eval" / "table.md"
        lines += [f"## {r['name']}", f"train exit {train_codes.get(r['name'])}, eval exit {eval_codes.get(r['name'])}", ""]
        if table.is_file():
            lines += [table.read_text(), ""]
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    failed = {**{k: v for k, v in train_codes.items() if v}, **{k: v for k, v in eval_codes.items() if v}}
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
