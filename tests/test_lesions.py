"""Per-lesion figures (pipeline.evaluation.lesions): hand-counted volumes, then the evaluate stage end to end.

The hand-counted grid: 24 x 12 x 12 voxels of 5 mm (0.125 ml each, so 8 voxels = 1 ml, 80 = 10 ml),
brain everywhere except the slab x >= 22, threshold 0.5 (a voxel is predicted when score > 0.5).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from test_evaluate import baseline_settings, mixed_split, read_test_subject

from pipeline.atomic import write_json
from pipeline.bundle import run_bundle
from pipeline.errors import InputError
from pipeline.evaluation.evaluate import compute_metrics
from pipeline.evaluation.lesions import (SIZE_BINS, LesionCounter, PackedBrain, SubjectLesions, components, csv_columns,
                                         lesions_from_brain_voxels, pool_lesions, size_bin, subject_lesions)
from pipeline.evaluation.metrics import dice_counts
from pipeline.evaluation.report import _lesion_lines
from pipeline.evaluation.subject_metrics import voxel_volume_ml

AFFINE = np.diag([5.0, 5.0, 5.0, 1.0])
VOXEL_ML = voxel_volume_ml(AFFINE)  # 5 * 5 * 5 mm^3 = 0.125 ml
SHAPE = (24, 12, 12)
THRESHOLD = 0.5


def hand_case() -> dict:
    """Three ground-truth lesions, a map that finds two of them and raises two false-positive lesions."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    score = np.zeros(SHAPE, dtype=np.float32)
    brain = np.ones(SHAPE, dtype=bool)
    brain[22:] = False  # outside the brain: neither labels nor scores count there
    label[2, 2, 2] = 1  # A: 1 voxel = 0.125 ml -> small
    label[6:8, 2:4, 2:4] = 2  # B: 2*2*2 = 8 voxels = 1.0 ml -> medium (the lower edge belongs to medium)
    label[12:17, 2:6, 2:6] = 4  # C: 5*4*4 = 80 voxels = 10.0 ml -> large (the lower edge belongs to large)
    label[23, 0, 0] = 1  # outside the brain: no lesion
    score[2, 2, 2] = 0.5  # A: score == threshold is not > threshold -> A is missed
    score[7:9, 3:5, 3:5] = 0.9  # one predicted blob of 8 voxels sharing voxel (7, 3, 3) with B -> B found
    score[16, 5, 5] = 0.9  # one predicted voxel on C's corner -> C found
    score[2:4, 8:11, 8:11] = 0.8  # false-positive lesion 1: 2*3*3 = 18 voxels = 2.25 ml
    score[20, 9, 9] = score[21, 10, 10] = 0.7  # false-positive lesion 2: corner-touching pair = 0.25 ml
    score[22:] = 1.0  # outside the brain: touches FP 2 at (22, 10, 10) but is not predicted
    return {"score": score, "label": label, "brain": brain}


def test_hand_counted_lesions_detections_and_false_positives():
    case = hand_case()
    got = subject_lesions(case["score"], case["label"], case["brain"], THRESHOLD, VOXEL_ML)
    # np.linalg.det gives 0.12499999999999994 ml: B's 8 voxels make 0.9999999999999996 ml, C's 80 voxels
    # 9.999999999999996 ml; binning rounds to 1e-9 ml, so they sit on the 1 ml and 10 ml edges as counted by hand
    assert VOXEL_ML == pytest.approx(0.125) and 8 * VOXEL_ML < 1.0
    assert got.lesions == {"small": 1, "medium": 1, "large": 1}  # A, B, C
    assert got.detected == {"small": 0, "medium": 1, "large": 1}  # B and C; A sits at the threshold
    assert got.false_positive_lesions == 2
    assert got.false_positive_ml == pytest.approx(2.5)  # 18 + 2 voxels of 0.125 ml


def test_min_overlap_variant_needs_that_fraction_of_the_lesion():
    """B has 1 of 8 voxels predicted (12.5 %), C 1 of 80: half-overlap finds neither, 1/8 finds B only;
    the false positives do not change (a grazing blob is not a false positive)."""
    case = hand_case()
    half = subject_lesions(case["score"], case["label"], case["brain"], THRESHOLD, VOXEL_ML, min_overlap=0.5)
    assert half.detected == {"small": 0, "medium": 0, "large": 0}
    assert half.false_positive_lesions == 2
    eighth = subject_lesions(case["score"], case["label"], case["brain"], THRESHOLD, VOXEL_ML, min_overlap=0.125)
    assert eighth.detected == {"small": 0, "medium": 1, "large": 0}


def test_threshold_is_strict_as_for_dice():
    """score > threshold, as dice_counts (the masks on disk): at 0.5, A (score 0.5) is not predicted;
    at 0.49 it is, and A is found too."""
    case = hand_case()
    brain = case["brain"]
    _, predicted, _ = dice_counts(case["score"][brain], case["label"][brain] > 0, THRESHOLD)
    assert predicted == 8 + 1 + 18 + 2  # the B blob, the C corner, both false positives; A (== 0.5) excluded
    _, predicted, _ = dice_counts(case["score"][brain], case["label"][brain] > 0, 0.49)
    assert predicted == 8 + 1 + 18 + 2 + 1
    below = subject_lesions(case["score"], case["label"], brain, 0.49, VOXEL_ML)
    assert below.detected == {"small": 1, "medium": 1, "large": 1}
    assert below.false_positive_lesions == 2


def test_26_connectivity_joins_voxels_touching_by_a_corner():
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner to corner
    mask[3, 3, 3] = True  # two voxels away from (1, 1, 1): separate
    assert components(mask)[1] == 2
    score = np.zeros(mask.shape)
    score[0, 0, 0] = 1.0  # predicts one voxel of the corner pair: the whole pair is found
    got = subject_lesions(score, mask.astype(np.uint8), np.ones(mask.shape, bool), THRESHOLD, 0.6)
    # at 0.6 ml a voxel: the corner pair is one 1.2 ml lesion (medium), found; the lone voxel 0.6 ml (small).
    # Face-only connectivity would give three small lesions, one found.
    assert got.lesions == {"small": 1, "medium": 1, "large": 0}
    assert got.detected == {"small": 0, "medium": 1, "large": 0}


def test_size_bins_at_their_edges():
    assert [size_bin(v) for v in (0.0, 0.999, 1.0, 9.999, 10.0, 500.0)] == [
        "small", "small", "medium", "medium", "large", "large"]
    assert size_bin(1000 * 0.001) == "medium"  # 1000 voxels of 1 mm^3 are 1 ml, whatever float rounding says


def test_healthy_subject_every_predicted_component_is_a_false_positive():
    case = hand_case()
    empty = np.zeros(SHAPE, dtype=np.uint8)
    got = subject_lesions(case["score"], empty, case["brain"], THRESHOLD, VOXEL_ML)
    assert got.lesions == got.detected == {"small": 0, "medium": 0, "large": 0}
    # the B blob, the C corner voxel and the two false positives of the hand case: 4 components
    assert got.false_positive_lesions == 4
    assert got.false_positive_ml == pytest.approx((8 + 1 + 18 + 2) * 0.125)


def test_pooled_rates_and_false_positives_per_subject():
    case = hand_case()
    tumour = subject_lesions(case["score"], case["label"], case["brain"], THRESHOLD, VOXEL_ML)
    healthy = subject_lesions(case["score"], np.zeros(SHAPE), case["brain"], THRESHOLD, VOXEL_ML)
    pooled = pool_lesions({"t": tumour, "h": healthy}, THRESHOLD)
    assert pooled["lesions"] == {"small": 1, "medium": 1, "large": 1, "all": 3}
    assert pooled["detected"] == {"small": 0, "medium": 1, "large": 1, "all": 2}
    assert pooled["detection_rate"] == {"small": 0.0, "medium": 1.0, "large": 1.0, "all": pytest.approx(2 / 3)}
    assert pooled["false_positive_lesions"] == 2 + 4
    assert pooled["false_positive_lesions_per_subject"] == 3.0
    assert pooled["healthy"] == {"subjects": 1, "false_positive_lesions_per_subject": 4.0,
                                 "false_positive_ml_per_subject": pytest.approx(29 * 0.125)}
    assert pooled["per_subject"]["t"]["false_positive_ml"] == pytest.approx(2.5)
    assert pooled["threshold"] == THRESHOLD and pooled["connectivity"] == 26
    assert "at least one of its voxels" in pooled["criterion"]
    assert csv_columns(pooled["per_subject"]["t"]) == {
        "lesions_small": 1, "lesions_medium": 1, "lesions_large": 1, "detected_small": 0, "detected_medium": 1,
        "detected_large": 1, "false_positive_lesions": 2, "false_positive_lesion_ml": pytest.approx(2.5)}
    lines = _lesion_lines(pooled)
    assert lines[0] == "lesions found 2/3 (67%)"
    assert lines[1:3] == ["  <1ml 0/1  1-10ml 1/1", "  >=10ml 1/1"]
    assert lines[3:] == ["FP lesions 3.00/subject", "  healthy 4.00/subject"]


def test_a_bin_without_lesions_has_no_rate():
    """Healthy subjects only: every rate is None (undefined), not 0; no healthy subject: healthy figures None."""
    case = hand_case()
    healthy = subject_lesions(case["score"], np.zeros(SHAPE), case["brain"], THRESHOLD, VOXEL_ML)
    pooled = pool_lesions({"h": healthy}, THRESHOLD)
    assert pooled["detection_rate"] == {b: None for b in (*SIZE_BINS, "all")}
    assert _lesion_lines(pooled)[0] == "lesions found 0/0"
    tumour = subject_lesions(case["score"], case["label"], case["brain"], THRESHOLD, VOXEL_ML)
    assert pool_lesions({"t": tumour}, THRESHOLD)["healthy"] == {
        "subjects": 0, "false_positive_lesions_per_subject": None, "false_positive_ml_per_subject": None}
    with pytest.raises(InputError, match="no subject"):
        pool_lesions({}, THRESHOLD)


def test_counts_rebuilt_from_pooled_brain_voxels_match_the_volumes():
    """The validation path: a 1-bit brain mask plus the in-brain scores and labels give the same counts."""
    case = hand_case()
    brain = case["brain"]
    direct = subject_lesions(case["score"], case["label"], brain, THRESHOLD, VOXEL_ML)
    packed = PackedBrain.pack(brain)
    assert packed.bits.nbytes == brain.size // 8
    rebuilt = lesions_from_brain_voxels(case["score"][brain], case["label"][brain] > 0, packed, THRESHOLD, VOXEL_ML)
    assert rebuilt == direct
    counter = LesionCounter()  # threshold unknown while streaming
    counter.add("s", {"score": case["score"], "tumour": case["label"] > 0, "brain": brain}, VOXEL_ML)

    class Voxels:
        def subject(self, name):
            return case["score"][brain], case["label"][brain] > 0

    assert counter.pooled(THRESHOLD, Voxels())["per_subject"]["s"] == direct.as_dict()
    streamed = LesionCounter(THRESHOLD)
    streamed.add("s", {"score": case["score"], "tumour": case["label"] > 0, "brain": brain}, VOXEL_ML)
    assert streamed.counts["s"] == direct
    with pytest.raises(InputError, match="counted at"):
        streamed.pooled(0.6, Voxels())


@pytest.mark.parametrize("volumes, match", [
    ((np.zeros((4, 4)), np.zeros((4, 4)), np.ones((4, 4), bool)), "3D"),
    ((np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), np.ones((4, 4, 4), bool)), "does not match"),
    ((np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.ones((4, 4, 3), bool)), "does not match"),
])
def test_bad_shapes_are_refused(volumes, match):
    with pytest.raises(InputError, match=match):
        subject_lesions(*volumes, THRESHOLD, VOXEL_ML)


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": float("nan")}, "threshold"), ({"voxel_ml": 0.0}, "voxel"), ({"voxel_ml": -1}, "voxel"),
    ({"min_overlap": 1.5}, "min_overlap")])
def test_bad_settings_are_refused(kwargs, match):
    case = hand_case()
    args = {"threshold": THRESHOLD, "voxel_ml": VOXEL_ML, **kwargs}
    with pytest.raises(InputError, match=match):
        subject_lesions(case["score"], case["label"], case["brain"], **args)


def test_subject_lesions_is_a_small_value():
    lesions = SubjectLesions({"small": 1, "medium": 0, "large": 0}, {"small": 1, "medium": 0, "large": 0}, 0, 0.0)
    assert json.loads(json.dumps(lesions.as_dict()))["detected"]["small"] == 1


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def evaluated(synth_root, tmp_path_factory):
    """The FLAIR baseline of tests/test_evaluate.py (no training), then the evaluate stage."""
    out = tmp_path_factory.mktemp("lesions")
    write_json(out / "split.json", mixed_split(synth_root))
    settings = baseline_settings(synth_root, out)
    run_bundle("inference", **settings)
    run_bundle("evaluate", **settings)
    return out


def test_evaluate_writes_lesion_figures(evaluated, synth_root):
    """metrics.json has a ``lesions`` block per section; per_subject.csv has the counts; the test block
    matches a direct count from the files on disk."""
    metrics = json.loads((evaluated / "evaluation" / "metrics.json").read_text())
    test, validation = metrics["test"], metrics["validation"]
    threshold = test["dice_threshold_from_validation"]
    for block in (test["lesions"], validation["lesions"]):
        assert block["threshold"] == threshold
        assert set(block["lesions"]) == {*SIZE_BINS, "all"}
        assert block["lesions"]["all"] == sum(block["lesions"][b] for b in SIZE_BINS)
    lesions = test["lesions"]
    assert sorted(lesions["per_subject"]) == sorted(test["per_subject_dice"])
    assert lesions["healthy"]["subjects"] == test["healthy_subjects"]
    # on a healthy subject every predicted voxel is in a false-positive lesion: the same ml as the voxel figure
    assert lesions["healthy"]["false_positive_ml_per_subject"] == pytest.approx(test["false_positive_ml_healthy"])
    for name, entry in lesions["per_subject"].items():
        data = read_test_subject(evaluated, synth_root, name)
        direct = subject_lesions(data["score"], data["tumour"], data["brain"], threshold,
                                 voxel_volume_ml(data["affine"]))
        assert entry == direct.as_dict()
    table = pd.read_csv(evaluated / "evaluation" / "per_subject.csv").set_index("subject")
    for column in ("lesions_small", "lesions_medium", "lesions_large", "detected_small", "detected_medium",
                   "detected_large", "false_positive_lesions", "false_positive_lesion_ml"):
        assert column in table.columns
    for name, entry in lesions["per_subject"].items():
        assert table.loc[name, "lesions_large"] == entry["lesions"]["large"]
        assert table.loc[name, "false_positive_lesions"] == entry["false_positive_lesions"]


def test_validation_only_run_counts_lesions_at_its_own_threshold(evaluated, synth_root, tmp_path):
    """A study run with no test section: lesions are counted after validation chose its threshold."""
    scores = tmp_path / "scores"
    shutil.copytree(evaluated / "scores", scores)
    index = json.loads((scores / "index.json").read_text())
    index["subjects"] = {n: r for n, r in index["subjects"].items() if r["section"] == "validation"}
    write_json(scores / "index.json", index)
    metrics = compute_metrics(synth_root, scores, n_boot=10, progress=False).metrics
    assert metrics["test"] is None
    block = metrics["validation"]["lesions"]
    assert block["threshold"] == metrics["validation"]["threshold"]
    assert sorted(block["per_subject"]) == sorted(index["subjects"])


# ----------------------------------------------------------------------------- leaderboard run page


def test_run_page_lesion_table_is_ordered_escaped_and_optional(evaluated):
    """The run page's table from a real metrics.json (keys sorted on disk: rows still smallest bin first),
    hostile text stays text, malformed values are left blank, and a run without the block gets a note."""
    from pipeline.leaderboard.run_page import _lesions_html

    test = json.loads((evaluated / "evaluation" / "metrics.json").read_text())["test"]
    page = _lesions_html(test)
    assert page.index(">small<") < page.index(">medium<") < page.index(">large<") < page.index(">all<")
    assert "&lt; 1 ml" in page and "1-10 ml" in page and "&ge; 10 ml" in page
    assert f"<td>{test['lesions']['lesions']['large']}</td>" in page
    evil = {"lesions": {"lesions": {"<b>x</b>": 1, "small": "<script>"}, "detected": {"<b>x</b>": "1"},
                        "detection_rate": {"<b>x</b>": float("nan")}, "size_bins_ml": {"<b>x</b>": ["<i>", 1]},
                        "criterion": "<script>alert(1)</script>", "healthy": "none"}}
    page = _lesions_html(evil)
    assert "<b>" not in page and "<script>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert ">small<" not in page  # a count that is not a number is left out
    assert "No per-lesion figures" in _lesions_html({"false_positive_ml_per_healthy_subject": {}})
    assert "No per-lesion figures" in _lesions_html(None)


def test_empty_brain_counts_nothing():
    ones = np.ones((4, 4, 4))
    got = subject_lesions(ones, ones, np.zeros((4, 4, 4), bool), THRESHOLD, VOXEL_ML)
    assert sum(got.lesions.values()) == 0 and got.false_positive_lesions == 0 and got.false_positive_ml == 0.0
