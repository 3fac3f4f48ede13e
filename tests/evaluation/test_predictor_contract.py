"""A custom predictor written from docs/architecture.md ("Few-shot predictor") alone, on scans whose
in-plane sizes differ between support and query, as the docs say they may."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_protocol import write_prepared

from sdfsmis.evaluation.report import run_evaluation


def _resize_scans(root, sizes):
    """Pad scan i of a prepared dataset to sizes[i] (X, Y) in-plane, keeping the label geometry."""
    meta = json.loads((root / "dataset.json").read_text())
    for entry, (x, y) in zip(meta["scans"], sizes):
        path = root / entry["file"]
        arrays = dict(np.load(path))
        for key in ("image", "label", "body", "supervoxels"):
            a = arrays[key]
            fill = -1.0 if key == "image" else 0
            arrays[key] = np.pad(a, ((0, x - a.shape[0]), (0, y - a.shape[1]), (0, 0)), constant_values=fill)
        np.savez_compressed(path, **arrays)
        entry["shape"] = [x, y, entry["shape"][2]]
    (root / "dataset.json").write_text(json.dumps(meta))


class DocsPredictor:
    """As the docs describe: support [K, Hs, Ws], query [N, Hq, Wq] -> [N, Hq, Wq]; resizes the
    support to the query's size itself, then marks query pixels close to the support organ's median."""

    name = "from-the-docs"

    def __init__(self):
        self.sizes = set()

    def predict(self, support_images, support_masks, query_images):
        self.sizes.add((tuple(support_images.shape[-2:]), tuple(query_images.shape[-2:])))
        size = query_images.shape[-2:]
        s_img = F.interpolate(support_images[:, None], size=size, mode="nearest")[:, 0]
        s_msk = F.interpolate(support_masks[:, None], size=size, mode="nearest")[:, 0]
        value = s_img[s_msk > 0].median()
        return ((query_images - value).abs() < 0.05).float()


class NaivePredictor:
    """Assumes one size for both (what the docs warn against): returns the support's size."""

    name = "naive"

    def predict(self, support_images, support_masks, query_images):
        return support_masks[:1].expand(query_images.shape[0], -1, -1)


def test_docs_predictor_runs_on_differing_sizes(tmp_path):
    root = write_prepared(tmp_path / "prep")
    _resize_scans(root, [(16, 16), (20, 18), (24, 16), (16, 22), (18, 18)])
    predictor = DocsPredictor()
    res = run_evaluation(predictor, root, tmp_path / "out", folds=(0, 1), progress=False)
    assert any(s != q for s, q in predictor.sizes)  # the differing sizes did reach it
    assert res.summary()["mean"]["dice"] > 0.9


def test_wrong_output_size_error_names_both_shapes(tmp_path):
    root = write_prepared(tmp_path / "prep")
    _resize_scans(root, [(16, 16), (20, 18), (24, 16), (16, 22), (18, 18)])
    with pytest.raises(RuntimeError, match=r"query's own size \[N, Hq, Wq\]") as err:
        run_evaluation(NaivePredictor(), root, tmp_path / "out", folds=(0,), support="index:0", progress=False)
    assert "supports (" in str(err.value) and "queries of shape (" in str(err.value)
