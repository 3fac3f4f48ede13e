"""Copy a trained model into the package as the bundled default (float16 weights, <= 25 MB).

    python scripts/ship_model.py runs/cpu-abd-mri-f0 --note "how it was trained, measured results"

Reads ``RUN/model`` (written by ``sdfsmis train``), writes ``src/sdfsmis/assets/model/`` with
``model.safetensors`` (float16; loading casts back to float32), ``config.json`` (with the threshold
rule of ``--threshold`` if given, as ``sdfsmis evaluate --threshold`` takes it),
``train_config.json`` and a ``README.md`` holding the training command, the config and ``--note``.
The folder is built beside the target and renamed, so a failure leaves the old model in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from sdfsmis import atomic
from sdfsmis.errors import InputError
from sdfsmis.models.io import WEIGHTS_NAME, load_model, parse_threshold, save_pretrained

TARGET = Path(__file__).resolve().parents[1] / "src" / "sdfsmis" / "assets" / "model"
MAX_BYTES = 25 * 1024 * 1024


def _below_cwd(path: str) -> str:
    """``path`` relative to the current folder (the repository) when it lies below it, so that the
    shipped config names the same folders on every machine; otherwise unchanged."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a training run folder (with model/ and config.json)")
    ap.add_argument("--note", default="", help="text for the model's README (results, hardware)")
    ap.add_argument("--command", default=None, help="the training command (default: from the run's config)")
    ap.add_argument("--target", type=Path, default=TARGET, help="where the bundled model goes (default: the package's)")
    ap.add_argument("--threshold", default=None, help="RULE:VALUE replacing the model's threshold rule, e.g. absolute:-0.75")
    args = ap.parse_args()
    target = args.target
    try:
        threshold_rule = None if args.threshold is None else parse_threshold(args.threshold)
    except InputError as err:
        sys.exit(str(err))

    src = args.run / "model"
    try:
        model = load_model(src, threshold=threshold_rule, option="RUN")
    except InputError as err:
        sys.exit(str(err))
    tmp = target.with_name(f".{target.name}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, dtype=torch.float16)
    size = (tmp / WEIGHTS_NAME).stat().st_size
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        sys.exit(f"{src}: {size / 2**20:.1f} MiB of weights, more than the 25 MiB a bundled model may have")
    train_cfg = json.loads((args.run / "config.json").read_text())
    train_cfg["data"] = [_below_cwd(d) for d in train_cfg["data"]]
    for key in ("out_dir", "cache_dir", "init_from"):
        if train_cfg.get(key):  # "bundled" (init_from) is not a path below the folder: kept as it is
            train_cfg[key] = _below_cwd(train_cfg[key])
    (tmp / "train_config.json").write_text(json.dumps(train_cfg, indent=1) + "\n")
    threshold = f" --threshold {args.threshold}" if args.threshold else ""
    command = args.command or f"sdfsmis train --config {args.run / 'config.json'}"
    (tmp / "README.md").write_text(
        "# Bundled default model\n\n"
        f"Made by `python scripts/ship_model.py {args.run}{threshold}` from a run of\n\n```bash\n{command}\n```\n\n"
        f"Weights: float16 ({size / 2**20:.1f} MiB); the training config is `train_config.json`.\n\n"
        f"{args.note}\n")
    atomic.replace_dir(tmp, target)
    print(f"bundled model written to {target} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
