"""Lesion-robust intensity scaling: healthy tissue keeps its values whether or not a tumour is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.phantom import make_subject
from pipeline.data.transforms import ScaleBrainMediand, ScaleBrainPercentilesd, robust_brain_median


@pytest.fixture(scope="module", params=[0, 1, 2])
def pair(request):
    """The same synthetic brain rendered with and without a tumour (same anatomy, contrast, noise seed)."""
    with_tumour, label, _ = make_subject(request.param, True, 0, 2.0)
    without, _, _ = make_subject(request.param, False, 0, 2.0)
    brain = (without != 0).any(-1)
    assert (label > 0).sum() > 0.02 * brain.sum()  # a real lesion, several % of the brain
    return with_tumour, without, label, brain


def _scaled(transform_cls, image, brain):
    data = {"image": torch.from_numpy(np.moveaxis(image, -1, 0).copy()),
            "brain": torch.from_numpy(brain[None].astype(np.float32))}
    return transform_cls("image", "brain")(data)["image"].numpy()


def _healthy_medians(scaled, label, brain):
    healthy = brain & (label == 0)
    return np.array([np.median(scaled[c][healthy]) for c in range(scaled.shape[0])])


def test_median_scaling_gives_healthy_tissue_the_same_values_with_and_without_tumour(pair):
    with_tumour, without, label, brain = pair
    a = _healthy_medians(_scaled(ScaleBrainMediand, with_tumour, brain), label, brain)
    b = _healthy_medians(_scaled(ScaleBrainMediand, without, brain), label, brain)
    assert abs(a[0] / b[0] - 1) < 0.02, a / b  # FLAIR: the default input and the baseline's channel
    assert np.all(np.abs(a / b - 1) < 0.035), a / b  # T1w is the worst: the tumour replaces bright white matter
    assert np.all(np.abs(b - 0.5) < 0.1)  # healthy tissue sits around the 0.5 level


def test_percentile_scaling_is_the_one_that_is_not_robust(pair):
    """The v1 scaling darkens healthy FLAIR in the tumour subject by far more than 2 %."""
    with_tumour, without, label, brain = pair
    a = _healthy_medians(_scaled(ScaleBrainPercentilesd, with_tumour, brain), label, brain)
    b = _healthy_medians(_scaled(ScaleBrainPercentilesd, without, brain), label, brain)
    assert a[0] / b[0] < 0.95


def test_median_scaling_keeps_the_bright_end_and_is_unit_free(pair):
    with_tumour, _, label, brain = pair
    scaled = _scaled(ScaleBrainMediand, with_tumour, brain)
    assert np.median(scaled[0][label > 0]) > 0.7  # tumour stays brighter than healthy FLAIR (~0.5)
    rescaled = _scaled(ScaleBrainMediand, with_tumour * 1234.5, brain)  # other intensity units
    np.testing.assert_allclose(rescaled, scaled, rtol=1e-4, atol=1e-5)
    assert (scaled[:, ~brain] == 0).all()


def test_robust_median_ignores_an_outlier_tail():
    rng = np.random.default_rng(0)
    healthy = rng.normal(1.0, 0.1, 20_000)
    lesion = rng.normal(2.0, 0.1, 2_000)  # 9 % bright outliers
    centre = float(robust_brain_median(torch.from_numpy(np.concatenate([healthy, lesion]))))
    assert abs(centre - 1.0) < 0.01
    assert abs(float(np.median(np.concatenate([healthy, lesion]))) - 1.0) > 0.01  # the plain median moves
