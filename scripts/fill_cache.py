"""Fill a training config's on-disk encoding store before training (``cache_dir``, ``sdfsmis.latents``).

    python scripts/fill_cache.py --config experiments/configs/cpu-appearance-abd-mri-f0.json [key=value ...]

Encodes every training slice (and the intensity bank's copies, ``cache_bank``) and every mask an
episode of the config can draw, in batches on all the threads torch may use (``OMP_NUM_THREADS``),
in the precision of ``mixed_precision``, and writes them to ``cache_dir``. Runs started afterwards,
with one thread each side by side, read the store instead of encoding. Rerunning skips what is stored.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from sdfsmis.errors import InputError
from sdfsmis.models import build
from sdfsmis.train import build_sampler, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="training config (JSON or TOML)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for 'sdfsmis train'")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not (cfg.cache_latents and cfg.cache_dir):
            raise InputError(args.config, "needs cache_latents=true and a cache_dir")
        torch.manual_seed(cfg.seed)
        model = build(cfg.model)
        build_sampler(dataclasses.replace(cfg, cache_prefill=True), model=model)
    except InputError as err:
        print(f"fill_cache: error: {err}", file=sys.stderr)
        return 2
    print(f"store filled: {cfg.cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
