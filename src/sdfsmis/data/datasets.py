"""Dataset descriptions: which label id is which organ, which organs are evaluated, how folds split.

A dataset is named (``abd-mri``, ``abd-ct``, ``card-mri``) or described by a JSON file with the same
fields as :class:`DatasetSpec` (every key, its default and examples: docs/dataset-format.md), e.g.::

    {"name": "my-ct", "labels": {"liver": 1, "spleen": 2}, "eval_organs": ["liver", "spleen"],
     "supervoxel_min_size": 5000, "modality": "CT"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    labels: dict[str, int]  # organ name -> label id in the label files
    eval_organs: tuple[str, ...]  # organs evaluated, in the column order of the paper's tables
    supervoxel_min_size: int = 5000  # Felzenszwalb min_size (ADNet: 5000 abdomen, 1000 cardiac)
    modality: str = "MR"  # "CT": prepare windows raw-HU scans to [-125, 275] HU; "MR": normalised only
    notes: str = field(default="", compare=False)

    def label_id(self, organ: str) -> int:
        return self.labels[organ]


ABD_ORGANS = ("spleen", "liver", "left_kidney", "right_kidney")  # paper Table 1 column order

SPECS: dict[str, DatasetSpec] = {
    "abd-mri": DatasetSpec(
        name="abd-mri",
        labels={"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4},
        eval_organs=ABD_ORGANS,
        supervoxel_min_size=5000,
        modality="MR",
        notes="CHAOS T2-SPIR (Kavur et al., MedIA 2021), CC BY-SA 4.0",
    ),
    "abd-ct": DatasetSpec(
        name="abd-ct",
        labels={
            "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5,
            "liver": 6, "stomach": 7, "aorta": 8, "ivc": 9, "portal_splenic_vein": 10,
            "pancreas": 11, "right_adrenal": 12, "left_adrenal": 13,
        },
        eval_organs=ABD_ORGANS,
        supervoxel_min_size=5000,
        modality="CT",
        notes="Synapse / BTCV multi-atlas abdomen CT (Landman et al., MICCAI 2015)",
    ),
    "card-mri": DatasetSpec(
        name="card-mri",
        labels={"lv_myo": 1, "lv_bp": 2, "rv": 3},
        eval_organs=("lv_bp", "lv_myo", "rv"),
        supervoxel_min_size=1000,
        modality="MR",
        notes="MS-CMRSeg 2019 bSSFP (Zhuang, TPAMI 2019)",
    ),
}


def get_spec(name_or_path: str | Path) -> DatasetSpec:
    """A built-in dataset by name, or a dataset described by a JSON file."""
    key = str(name_or_path)
    if key in SPECS:
        return SPECS[key]
    path = Path(key)
    if not path.suffix == ".json":
        raise InputError(None, f"unknown dataset {key!r}: use one of {sorted(SPECS)} or a .json description")
    if not path.is_file():
        raise InputError(path, "dataset description not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read the dataset description ({err})") from None
    spec = spec_from_dict(raw, path)
    unknown = [o for o in spec.eval_organs if o not in spec.labels]
    if unknown:
        raise InputError(path, f"eval_organs {unknown} are not in labels")
    if any(v <= 0 for v in spec.labels.values()) or len(set(spec.labels.values())) != len(spec.labels):
        raise InputError(path, "label ids must be distinct positive integers")
    return spec


#: Keys of a dataset description file, with what each must be (see docs/dataset-format.md).
SPEC_KEYS = {
    "name": "a string",
    "labels": 'an object of organ name -> label id, e.g. {"rv": 3, "lv_myo": 1}',
    "eval_organs": "a list of organ names from labels",
    "supervoxel_min_size": "a positive integer",
    "modality": '"CT" or "MR"',
    "notes": "a string",
}
MODALITIES = ("CT", "MR")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def spec_from_dict(raw: object, path: Path | None = None) -> DatasetSpec:
    """A ``DatasetSpec`` from a parsed description; unknown keys and wrong types are one-line
    ``InputError``s naming the key (and ``path``)."""
    if not isinstance(raw, dict):
        raise InputError(path, "a dataset description must be a JSON object")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise InputError(path, f"unknown key(s) {unknown}; the keys are {', '.join(SPEC_KEYS)}")
    for key in ("name", "labels"):
        if key not in raw:
            raise InputError(path, f"missing key {key!r} ({SPEC_KEYS[key]})")

    def bad(key: str) -> InputError:
        return InputError(path, f"key {key!r} must be {SPEC_KEYS[key]}, got {json.dumps(raw[key])[:80]}")

    labels = raw["labels"]
    if not (isinstance(labels, dict) and labels and all(_is_int(v) for v in labels.values())):
        raise bad("labels")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise bad("name")
    eval_organs = raw.get("eval_organs", list(labels))
    if not (isinstance(eval_organs, list) and eval_organs and all(isinstance(o, str) for o in eval_organs)):
        raise bad("eval_organs")
    min_size = raw.get("supervoxel_min_size", 5000)
    if not (_is_int(min_size) and min_size > 0):
        raise bad("supervoxel_min_size")
    modality = raw.get("modality", "MR")
    if modality not in MODALITIES:
        raise bad("modality")
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise bad("notes")
    return DatasetSpec(name=raw["name"], labels={str(k): int(v) for k, v in labels.items()},
                       eval_organs=tuple(eval_organs), supervoxel_min_size=min_size, modality=modality,
                       notes=notes)
