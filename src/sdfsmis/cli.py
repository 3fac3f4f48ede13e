"""Command line: one subcommand per pipeline stage, each a thin layer over an importable function.

    sdfsmis prepare   SOURCE --dataset NAME --out DIR        (sdfsmis.data.prepare.prepare_dataset)
    sdfsmis evaluate  PREPARED --method baseline|CKPT --out DIR  (sdfsmis.evaluation.report.run_evaluation)
    sdfsmis table     SUMMARY.json ...                       (sdfsmis.evaluation.report.combine_summaries)
    sdfsmis train     --config FILE [key=value ...]          (sdfsmis.train.train)
    sdfsmis predict   --support-image S --support-mask M --query Q --out OUT  (sdfsmis.predict.predict)
    sdfsmis demo      [--out DIR]                            (sdfsmis.demo.run_demo)

Bad input ends with a one-line error naming the file and the problem, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InputError


def _prepare(args: argparse.Namespace) -> None:
    from .data.prepare import prepare_dataset

    out = prepare_dataset(
        Path(args.source), args.dataset, Path(args.out), supervoxels=args.supervoxels,
        min_size=args.min_size, workers=args.workers, progress=not args.quiet, overwrite=args.overwrite,
    )
    print(f"prepared dataset written to {out}")


def parse_threshold(text: str) -> tuple[str, float]:
    """``RULE:VALUE`` (``absolute:-0.5``, ``relative:0.25``) -> (rule, value); InputError if malformed."""
    rule, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = None
    if rule not in ("absolute", "relative") or number is None:
        raise InputError(None, f"--threshold {text!r}: expected absolute:V (V in [-1, 1]) or relative:F")
    return rule, number


def make_predictor(method: str, device: str, batch_size: int, threshold: tuple[str, float] | None = None,
                   backbone_path: str | None = None, image_encoder_path: str | None = None):
    """``baseline`` (training-free TAESD prototype matching), ``bundled`` (the packaged model) or a
    trained model directory, whose threshold rule becomes ``threshold`` (rule, value) if given.
    ``backbone_path`` / ``image_encoder_path`` override a model's saved SD / DINOv2 paths."""
    if method == "baseline":
        if threshold is not None:
            raise InputError(None, "--threshold applies to trained models; the baseline has no threshold rule")
        from .baseline import PrototypeBaseline

        return PrototypeBaseline(device=device)
    from .models.io import load_pretrained
    from .models.predictor import ModelPredictor
    from .predict import DEFAULT_MODEL_DIR

    path = DEFAULT_MODEL_DIR if method == "bundled" else Path(method)
    if not (path / "config.json").is_file():
        raise InputError(path, "not a trained model directory (no config.json); use 'baseline', "
                               "'bundled' or a model dir")
    model = load_pretrained(path, device=device, backbone_path=backbone_path, image_encoder_path=image_encoder_path)
    if threshold is not None:
        model.config.threshold, model.config.threshold_value = threshold
    return ModelPredictor(model, device=device, batch_size=batch_size)


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation.report import open_prepared, run_evaluation

    threshold = None if args.threshold is None else parse_threshold(args.threshold)

    def load(method: str):
        return make_predictor(method, args.device, args.batch_size, threshold,
                              args.backbone_path, args.image_encoder_path)

    if "{organ}" in args.method:  # one model per organ (and per fold when '{fold}' is there too)
        organs = args.organs or open_prepared(args.prepared).spec.eval_organs
        predictor = {(f, o): load(args.method.format(fold=f, organ=o)) for f in args.folds for o in organs}
    elif "{fold}" in args.method:  # one model per fold (cross-validation)
        predictor = {f: load(args.method.format(fold=f)) for f in args.folds}
    else:
        predictor = load(args.method)
    for p in predictor.values() if isinstance(predictor, dict) else [predictor]:
        p.name = args.label or p.name
    summary = run_evaluation(
        predictor, Path(args.prepared), Path(args.out), folds=tuple(args.folds), support=args.support,
        shots=args.shots, n_chunks=args.chunks, progress=not args.quiet, setting=args.setting,
        organs=args.organs,
    )
    print(summary)
    for line in summary.warnings:
        print(f"sdfsmis evaluate: WARNING: {line}", file=sys.stderr)


def _table(args: argparse.Namespace) -> None:
    from .evaluation.report import combine_summaries

    print(combine_summaries(args.summaries))


def _console_log() -> None:
    """The package's INFO messages (resume, init_from, fresh optimizer, ...) on stderr."""
    import logging

    logger = logging.getLogger("sdfsmis")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("sdfsmis: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> None:
    from .train import load_config, train

    cfg = load_config(args.config, args.overrides)
    _console_log()
    out = train(cfg, progress=not args.quiet)
    print(f"trained model written to {out}")


def _predict(args: argparse.Namespace) -> None:
    from .predict import predict

    result = predict(
        Path(args.support_image), Path(args.support_mask), Path(args.query), Path(args.out),
        labels=args.labels, shots=args.shots, checkpoint=args.checkpoint, device=args.device,
        batch_size=args.batch_size, overlay=not args.no_overlay, progress=not args.quiet,
        z_margin=None if args.all_slices else args.z_margin, min_area_mm2=args.min_area, chunks=args.chunks,
        backbone_path=args.backbone_path, image_encoder_path=args.image_encoder_path,
    )
    print(result)
    empty = [str(o["label"]) for o in result.summary["organs"] if not o.get("voxels")]
    if empty:
        print(f"sdfsmis predict: WARNING: nothing marked for label(s) {', '.join(empty)}: the model found no "
              "such organ in the query (check the model, the support slices, or --all-slices)", file=sys.stderr)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
             progress=not args.quiet)


def _add_path_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone-path", default=None,
                   help="SD folder / single file / hub id replacing the model's saved backbone.path")
    p.add_argument("--image-encoder-path", default=None,
                   help="DINOv2 folder / hub id replacing the model's saved backbone.image_encoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfsmis", description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="normalise volumes, index slices, compute supervoxels")
    p.add_argument("source", help="folder of image_<id>.nii.gz / label_<id>.nii.gz pairs")
    p.add_argument("--dataset", required=True, help="abd-mri, abd-ct, card-mri, or a dataset .json")
    p.add_argument("--out", required=True, help="output folder (written once; re-runs skip done scans)")
    p.add_argument("--supervoxels", choices=["3d", "2d"], default="3d", help="3-D supervoxels (ADNet) or 2-D superpixels")
    p.add_argument("--min-size", type=int, default=None, help="Felzenszwalb min_size (default: the dataset's)")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--overwrite", action="store_true", help="redo every scan")
    p.set_defaults(func=_prepare)

    e = sub.add_parser("evaluate", help="run the few-shot evaluation protocol (Dice, HD95, ASSD)")
    e.add_argument("prepared", help="a folder written by 'sdfsmis prepare'")
    e.add_argument("--method", default="baseline",
                   help="'baseline', 'bundled' (the packaged model) or a trained model directory; '{fold}' in it is replaced by each fold "
                        "(a model trained per fold), '{organ}' by each evaluated organ (a model per organ)")
    e.add_argument("--out", required=True, help="folder for per-case CSV/JSON and the Markdown table")
    e.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    e.add_argument("--organs", nargs="+", default=None,
                   help="organ names of the dataset's labels to evaluate (default: its eval_organs)")
    e.add_argument("--support", default="last", help="support scan of each fold: last | index:N | id:X")
    e.add_argument("--shots", type=int, default=1, help="support slices per chunk")
    e.add_argument("--chunks", type=int, default=3, help="chunks of the organ's slices (protocol: 3)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--label", default=None, help="method name in the tables (default: the predictor's)")
    e.add_argument("--setting", default="", help="setting label in the tables, e.g. 1 or 2")
    e.add_argument("--threshold", default=None,
                   help="replace the models' threshold rule: absolute:V (decoded mask > V in [-1, 1]; "
                        "SD-FSMIS default absolute:0) or relative:F (> F x the slice's max; DiffewS relative:0.25)")
    _add_path_overrides(e)
    e.set_defaults(func=_evaluate)

    tb = sub.add_parser("table", help="one Markdown table from several evaluation summary.json files")
    tb.add_argument("summaries", nargs="+", help="summary.json files written by 'sdfsmis evaluate'")
    tb.set_defaults(func=_table)

    t = sub.add_parser("train", help="train SD-FSMIS, DiffewS or SDSeg")
    t.add_argument("--config", default=None, help="JSON or TOML training config")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. iterations=2000 model.method=diffews "
                                                   "resume=runs/x/checkpoints/step_0001000")
    t.set_defaults(func=_train)

    r = sub.add_parser("predict", help="segment the support's organs in a query scan (NIfTI in, NIfTI out)")
    r.add_argument("--support-image", required=True)
    r.add_argument("--support-mask", required=True, help="label volume; every label present is segmented")
    r.add_argument("--query", required=True)
    r.add_argument("--out", required=True, help="output label volume (.nii.gz), in the query's geometry")
    r.add_argument("--labels", type=int, nargs="+", default=None, help="only these label ids")
    r.add_argument("--shots", type=int, default=1, help="support slices per chunk")
    r.add_argument("--checkpoint", default=None,
                   help="trained model directory or 'bundled' (default: the bundled model)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--chunks", type=int, default=3, help="chunks of each organ's z-extent (protocol: 3)")
    r.add_argument("--z-margin", type=float, default=0.2,
                   help="widening of the organ's mapped z-range, as a fraction of the query's body extent")
    r.add_argument("--all-slices", action="store_true", help="consider every query slice (no z-range)")
    r.add_argument("--min-area", type=float, default=50.0, help="smallest kept area of a predicted slice, mm^2")
    r.add_argument("--no-overlay", action="store_true", help="skip the PNG montage")
    _add_path_overrides(r)
    r.set_defaults(func=_predict)

    d = sub.add_parser("demo", help="segment a bundled CHAOS MRI scan from another one and report Dice")
    d.add_argument("--out", default="sdfsmis-demo", help="output folder")
    d.add_argument("--checkpoint", default=None, help="trained model directory (default: the bundled model)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--batch-size", type=int, default=16)
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as err:
        print(f"sdfsmis {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
