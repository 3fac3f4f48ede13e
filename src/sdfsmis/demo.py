"""The bundled demo: segment the organs of one CHAOS T2 MRI scan from another one, and score it.

Two CHAOS scans ship in ``sdfsmis/assets/demo/`` (CC BY-SA 4.0, see ``ATTRIBUTION.md`` there): patient
39 is the support (image + its liver / kidney / spleen labels), patient 15 the query. ``run_demo``
runs :func:`sdfsmis.predict.predict` on them, writes its NIfTI / PNG / JSON into ``out_dir`` and
prints the 3-D Dice of each organ against the query's manual labels (over the whole volume,
unlike the evaluation protocol, which scores only the slices that hold the organ).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import atomic
from .errors import InputError

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_FILES = {
    "support_image": "support_image.nii.gz",  # CHAOS MR patient 39, T2-SPIR
    "support_mask": "support_label.nii.gz",
    "query": "query_image.nii.gz",  # CHAOS MR patient 15, T2-SPIR
    "query_label": "query_label.nii.gz",  # ground truth, only for the Dice
}
ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}  # CHAOS label ids


def demo_files() -> dict[str, Path]:
    """Paths of the bundled demo volumes; InputError if one is missing from the installation."""
    paths = {key: DEMO_DIR / name for key, name in DEMO_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise InputError(path, "bundled demo file is missing; reinstall the package")
    return paths


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    from .evaluation.metrics import dice

    return float(dice(pred, gt))


def run_demo(out_dir: str | Path = "sdfsmis-demo", *, checkpoint: str | Path | None = None, device: str = "auto",
             labels: Sequence[int] | None = None, batch_size: int = 16, progress: bool = True,
             verbose: bool = True, precision: str = "auto", cleanup: bool = True, shots: int = 1,
             chunks: int = 3) -> dict[str, Any]:
    """Run the demo; returns ``{"dice": {organ: value}, "segmentation", "overlay", "summary", "seconds"}``.

    ``out_dir`` is created if needed; the prediction goes to ``out_dir/query_prediction.nii.gz`` (with
    ``.png`` and ``.json`` next to it) and the Dice values to ``out_dir/dice.json``. ``checkpoint``:
    a trained model directory (default: the bundled model). ``labels``: only these CHAOS ids
    (1 liver, 2 right kidney, 3 left kidney, 4 spleen). ``precision``, ``cleanup``, ``shots``,
    ``chunks``: as in ``predict``.
    The overlay shows the manual labels beside the prediction.
    """
    from .predict import predict

    files = demo_files()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out_dir, f"cannot create the output folder ({err.strerror or err})") from None
    result = predict(files["support_image"], files["support_mask"], files["query"],
                     out_dir / "query_prediction.nii.gz", labels=labels, checkpoint=checkpoint, device=device,
                     batch_size=batch_size, progress=progress, precision=precision, cleanup=cleanup,
                     shots=shots, chunks=chunks,
                     names=ORGANS, reference=files["query_label"])
    pred = np.asarray(nib.load(str(result.segmentation)).dataobj)
    gt = np.asarray(nib.load(str(files["query_label"])).dataobj)
    scores = {}
    for organ in result.summary["organs"]:
        lid = int(organ["label"])
        scores[ORGANS.get(lid, f"label {lid}")] = _dice(pred == lid, gt == lid)
    report = {
        "dice": scores,
        "mean_dice": float(np.mean(list(scores.values()))),
        "segmentation": str(result.segmentation),
        "overlay": None if result.overlay is None else str(result.overlay),
        "summary": str(result.summary_path),
        "model": result.summary["model"]["checkpoint"],
        "seconds": result.summary["seconds"],
        "timing": result.summary["timing"],
        "slices_per_s": result.summary["slices_per_s"],
    }
    atomic.write_json(out_dir / "dice.json", report)
    report["dice_file"] = str(out_dir / "dice.json")
    if verbose:
        print("Demo: CHAOS T2 MRI, support patient 39 -> query patient 15 (CC BY-SA 4.0, Kavur et al. 2021)")
        print(f"model: {report['model']}")
        for organ, value in scores.items():
            print(f"  Dice {organ:<13s} {value:.3f}")
        print(f"  mean Dice     {report['mean_dice']:.3f}   ({report['seconds']:.1f} s, "
              f"{report['slices_per_s']} slices/s)")
        print(f"segmentation: {report['segmentation']}")
        if report["overlay"]:
            print(f"overlay:      {report['overlay']}")
        print(f"summary:      {report['summary']}")
        print(f"dice:         {report['dice_file']}")
    return report
