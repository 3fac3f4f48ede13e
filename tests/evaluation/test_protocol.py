"""Protocol: chunk / middle-slice selection, the runner on a synthetic prepared dataset, reports."""

import csv
import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

from sdfsmis.data.datasets import SPECS
from sdfsmis.errors import InputError
from sdfsmis.evaluation.protocol import chunk_support_slices, evaluate
from sdfsmis.evaluation.report import combine_summaries, run_evaluation

# ------------------------------------------------------------------ chunk / middle-slice selection


def test_chunks_hand_worked_example():
    support = list(range(10, 20))  # 10 slices -> chunks of 4, 3, 3: [10..13], [14..16], [17..19]
    query = list(range(3, 10))  # 7 slices -> chunks of 3, 2, 2
    # middle slice of a chunk of L slices = index L // 2: 12, 15, 18
    assert chunk_support_slices(support, query, 3, 1) == [
        ([3, 4, 5], [12]), ([6, 7], [15]), ([8, 9], [18])
    ]
    # 3 shots: indices floor((j + .5) L / 3): L=4 -> 0, 2, 3; L=3 -> 0, 1, 2 (middle one included)
    assert chunk_support_slices(support, query, 3, 3) == [
        ([3, 4, 5], [10, 12, 13]), ([6, 7], [14, 15, 16]), ([8, 9], [17, 18, 19])
    ]
    # 2 shots: L=4 -> floor(1), floor(3) = 1, 3; L=3 -> floor(0.75), floor(2.25) = 0, 2
    assert chunk_support_slices(support, query, 3, 2)[0] == ([3, 4, 5], [11, 13])
    assert chunk_support_slices(support, query, 3, 2)[1] == ([6, 7], [14, 16])


def test_chunks_edge_cases():
    # unsorted input is sorted; 1 chunk = the whole lists
    assert chunk_support_slices([5, 3, 4], [9, 7, 8], 1, 1) == [([7, 8, 9], [4])]
    # more shots than slices in a chunk: every slice once
    assert chunk_support_slices([0, 1, 2, 3, 4, 5], [0, 1, 2], 3, 5) == [([0], [0, 1]), ([1], [2, 3]), ([2], [4, 5])]
    # support shorter than n_chunks: chunk i uses slice floor((i + .5) S / n) -> S=2: 0, 1, 1
    assert chunk_support_slices([20, 21], [1, 2, 3], 3, 1) == [([1], [20]), ([2], [21]), ([3], [21])]
    # query shorter than n_chunks: empty query chunks are dropped
    assert chunk_support_slices(list(range(9)), [7, 8], 3, 1) == [([7], [1]), ([8], [4])]
    with pytest.raises(ValueError):
        chunk_support_slices([], [1], 3, 1)


# ------------------------------------------------------------------ a synthetic prepared dataset

SPEC = SPECS["abd-mri"]  # liver 1, right kidney 2, left kidney 3, spleen 4
SHAPE = (16, 16, 10)
SPACING = (1.25, 1.25, 7.7)


def _synthetic_scan(i: int, with_spleen: bool = True) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(SHAPE, np.uint8)
    label[2:9, 2:10, 1 + i % 2: 9] = 1  # liver, z range depends on the scan
    label[10:13, 3:6, 3:7] = 2
    label[10:13, 9:12, 2 + i % 3: 6] = 3
    if with_spleen:
        label[3:7, 11:15, 4:7] = 4
    image = np.where(label > 0, -1.0 + 0.4 * label, -1.0).astype(np.float16)  # one grey value per organ
    return image, label


def write_prepared(root, n_scans=5, no_spleen=()):
    """A prepared dataset in the documented format (docs/architecture.md)."""
    (root / "scans").mkdir(parents=True)
    scans = []
    for i in range(1, n_scans + 1):
        image, label = _synthetic_scan(i, with_spleen=i not in no_spleen)
        sv = (label > 0).astype(np.int32)
        np.savez_compressed(root / "scans" / f"{i}.npz", image=image, label=label, body=label > 0,
                            supervoxels=sv, sv_pairs=np.zeros((0, 2), np.int32))
        class_slices = {str(lid): [int(z) for z in np.flatnonzero((label == lid).any((0, 1)))]
                        for lid in SPEC.labels.values()}
        scans.append({"id": str(i), "file": f"scans/{i}.npz", "shape": list(SHAPE), "spacing": list(SPACING),
                      "affine": np.diag([*SPACING, 1.0]).tolist(), "class_slices": class_slices,
                      "n_supervoxels": 1, "n_sv_pairs": 0})
    spec = asdict(SPEC)
    spec["eval_organs"] = list(spec["eval_organs"])
    meta = {"format_version": 1, "dataset": SPEC.name, "spec": spec, "source": str(root),
            "supervoxels": {"method": "felzenszwalb3d", "min_size": 5000, "sigma": 0.0}, "scans": scans}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


class OraclePredictor:
    """Segments the query pixels whose grey value equals the support foreground's: the ground truth."""

    name = "oracle"

    def __init__(self):
        self.calls = []

    def predict(self, support_images, support_masks, query_images):
        assert support_images.shape == support_masks.shape and support_images.ndim == 3
        assert query_images.ndim == 3 and query_images.dtype == torch.float32
        self.calls.append((support_images.shape[0], query_images.shape[0]))
        value = support_images[support_masks > 0].mean()
        return ((query_images - value).abs() < 0.05).float()


class EmptyPredictor:
    name = "empty"

    def predict(self, support_images, support_masks, query_images):
        return torch.zeros_like(query_images)


@pytest.fixture
def prepared(tmp_path):
    from sdfsmis.data.prepared import PreparedDataset

    return PreparedDataset(write_prepared(tmp_path / "prep"))


def test_oracle_gives_perfect_scores(prepared):
    pred = OraclePredictor()
    res = evaluate(pred, prepared, folds=(0, 4), progress=False)
    # 5 scans: fold 0 = indices {0, 1} (support "2", query "1"); fold 4 = {0, 4} (support "5", query "1")
    assert res.folds == {0: {"support": "2", "queries": ["1"]}, 4: {"support": "5", "queries": ["1"]}}
    assert len(res.cases) == 2 * 4
    for c in res.cases:
        assert c.dice == 1.0 and c.hd95 == 0.0 and c.assd == 0.0
        assert c.n_slices == len(c.query_slices) and c.seconds > 0
    assert len(pred.calls) == sum(len(c.support_slices) for c in res.cases)
    s = res.summary()
    assert s["mean"]["dice"] == 1.0 and list(s["organs"]) == list(SPEC.eval_organs)


def test_one_predictor_per_fold(prepared):
    """A {fold: predictor} mapping (cross-validation) calls each fold's own predictor; a fold without
    one is an error before any prediction."""
    oracle, empty = OraclePredictor(), EmptyPredictor()
    res = evaluate({0: oracle, 4: empty}, prepared, folds=(0, 4), progress=False)
    assert {c.fold for c in res.cases if c.dice == 1.0} == {0}
    assert {c.fold for c in res.cases if c.dice == 0.0} == {4}
    assert res.config["predictor"] == "oracle" and len(oracle.calls) > 0
    with pytest.raises(InputError, match=r"no predictor for fold\(s\) \[4\]"):
        evaluate({0: oracle}, prepared, folds=(0, 4), progress=False)


def test_one_predictor_per_fold_and_organ(prepared):
    """A {(fold, organ): predictor} mapping (SDSeg, per-organ-group Setting 2) calls the model of each
    case's fold and organ; a missing pair is an error before any prediction."""
    oracle, empty = OraclePredictor(), EmptyPredictor()
    table = {(f, o): (oracle if o == "liver" else empty) for f in (0, 4) for o in SPEC.eval_organs}
    res = evaluate(table, prepared, folds=(0, 4), progress=False)
    assert {c.organ for c in res.cases if c.dice == 1.0} == {"liver"}
    assert all(c.dice == 0.0 for c in res.cases if c.organ != "liver")
    del table[4, "spleen"]
    with pytest.raises(InputError, match=r"no predictor for fold\(s\) \[4\]"):
        evaluate(table, prepared, folds=(0, 4), progress=False)


def test_support_slices_follow_the_chunk_rule(prepared):
    res = evaluate(OraclePredictor(), prepared, folds=(0,), organs=("liver",), shots=1, progress=False)
    (case,) = res.cases
    # query "1": liver on z 2..8 (7 slices); support "2": z 1..8 (8 slices -> chunks 3, 3, 2)
    assert case.query_slices == list(range(2, 9))
    assert case.support_slices == [[2], [5], [8]]  # middles of [1,2,3], [4,5,6], [7,8]
    res3 = evaluate(OraclePredictor(), prepared, folds=(0,), organs=("liver",), shots=3, progress=False)
    assert res3.cases[0].support_slices == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert res3.config["shots"] == 3 and res3.config["support"] == "last"


def test_empty_prediction_counts_undefined_distances(prepared):
    res = evaluate(EmptyPredictor(), prepared, folds=(1,), organs=("spleen", "liver"), progress=False)
    assert all(c.dice == 0.0 and math.isnan(c.hd95) and math.isnan(c.assd) for c in res.cases)
    assert res.summary()["organs"]["liver"]["n_undefined"] == len(res.cases) // 2


def test_query_without_organ_is_skipped(tmp_path):
    from sdfsmis.data.prepared import PreparedDataset

    ds = PreparedDataset(write_prepared(tmp_path / "p", no_spleen=(1,)))
    res = evaluate(OraclePredictor(), ds, folds=(0,), organs=("spleen",), progress=False)
    assert res.cases == [] and res.skipped == [
        {"fold": 0, "query_id": "1", "organ": "spleen", "reason": "organ absent"}]
    ds2 = PreparedDataset(write_prepared(tmp_path / "q", no_spleen=(2,)))  # "2" is fold 0's support
    with pytest.raises(InputError, match="no 'spleen'"):
        evaluate(OraclePredictor(), ds2, folds=(0,), progress=False)


def test_run_evaluation_writes_reports(tmp_path):
    root = write_prepared(tmp_path / "prep")
    out = tmp_path / "out"
    res = run_evaluation(OraclePredictor(), root, out, folds=(0, 2), support="index:0", setting="1", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["cases.csv", "cases.json", "summary.json", "table.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "table.md").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert len(rows) == len(res.cases) == 2 * 4
    assert {r["support_id"] for r in rows} == {"1", "3"}  # index 0 of folds {0,1} and {2,3}
    assert float(rows[0]["dice"]) == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["support"] == "index:0" and summary["mean"]["dice"] == 1.0
    assert summary["setting"] == "1"
    assert len(json.loads((out / "cases.json").read_text())) == 8
    table = (out / "table.md").read_text()
    assert "| Method | Setting | Spleen | Liver | LK | RK | Mean |" in table
    assert "| oracle | 1 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 |" in table
    assert "HD95 (mm)" in table and "ASSD (mm)" in table and "slices/s" in table
    assert "100.00" in str(res)
    empty_out = tmp_path / "out_empty"
    run_evaluation(EmptyPredictor(), root, empty_out, folds=(0,), setting="2", progress=False)
    combined = combine_summaries([out / "summary.json", empty_out / "summary.json"])
    assert "| oracle | 1 | 100.00 |" in combined and "| empty | 2 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |" in combined
    with pytest.raises(InputError, match="summary"):
        combine_summaries([out / "cases.csv"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"organs": ("pancreas",)}, "unknown organ"),
        ({"folds": (5,)}, "out of range"),
        ({"support": "id:99"}, "support rule"),
        ({"support": "index:7"}, "support rule"),
        ({"support": "first"}, "support rule"),
    ],
)
def test_bad_options_raise_before_writing(tmp_path, kwargs, match):
    root = write_prepared(tmp_path / "prep")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match) as err:
        run_evaluation(OraclePredictor(), root, out, progress=False, **kwargs)
    assert str(root) in str(err.value)
    assert not out.exists()


def test_not_a_prepared_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(InputError, match="dataset.json"):
        run_evaluation(OraclePredictor(), tmp_path / "raw", tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="not found"):
        run_evaluation(OraclePredictor(), tmp_path / "missing", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_loads_a_model_per_organ(tmp_path, tiny_model, capsys):
    """`sdfsmis evaluate --method 'DIR-{organ}'` loads one model per evaluated organ (here the same tiny
    model under four names) and evaluates each organ with its own."""
    from sdfsmis.cli import main

    root = write_prepared(tmp_path / "prep")
    for organ in SPEC.eval_organs:
        (tmp_path / f"model-{organ}").symlink_to(tiny_model, target_is_directory=True)
    out = tmp_path / "out"
    assert main(["-q", "evaluate", str(root), "--method", str(tmp_path / "model-{organ}"), "--folds", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["organs"]) == list(SPEC.eval_organs) and summary["config"]["folds"] == [0]
    described = summary["config"]["predictor_config"]
    assert (described["method"], described["threshold"]) == ("sdfsmis", "absolute")
    # --threshold replaces the models' own rule, and the summary records the one used
    assert main(["-q", "evaluate", str(root), "--method", str(tmp_path / "model-{organ}"), "--folds", "0",
                 "--out", str(tmp_path / "relative"), "--threshold", "relative:0.25"]) == 0
    described = json.loads((tmp_path / "relative" / "summary.json").read_text())["config"]["predictor_config"]
    assert (described["threshold"], described["threshold_value"]) == ("relative", 0.25)
    assert main(["-q", "evaluate", str(root), "--method", str(tmp_path / "nope-{organ}"), "--folds", "0",
                 "--out", str(tmp_path / "out2")]) == 2
    assert "nope-spleen" in capsys.readouterr().err and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------ the position-only control (paste)


def test_paste_copies_the_majority_support_mask_at_the_query_size():
    from sdfsmis.evaluation.position import PastePredictor

    masks = torch.zeros(3, 8, 8)
    masks[:, 2:6, 2:6] = 1
    masks[0, 0, 0] = 1  # one shot of three: dropped by the majority
    out = PastePredictor().predict(torch.zeros(3, 8, 8), masks, torch.rand(5, 16, 16))
    assert out.shape == (5, 16, 16) and out.dtype == torch.float32
    expected = torch.zeros(16, 16)
    expected[4:12, 4:12] = 1
    assert all(torch.equal(o, expected) for o in out)


def test_paste_is_perfect_where_organs_never_move_and_ignores_the_images(tmp_path):
    """In the synthetic dataset every organ sits at the same place in every scan (the liver and left
    kidney only change their z range): paste scores Dice 1 on all of them; a query image turned to
    noise changes nothing."""
    from sdfsmis.data.prepared import PreparedDataset
    from sdfsmis.evaluation.position import PastePredictor

    prepared = PreparedDataset(write_prepared(tmp_path / "prep"))
    res = evaluate(PastePredictor(), prepared, folds=(0,), progress=False)
    assert res.cases and all(c.dice == 1.0 for c in res.cases)
    noisy = PastePredictor().predict(torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.randn(2, 4, 4))
    assert torch.equal(noisy, torch.ones(2, 4, 4))


def test_cli_evaluate_method_paste(tmp_path):
    from sdfsmis.cli import main

    prep = write_prepared(tmp_path / "prep")
    assert main(["-q", "evaluate", str(prep), "--method", "paste", "--folds", "0", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "paste" and summary["mean"]["dice"] == 1.0


def test_query_shift_probe_separates_appearance_from_position(tmp_path):
    """Moving the queries leaves an appearance matcher (the oracle) perfect and breaks paste; the
    masks come back in the true query's frame; the CLI flag runs the probe."""
    from sdfsmis.cli import main
    from sdfsmis.data.prepared import PreparedDataset
    from sdfsmis.evaluation.position import PastePredictor, ShiftedQueries, translate

    x = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(translate(x, 1, 0, -1.0)[0], torch.tensor([[-1, 0, 1, 2], [-1, 4, 5, 6], [-1, 8, 9, 10.]]))
    assert torch.equal(translate(translate(x, 0, -2, 0.0), 0, 2, 0.0)[0, 2], x[0, 2])
    prepared = PreparedDataset(write_prepared(tmp_path / "prep"))
    oracle = evaluate(ShiftedQueries(OraclePredictor(), -2, 2), prepared, folds=(0,), progress=False)
    paste = evaluate(ShiftedQueries(PastePredictor(), -2, 2), prepared, folds=(0,), progress=False)
    assert all(c.dice == 1.0 for c in oracle.cases)
    assert oracle.method == "oracle, query moved (-2, 2) px"
    assert max(c.dice for c in paste.cases) < 0.7
    args = ["-q", "evaluate", str(tmp_path / "prep"), "--method", "paste", "--folds", "0",
            "--query-shift", "-2", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mean"]["dice"] == pytest.approx(paste.summary()["mean"]["dice"])
