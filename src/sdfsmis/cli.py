"""Command line: one subcommand per pipeline stage, each a thin layer over an importable function.

    sdfsmis prepare   SOURCE --dataset NAME --out DIR        (sdfsmis.data.prepare.prepare_dataset)
    sdfsmis evaluate  PREPARED --method paste|baseline|CKPT --out DIR (sdfsmis.evaluation.report.run_evaluation)
    sdfsmis table     SUMMARY.json ...                       (sdfsmis.evaluation.report.combine_summaries)
    sdfsmis train     --config FILE [key=value ...]          (sdfsmis.train.train)
    sdfsmis predict   --support-image S --support-mask M --query Q --out OUT  (sdfsmis.predict.predict)
    sdfsmis predict   --support-set SET.sdfset --query Q --out OUT  (sdfsmis.support_sets.predict_with_set)
    sdfsmis serve     [--host 127.0.0.1] [--port 8000] [--workspace DIR]  (sdfsmis.serve.serve)
    sdfsmis demo      [--out DIR]                            (sdfsmis.demo.run_demo)

Bad input ends with a one-line error naming the file and the problem, and exit status 2;
Ctrl-C ends with one line and exit status 130 (outputs are written to temporary names, so nothing
half-written is left).
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


def _use_all_cores() -> None:
    """Inference uses every core this process may run on, unless OMP_NUM_THREADS says otherwise."""
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else (os.cpu_count() or 1)))


def _device_name(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_predictor(method: str, device: str, batch_size: int, threshold: tuple[str, float] | None = None,
                   precision: str = "auto", backbone_path: str | None = None, image_encoder_path: str | None = None):
    """``paste`` (the position-only control), ``baseline`` (training-free TAESD prototype matching),
    ``bundled`` (the packaged model) or a trained model directory, whose threshold rule becomes
    ``threshold`` (rule, value) if given. ``backbone_path`` / ``image_encoder_path`` override a
    model's saved SD / DINOv2 paths."""
    if method == "paste":
        from .evaluation.position import PastePredictor

        return PastePredictor()
    if method == "baseline":
        if threshold is not None:
            raise InputError(None, "--threshold applies to trained models; the baseline has no threshold rule")
        from .baseline import PrototypeBaseline

        return PrototypeBaseline(device=_device_name(device))
    from .models.io import load_model
    from .models.predictor import ModelPredictor

    device = _device_name(device)
    model = load_model(method, device, backbone_path=backbone_path, image_encoder_path=image_encoder_path,
                       threshold=threshold, option="--method", also=("paste", "baseline"))
    return ModelPredictor(model, device=device, batch_size=batch_size, precision=precision)


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation.report import open_prepared, run_evaluation
    from .models.io import parse_threshold

    threshold = None if args.threshold is None else parse_threshold(args.threshold)

    _use_all_cores()

    def load(method: str):
        return make_predictor(method, args.device, args.batch_size, threshold, args.precision,
                              args.backbone_path, args.image_encoder_path)

    if "{organ}" in args.method:  # one model per organ (and per fold when '{fold}' is there too)
        organs = args.organs or open_prepared(args.prepared).spec.eval_organs
        predictor = {(f, o): load(args.method.format(fold=f, organ=o)) for f in args.folds for o in organs}
    elif "{fold}" in args.method:  # one model per fold (cross-validation)
        predictor = {f: load(args.method.format(fold=f)) for f in args.folds}
    else:
        predictor = load(args.method)
    if args.query_shift:
        from .evaluation.position import ShiftedQueries

        def shifted(p):
            return ShiftedQueries(p, *args.query_shift)
        predictor = ({k: shifted(p) for k, p in predictor.items()} if isinstance(predictor, dict)
                     else shifted(predictor))
    for p in predictor.values() if isinstance(predictor, dict) else [predictor]:
        p.name = args.label or p.name
    summary = run_evaluation(
        predictor, Path(args.prepared), Path(args.out), folds=tuple(args.folds), support=args.support,
        shots=args.shots, n_chunks=args.chunks, progress=not args.quiet, setting=args.setting,
        cleanup=args.cleanup, organs=args.organs,
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

    _use_all_cores()
    if args.support_set is not None:
        if args.support_image or args.support_mask:
            raise InputError(args.support_set, "give either --support-set or --support-image/--support-mask")
        from .support_sets import predict_with_set

        run = lambda q, o, **kw: predict_with_set(Path(args.support_set), q, o, **kw)  # noqa: E731
    elif not (args.support_image and args.support_mask):
        raise InputError(None, "give --support-image and --support-mask, or --support-set FILE")
    else:
        run = lambda q, o, **kw: predict(Path(args.support_image), Path(args.support_mask), q, o, **kw)  # noqa: E731
    result = run(
        Path(args.query), Path(args.out),
        labels=args.labels, shots=args.shots, checkpoint=args.checkpoint, device=args.device,
        batch_size=args.batch_size, overlay=not args.no_overlay, progress=not args.quiet,
        z_margin=None if args.all_slices else args.z_margin, min_area_mm2=args.min_area, chunks=args.chunks,
        axis=args.axis, modality=args.modality, window=args.window, cleanup=not args.no_cleanup,
        precision=args.precision, names=parse_names(args.names),
        backbone_path=args.backbone_path, image_encoder_path=args.image_encoder_path,
    )
    print(result)
    empty = [str(o["label"]) for o in result.summary["organs"] if not o.get("voxels")]
    if empty:
        print(f"sdfsmis predict: WARNING: nothing marked for label(s) {', '.join(empty)}: the model found no "
              "such organ in the query (check the model, the support slices, or --all-slices)", file=sys.stderr)


def parse_names(items: list[str] | None):
    """``--names 1=liver 2=kidney_r`` -> {1: "liver", 2: "kidney_r"}; one item without ``=`` is a JSON
    label-map file; None stays None."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    out = {}
    for item in items:
        key, sep, name = item.partition("=")
        if not sep or not name or not key.strip().isdigit():
            raise InputError(None, f"--names {item!r}: expected ID=NAME (e.g. 1=liver) or one JSON label-map file")
        out[int(key)] = name
    return out


def _serve(args: argparse.Namespace) -> None:
    from .serve import serve

    serve(host=args.host, port=args.port, workspace=args.workspace, token=args.token,
          max_upload_mb=args.max_upload_mb, checkpoint=args.checkpoint, device=args.device,
          batch_size=args.batch_size)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    _use_all_cores()
    run_demo(Path(args.out), checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
             progress=not args.quiet, precision=args.precision, cleanup=not args.no_cleanup,
             shots=args.shots, chunks=args.chunks)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; descriptions and examples kept as written."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdfsmis")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


PREDICT_HELP = """Segment the organs of an annotated support scan in another scan (NIfTI in, NIfTI out).

Each label of the support mask is segmented in the query, slice by slice along each scan's acquisition
axis; CT is windowed like the training data; per organ the largest 3-D component is kept.
Writes OUT.nii.gz (labels in the query's geometry), OUT.png (overlay) and OUT.json (summary).

example:
  sdfsmis predict --support-image s.nii.gz --support-mask s_labels.nii.gz \\
                  --query q.nii.gz --out q_labels.nii.gz --names 1=liver 2=kidney_r
"""
DEMO_HELP = """Segment a bundled CHAOS MRI scan (patient 15) from another annotated one (patient 39) with the
bundled model, write the prediction, overlay (prediction beside the manual labels) and summary, and
print each organ's Dice.

example:
  sdfsmis demo --out sdfsmis-demo
"""
EVALUATE_HELP = """Run the few-shot evaluation protocol (Dice, HD95, ASSD) on a prepared dataset.

example:
  sdfsmis evaluate prepared/abd-mri --method baseline --folds 0 --out results/baseline-f0
"""


def _inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shots", type=int, default=1, help="support slices per chunk")
    p.add_argument("--chunks", type=int, default=3, help="chunks of each organ's slices (protocol: 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=16, help="query slices per model call")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto/bf16: bfloat16 autocast (CPU and CUDA); fp32: full precision")


def _add_path_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone-path", default=None,
                   help="SD folder / single file / hub id replacing the model's saved backbone.path")
    p.add_argument("--image-encoder-path", default=None,
                   help="DINOv2 folder / hub id replacing the model's saved backbone.image_encoder")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    parser = argparse.ArgumentParser(prog="sdfsmis", description=__doc__.split("\n\n")[0], parents=[common],
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, parents=[common],
                              formatter_class=_Help)

    p = add("prepare", "normalise volumes, index slices, compute supervoxels")
    p.add_argument("source", help="folder of image_<id>.nii.gz / label_<id>.nii.gz pairs")
    p.add_argument("--dataset", required=True, help="abd-mri, abd-ct, card-mri, or a dataset .json")
    p.add_argument("--out", required=True, help="output folder (written once; re-runs skip done scans)")
    p.add_argument("--supervoxels", choices=["3d", "2d"], default="3d", help="3-D supervoxels (ADNet) or 2-D superpixels")
    p.add_argument("--min-size", type=int, default=None, help="Felzenszwalb min_size (default: the dataset's)")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--overwrite", action="store_true", help="redo every scan")
    p.set_defaults(func=_prepare)

    e = add("evaluate", "run the few-shot evaluation protocol (Dice, HD95, ASSD)", EVALUATE_HELP)
    e.add_argument("prepared", help="a folder written by 'sdfsmis prepare'")
    e.add_argument("--method", default="baseline",
                   help="'paste' (position-only control: the support mask copied onto the query), "
                        "'baseline', 'bundled' (the packaged model) or a trained model directory; '{fold}' in it is replaced by each fold "
                        "(a model trained per fold), '{organ}' by each evaluated organ (a model per organ)")
    e.add_argument("--out", required=True, help="folder for per-case CSV/JSON and the Markdown table")
    e.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    e.add_argument("--organs", nargs="+", default=None,
                   help="organ names of the dataset's labels to evaluate (default: its eval_organs)")
    e.add_argument("--support", default="last", help="support scan of each fold: last | index:N | id:X")
    _inference_flags(e)
    e.add_argument("--label", default=None, help="method name in the tables (default: the predictor's)")
    e.add_argument("--setting", default="", help="setting label in the tables, e.g. 1 or 2")
    e.add_argument("--threshold", default=None,
                   help="replace the models' threshold rule: absolute:V (decoded mask > V in [-1, 1]; "
                        "SD-FSMIS default absolute:0) or relative:F (> F x the slice's max; DiffewS relative:0.25)")
    e.add_argument("--query-shift", type=int, nargs=2, metavar=("DX", "DY"), default=None,
                   help="position probe: move every query slice DX px right and DY px down before predicting "
                        "(the masks are moved back): appearance matchers keep their Dice, position copiers lose it")
    e.add_argument("--cleanup", action="store_true",
                   help="keep each case's largest 3-D connected component and fill holes (as predict does)")
    _add_path_overrides(e)
    e.set_defaults(func=_evaluate)

    tb = add("table", "one Markdown table from several evaluation summary.json files")
    tb.add_argument("summaries", nargs="+", help="summary.json files written by 'sdfsmis evaluate'")
    tb.set_defaults(func=_table)

    t = add("train", "train SD-FSMIS, DiffewS or SDSeg")
    t.add_argument("--config", default=None, help="JSON or TOML training config")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. iterations=2000 model.method=diffews "
                                                   "resume=runs/x/checkpoints/step_0001000")
    t.set_defaults(func=_train)

    r = add("predict", "segment the support's organs in a query scan (NIfTI in, NIfTI out)", PREDICT_HELP)
    r.add_argument("--support-image", default=None, help="the annotated scan (NIfTI)")
    r.add_argument("--support-mask", default=None, help="its label volume; every label present is segmented")
    r.add_argument("--support-set", default=None, help="a support set file (.sdfset, saved by 'sdfsmis serve') "
                                                       "instead of --support-image/--support-mask")
    r.add_argument("--query", required=True, help="the scan to segment (NIfTI)")
    r.add_argument("--out", required=True, help="output label volume (.nii.gz), in the query's geometry")
    r.add_argument("--labels", type=int, nargs="+", default=None, help="only these label ids (default: all)")
    r.add_argument("--names", nargs="+", default=None, metavar="ID=NAME",
                   help="organ names for the overlay and summary: 1=liver 2=kidney_r ... or one JSON label-map "
                        "file (default: CHAOS / Synapse names of known ids)")
    r.add_argument("--checkpoint", default=None,
                   help="trained model directory or 'bundled' (default: the bundled model)")
    _inference_flags(r)
    r.add_argument("--axis", choices=["auto", "axial", "coronal", "sagittal"], default="auto",
                   help="slice axis: auto = each scan's acquisition (thickest-spacing) axis")
    r.add_argument("--modality", choices=["auto", "ct", "mr"], default="auto",
                   help="auto: CT recognised from its HU values; ct scans are windowed (--window)")
    r.add_argument("--window", type=float, nargs=2, default=[-125.0, 275.0], metavar=("LO", "HI"),
                   help="CT window in HU applied before normalisation")
    r.add_argument("--z-margin", type=float, default=0.2,
                   help="widening of the organ's mapped z-range, as a fraction of the query's body extent")
    r.add_argument("--all-slices", action="store_true", help="consider every query slice (no z-range)")
    r.add_argument("--min-area", type=float, default=50.0, help="smallest kept area of a predicted slice, mm^2")
    r.add_argument("--no-cleanup", action="store_true",
                   help="keep the raw prediction (no largest-component / hole-filling clean-up)")
    r.add_argument("--no-overlay", action="store_true", help="skip the PNG montage")
    _add_path_overrides(r)
    r.set_defaults(func=_predict)

    v = add("serve", "local web app: annotate a slice, segment the volume, correct, reuse")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--workspace", default="sdfsmis-workspace", help="folder of scans, results and support sets")
    v.add_argument("--token", default=None, help="access token every request must carry (use when binding "
                                                 "another address than 127.0.0.1)")
    v.add_argument("--max-upload-mb", type=float, default=512.0, help="largest accepted upload")
    v.add_argument("--checkpoint", default=None, help="trained model directory (default: the bundled model)")
    v.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda ...")
    v.add_argument("--batch-size", type=int, default=16)
    v.set_defaults(func=_serve)

    d = add("demo", "segment a bundled CHAOS MRI scan from another one and report Dice", DEMO_HELP)
    d.add_argument("--out", default="sdfsmis-demo", help="output folder")
    d.add_argument("--checkpoint", default=None, help="trained model directory (default: the bundled model)")
    _inference_flags(d)
    d.add_argument("--no-cleanup", action="store_true", help="score the raw prediction (no 3-D clean-up)")
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    try:
        args.func(args)
    except InputError as err:
        print(f"sdfsmis {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdfsmis {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
