"""Run a plan of trainings concurrently (several on one GPU), then evaluate each with the protocol.

    python scripts/run_experiments.py experiments/plans/cpu-abd-mri-s1.json --device cpu --max-parallel 4

A plan is a JSON file (``experiments/plans/``)::

    {"out": "runs/cpu-s1",                                   # where its runs go (required)
     "config": "experiments/configs/recipe.json",            # optional: the recipe, a config file
     "base": ["model.backbone.tier=compact", ...],           # overrides for every run
     "runs": [{"name": "sdfsmis-abd-mri-s1",                 # the run (or run family) name
               "folds": [0, 1, 2, 3, 4],                     # optional: one run per fold
               "overrides": ["data=[\\"prepared/abd-mri\\"]"],
               "evaluate": {"prepared": "prepared/abd-mri", "folds": [0], "args": []}}, ...]}

Fold expansion: a run with ``folds`` becomes one run per fold, named ``NAME-fFOLD``, with
``{fold}`` in its overrides replaced by FOLD (e.g. ``init_from=runs/x-f{fold}/model``, each fold
continuing its own model) and ``episodes.fold=FOLD`` after them (and, where it has ``evaluate``
without ``folds``, evaluated on that fold). Unknown keys and run names used twice are errors.

Each run trains with ``sdfsmis train [--config CONFIG] BASE... OVERRIDES...`` into ``OUT/NAME`` (its own
process, log in ``OUT/NAME.log``), then ``sdfsmis evaluate`` writes ``OUT/NAME/eval``. ``OUT`` is the
plan's ``out`` (``--out`` replaces it) and belongs to that plan: ``OUT/plan.json`` records the plan
file, its SHA-256 and the expanded runs, and a second plan pointed at the same folder is refused, so
two recipes can never write to the same run name. ``--only`` picks runs by (expanded) name;
``--list`` prints the expanded runs and exits. ``OUT/summary.md`` gathers the evaluation tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PLAN_KEYS = {"out", "config", "base", "runs", "description"}
RUN_KEYS = {"name", "folds", "overrides", "evaluate"}
EVAL_KEYS = {"prepared", "folds", "args"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PlanError(ValueError):
    """A malformed plan: the message names the file and the problem."""


@dataclass
class Run:
    """One training run of an expanded plan."""

    name: str
    overrides: list[str]
    evaluate: dict | None = None


@dataclass
class Plan:
    """A parsed plan: its file, output folder, recipe, base overrides and expanded runs."""

    path: Path
    out: Path
    config: str | None
    base: list[str]
    runs: list[Run] = field(default_factory=list)
    sha256: str = ""


def _strings(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{where}: expected a list of strings")
    return list(value)


def _folds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise PlanError(f"{where}: expected a non-empty list of fold numbers")
    return list(value)


def load_plan(path: str | Path) -> Plan:
    """Read, check and expand the plan at ``path`` (``PlanError`` on any problem)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlanError(f"{path}: cannot read the plan ({err})") from None
    if not isinstance(data, dict) or "runs" not in data:
        raise PlanError(f"{path}: not an experiment plan (no 'runs'): a training config is run with "
                        f"'sdfsmis train --config {path}'")
    if unknown := set(data) - PLAN_KEYS:
        raise PlanError(f"{path}: unknown plan key(s) {sorted(unknown)}; a plan has {sorted(PLAN_KEYS)}")
    if not isinstance(data.get("out"), str) or not data["out"]:
        raise PlanError(f"{path}: 'out' (the folder this plan's runs are written to) is required")
    if "config" in data and not isinstance(data["config"], str):
        raise PlanError(f"{path}: 'config' must be the path of a training config file")
    plan = Plan(path=path, out=Path(data["out"]), config=data.get("config"),
                base=_strings(data.get("base", []), f"{path}: base"),
                sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    if not isinstance(data["runs"], list) or not data["runs"]:
        raise PlanError(f"{path}: 'runs' must be a non-empty list")
    for i, entry in enumerate(data["runs"]):
        where = f"{path}: runs[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not NAME.fullmatch(entry["name"]):
            raise PlanError(f"{where}: needs a 'name' made of letters, digits, '.', '_' and '-'")
        if unknown := set(entry) - RUN_KEYS:
            raise PlanError(f"{where}: unknown run key(s) {sorted(unknown)}; a run has {sorted(RUN_KEYS)}")
        overrides = _strings(entry.get("overrides", []), f"{where}: overrides")
        evaluate = entry.get("evaluate")
        if evaluate is not None:
            if not isinstance(evaluate, dict) or "prepared" not in evaluate or set(evaluate) - EVAL_KEYS:
                raise PlanError(f"{where}: 'evaluate' takes 'prepared' and optionally 'folds', 'args'")
            if "folds" in evaluate:
                _folds(evaluate["folds"], f"{where}: evaluate.folds")
        if "folds" in entry:
            for fold in _folds(entry["folds"], f"{where}: folds"):
                ev = None if evaluate is None else {"folds": [fold], **evaluate}
                fold_overrides = [o.replace("{fold}", str(fold)) for o in overrides]
                plan.runs.append(Run(f"{entry['name']}-f{fold}", [*fold_overrides, f"episodes.fold={fold}"], ev))
        else:
            plan.runs.append(Run(entry["name"], overrides, evaluate))
    seen: set[str] = set()
    for run in plan.runs:
        if run.name in seen:
            raise PlanError(f"{path}: run name {run.name!r} is used twice (after fold expansion)")
        seen.add(run.name)
    return plan


def claim_output(plan: Plan, out: Path) -> None:
    """Record ``plan`` as the owner of ``out`` (``out/plan.json``); refuse a folder another plan owns."""
    record = out / "plan.json"
    if record.is_file():
        try:
            owner = json.loads(record.read_text())["plan"]
        except (OSError, ValueError, KeyError, TypeError):
            raise PlanError(f"{record}: unreadable record of the plan that owns {out}") from None
        if Path(owner).resolve() != plan.path.resolve():
            raise PlanError(f"{out} holds the runs of the plan {owner}: two plans never share an output "
                            f"folder; give this plan another 'out' (or --out)")
    out.mkdir(parents=True, exist_ok=True)
    body = {"plan": str(plan.path.resolve()), "sha256": plan.sha256, "config": plan.config,
            "base": plan.base, "runs": [vars(r) for r in plan.runs]}
    tmp = record.with_name(".plan.json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(record)


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
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the plan's 'out')")
    ap.add_argument("--only", nargs="*", default=None, help="run names to run (default: all)")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-parallel", type=int, default=8)
    ap.add_argument("--skip-train", action="store_true", help="only evaluate existing models")
    ap.add_argument("--list", action="store_true", help="print the expanded runs and exit")
    args = ap.parse_args()

    try:
        plan = load_plan(args.plan)
        out = args.out or plan.out
        if args.list:
            for r in plan.runs:
                print(out / r.name, *r.overrides)
            return
        unknown = set(args.only or ()) - {r.name for r in plan.runs}
        if unknown:
            raise PlanError(f"{args.plan}: no run(s) named {sorted(unknown)}")
        claim_output(plan, out)
    except PlanError as err:
        sys.exit(f"run_experiments.py: error: {err}")
    runs = [r for r in plan.runs if args.only is None or r.name in args.only]
    sdfsmis = [sys.executable, "-m", "sdfsmis.cli", "-q"]
    t0 = time.time()
    train_codes: dict[str, int] = {}
    if not args.skip_train:
        config = ["--config", plan.config] if plan.config else []
        jobs = [(r.name, sdfsmis + ["train", *config, *plan.base, *r.overrides, *args.extra,
                                    f"out_dir={out / r.name}"], out / f"{r.name}.log")
                for r in runs]
        train_codes = _run_all(jobs, args.max_parallel)
    train_s = time.time() - t0
    jobs = []
    for r in runs:
        model_dir = out / r.name / "model"
        if train_codes.get(r.name, 0) != 0 or not model_dir.is_dir() or not r.evaluate:
            continue
        ev = r.evaluate
        jobs.append((r.name, sdfsmis + [
            "evaluate", ev["prepared"], "--method", str(model_dir), "--out", str(out / r.name / "eval"),
            "--folds", *map(str, ev.get("folds", [0, 1, 2, 3, 4])), "--device", args.device,
            *ev.get("args", [])], out / f"{r.name}.eval.log"))
    eval_codes = _run_all(jobs, args.max_parallel)

    lines = [f"# Experiments ({args.plan.name})", "",
             f"training wall time {train_s:.0f} s, total {time.time() - t0:.0f} s", ""]
    for r in runs:
        table = out / r.name / "eval" / "table.md"
        lines += [f"## {r.name}", f"train exit {train_codes.get(r.name)}, eval exit {eval_codes.get(r.name)}", ""]
        if table.is_file():
            lines += [table.read_text(), ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    failed = {**{k: v for k, v in train_codes.items() if v}, **{k: v for k, v in eval_codes.items() if v}}
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
