"""Dataset descriptions: which label id is which organ, which organs are evaluated, how folds split.

A dataset is named (``abd-mri``, ``abd-ct``, ``card-mri``) or described by a JSON file with the same
fields as :class:`DatasetSpec`, e.g.::

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
    modality: str = "MR"
    notes: str = field(default="", compare=False)

    def label_id(self, organ: str) -> int:
        return self.labels[organ]

    def organ_name(self, label_id: int) -> str:
        for name, lid in self.labels.items():
            if lid == label_id:
                return name
        raise KeyError(label_id)


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
        labels = {str(k): int(v) for k, v in raw["labels"].items()}
        eval_organs = tuple(raw.get("eval_organs", list(labels)))
        spec = DatasetSpec(
            name=str(raw["name"]),
            labels=labels,
            eval_organs=eval_organs,
            supervoxel_min_size=int(raw.get("supervoxel_min_size", 5000)),
            modality=str(raw.get("modality", "MR")),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(path, f"not a valid dataset description ({err!r}); needs 'name' and 'labels'") from err
    unknown = [o for o in spec.eval_organs if o not in spec.labels]
    if unknown:
        raise InputError(path, f"eval_organs {unknown} are not in labels")
    if any(v <= 0 for v in spec.labels.values()) or len(set(spec.labels.values())) != len(spec.labels):
        raise InputError(path, "label ids must be distinct positive integers")
    return spec
