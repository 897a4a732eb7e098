"""Subject-level detection AUROC, false-positive volume and pooled reconstruction figures,
checked against values worked out by hand on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.evaluation.subject_metrics import (SUBJECT_SCORE_PERCENTILE, false_positive_ml, reconstruction_figures,
                                                 subject_detection_auroc, subject_score, voxel_volume_ml)


def flat_subject(value: float, hot_outside: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4x4 map equal to ``value`` inside a 2x2x2 brain and ``hot_outside`` elsewhere."""
    score = np.full((4, 4, 4), hot_outside, dtype=np.float32)
    brain = np.zeros(score.shape, dtype=bool)
    brain[1:3, 1:3, 1:3] = True
    score[brain] = value
    return score, brain


def test_subject_score_is_the_99th_percentile_inside_the_brain():
    score = np.arange(101, dtype=np.float32).reshape(101, 1, 1)  # 0..100: the 99th percentile is 99
    brain = np.ones(score.shape, dtype=bool)
    assert SUBJECT_SCORE_PERCENTILE == 99.0
    assert subject_score(score, brain) == pytest.approx(99.0)
    assert subject_score(*flat_subject(0.25)) == pytest.approx(0.25)  # the hot voxels outside do not count
    with pytest.raises(InputError, match="empty"):
        subject_score(score, np.zeros(score.shape, dtype=bool))


def test_subject_auroc_of_two_healthy_and_three_tumour_subjects():
    # healthy 0.2, 0.6; tumour 0.5, 0.7, 0.9: tumour above healthy in 5 of the 6 pairs
    values = {"h1": 0.2, "h2": 0.6, "t1": 0.5, "t2": 0.7, "t3": 0.9}
    scores = {name: subject_score(*flat_subject(v)) for name, v in values.items()}
    tumour = {name: name.startswith("t") for name in values}
    assert subject_detection_auroc(scores, tumour) == pytest.approx(5 / 6)
    # tumour 0.6 beats healthy 0.2 and ties healthy 0.6 (one half): 5.5 / 6; sequences work like mappings
    assert subject_detection_auroc([0.2, 0.6, 0.6, 0.7, 0.9], [0, 0, 1, 1, 1]) == pytest.approx(5.5 / 6)


def test_subject_auroc_is_none_with_one_class_and_refuses_mismatched_subjects():
    assert subject_detection_auroc({"a": 0.1, "b": 0.2}, {"a": True, "b": True}) is None
    assert subject_detection_auroc({"a": 0.1, "b": 0.2}, {"a": False, "b": False}) is None
    assert subject_detection_auroc({}, {}) is None
    with pytest.raises(InputError, match="subjects"):
        subject_detection_auroc({"a": 0.1, "b": 0.2}, {"a": True, "c": False})


def test_false_positive_ml_counts_brain_voxels_above_threshold_times_voxel_volume():
    score = np.zeros((4, 4, 4), dtype=np.float32)
    brain = np.zeros(score.shape, dtype=bool)
    brain[:, :, :2] = True
    score[0, 0, 0:2] = score[1, 0, 0:2] = score[2, 0, 0] = 0.9  # 5 flagged voxels in the brain
    score[3, 3, 3] = 0.9  # above threshold but outside the brain
    score[3, 0, 0] = 0.5  # equal to the threshold: not flagged (strict >)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 x 2 x 2 mm = 8 mm^3 = 0.008 ml
    assert voxel_volume_ml(affine) == pytest.approx(0.008)
    assert false_positive_ml(score, brain, 0.5, affine) == pytest.approx(0.04)
    rotated = np.array([[0.0, -2.0, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, -2.0, 3.0], [0, 0, 0, 1]])
    assert false_positive_ml(score, brain, 0.5, rotated) == pytest.approx(0.04)  # |det|: orientation is irrelevant
    assert false_positive_ml(score, brain, 0.95, affine) == 0.0


RECORD_A = {"healthy_residual_sum": 1.0, "healthy_voxels": 10, "tumour_residual_sum": 0.0, "tumour_voxels": 0,
            "psnr_sum": 60.0, "ssim_sum": 1.6, "healthy_slices": 2}
RECORD_B = {"healthy_residual_sum": 9.0, "healthy_voxels": 30, "tumour_residual_sum": 6.0, "tumour_voxels": 10,
            "psnr_sum": 100.0, "ssim_sum": 2.7, "healthy_slices": 3}


def test_reconstruction_figures_pool_sums_before_dividing():
    got = reconstruction_figures([RECORD_A, RECORD_B])
    assert got["healthy_residual"] == pytest.approx(10 / 40)  # pooled, not the mean of 0.1 and 0.3
    assert got["tumour_residual"] == pytest.approx(0.6)
    assert got["residual_ratio"] == pytest.approx(0.6 / 0.25)
    assert got["psnr"] == pytest.approx(160 / 5) and got["ssim"] == pytest.approx(4.3 / 5)
    assert (got["healthy_voxels"], got["tumour_voxels"], got["healthy_slices"]) == (40, 10, 5)


def test_reconstruction_figures_without_tumour_or_records_are_none():
    healthy_only = reconstruction_figures([RECORD_A])
    assert healthy_only["healthy_residual"] == pytest.approx(0.1)
    assert healthy_only["tumour_residual"] is None and healthy_only["residual_ratio"] is None
    for records in ([RECORD_A, None], [None], []):  # an index from before the score stage wrote them
        assert set(reconstruction_figures(records).values()) == {None}
    with pytest.raises(InputError, match="healthy_voxels"):
        reconstruction_figures([{**RECORD_A, "healthy_voxels": "many"}])
