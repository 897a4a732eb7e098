"""Evaluation metrics: exact agreement with scikit-learn (ties included), Dice sweeps, slice scores,
the pooled accumulator and its patient-level bootstrap against a naive one."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.errors import InputError
from pipeline.evaluation.metrics import auprc, auroc, best_dice, pixel_metrics, roc_pr_curves
from pipeline.evaluation.pooled import ScoreAccumulator
from pipeline.evaluation.subject_metrics import slice_labels, slice_scores


def direct_dice(scores, labels, threshold) -> float:
    """Reference: Dice ``2TP / (2TP + FP + FN)`` of ``scores > threshold``; 1.0 when both masks are empty."""
    pred = np.asarray(scores) > threshold
    denom = pred.sum() + np.sum(labels)
    return 2 * np.sum(pred & labels) / denom if denom else 1.0


def naive_bootstrap(stat, n_subjects: int, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Reference patient-level bootstrap: ``stat(indices)`` recomputed on every resample of subjects
    (the same draw as the accumulator's), then the percentile interval."""
    idx = np.random.default_rng(seed).integers(0, n_subjects, size=(n_boot, n_subjects))
    values = np.array([stat(row) for row in idx])
    low, high = np.quantile(values[~np.isnan(values)], [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def random_case(rng: np.random.Generator, n: int, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores with a mild signal, imbalanced labels (both classes present) and the requested ties."""
    labels = rng.random(n) < rng.choice([0.01, 0.03, 0.2, 0.5])
    labels[rng.integers(n)], labels[rng.integers(n)] = True, False
    if labels.all():
        labels[0] = False
    scores = rng.standard_normal(n) + 0.8 * labels
    if ties == "one_decimal":
        scores = np.round(scores, 1)
    elif ties == "two_decimals":
        scores = np.round(scores, 2).astype(np.float32)
    elif ties == "few_levels":
        scores = rng.integers(0, 3, n) + labels * rng.integers(0, 2, n)
    elif ties == "all_equal":
        scores = np.full(n, 0.25, dtype=np.float32)
    return scores, labels


CASES = [(seed, n, ties) for seed, (n, ties) in enumerate(
    [(int(n), t) for n in np.geomspace(10, 5000, 6).round()
     for t in ("none", "one_decimal", "two_decimals", "few_levels", "all_equal")])]


@pytest.mark.parametrize("seed,n,ties", CASES)
def test_auroc_auprc_equal_sklearn(seed, n, ties):
    scores, labels = random_case(np.random.default_rng(seed), n, ties)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    both = pixel_metrics(scores, labels)
    assert both["auroc"] == auroc(scores, labels) and both["auprc"] == auprc(scores, labels)


def test_chunked_scan_with_ties_across_chunk_edges(monkeypatch):
    import pipeline.evaluation.metrics as metrics

    monkeypatch.setattr(metrics, "CHUNK", 16)
    monkeypatch.setattr(metrics, "GROUP_CHUNK", 5)
    scores, labels = random_case(np.random.default_rng(11), 700, "one_decimal")
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    brute = max(2 * np.sum((scores >= v) & labels) / (np.sum(scores >= v) + labels.sum()) for v in np.unique(scores))
    value, threshold = best_dice(scores, labels)
    assert value == pytest.approx(brute) and direct_dice(scores, labels, threshold) == pytest.approx(value)


def test_labels_as_integers_and_other_shapes():
    rng = np.random.default_rng(3)
    scores, labels = rng.random((8, 9)), rng.random((8, 9)) < 0.3
    expected = roc_auc_score(labels.ravel(), scores.ravel())
    assert auroc(scores, labels.astype(np.uint8)) == pytest.approx(expected, abs=1e-12)
    assert auroc(scores.astype(np.float32), labels) == pytest.approx(
        roc_auc_score(labels.ravel(), scores.astype(np.float32).ravel()), abs=1e-12)


@pytest.mark.parametrize("labels", [np.zeros(20, bool), np.ones(20, bool)])
def test_single_class_is_an_input_error(labels):
    with pytest.raises(InputError) as err:
        auroc(np.linspace(0, 1, 20), labels)
    assert err.value.source == "labels"


def test_bad_inputs():
    good = np.linspace(0, 1, 10)
    lab = np.arange(10) % 2 == 0
    with pytest.raises(InputError, match="shape"):
        auroc(good, lab[:9])
    with pytest.raises(InputError, match="NaN"):
        auroc(np.where(lab, np.nan, good), lab)
    with pytest.raises(InputError, match="0/1"):
        auroc(good, np.arange(10))
    with pytest.raises(InputError, match="no positive"):
        auprc(good, np.zeros(10, bool))
    assert auprc(good, np.ones(10, bool)) == pytest.approx(1.0)  # as scikit-learn


def test_accumulator_dice_matches_direct_computation(monkeypatch):
    import pipeline.evaluation.metrics as metrics

    monkeypatch.setattr(metrics, "CHUNK", 64)  # counts are taken chunk by chunk
    rng = np.random.default_rng(5)
    scores, labels = random_case(rng, 3000, "two_decimals")
    acc = accumulate([("a", scores[:1700], labels[:1700]), ("b", scores[1700:], labels[1700:])])
    for t in (-1.0, 0.0, 0.37, 1.5, 10.0):
        assert acc.dice(t) == pytest.approx(direct_dice(scores, labels, t), abs=1e-15)
        assert acc.per_subject_dice(t)["b"] == pytest.approx(direct_dice(scores[1700:], labels[1700:], t), abs=1e-15)
        assert acc.flagged_voxels(t) == {"a": np.sum(scores[:1700] > t), "b": np.sum(scores[1700:] > t)}
    assert accumulate([("a", np.zeros(5), np.zeros(5, bool))]).dice(1.0) == 1.0  # both masks empty


@pytest.mark.parametrize("seed", range(12))
def test_best_dice_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    ties = ("none", "one_decimal", "few_levels", "all_equal")[seed % 4]
    scores, labels = random_case(rng, int(rng.integers(5, 300)), ties)
    brute = max(2 * np.sum((scores >= v) & labels) / (np.sum(scores >= v) + labels.sum())
                for v in np.unique(scores))
    value, threshold = best_dice(scores, labels)
    assert value == pytest.approx(brute, abs=1e-12)
    assert direct_dice(scores, labels, threshold) == pytest.approx(value, abs=1e-12)


def test_best_dice_edges():
    scores = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    assert best_dice(scores, np.array([True, True, True])) == (1.0, pytest.approx(np.nextafter(np.float32(0.1), -1)))
    value, threshold = best_dice(scores, np.zeros(3, bool))
    assert value == 1.0 and not np.any(scores > threshold)
    value, threshold = best_dice(scores, np.array([False, False, True]))
    assert value == 1.0 and 0.2 <= threshold < 0.3  # midpoint between the two top scores


def test_roc_pr_curves_are_exact_points():
    rng = np.random.default_rng(9)
    scores, labels = random_case(rng, 5000, "none")
    curves = roc_pr_curves(scores, labels, max_points=50)
    assert all(curves[k].shape == curves["thresholds"].shape for k in ("fpr", "tpr", "precision", "recall"))
    assert curves["thresholds"].size <= 50 and np.all(np.diff(curves["thresholds"]) < 0)
    assert curves["fpr"][-1] == curves["tpr"][-1] == 1.0
    t = curves["thresholds"][7]
    assert curves["tpr"][7] == np.sum((scores >= t) & labels) / labels.sum()
    assert np.trapezoid(curves["tpr"], curves["fpr"]) == pytest.approx(auroc(scores, labels), abs=0.01)


def test_slice_scores_and_labels():
    vol = np.zeros((4, 4, 3))
    mask = np.zeros((4, 4, 3), bool)
    mask[:, :, 0] = True
    vol[:, :, 0] = np.arange(16).reshape(4, 4)
    mask[1, 1, 1], vol[1, 1, 1], vol[2, 2, 1] = True, 7.0, 100.0  # outside brain: ignored
    vol[:, :, 2] = 50.0  # no brain in slice 2
    out = slice_scores(vol, mask, percentile=100)
    assert out.tolist() == [15.0, 7.0, 0.0]
    assert slice_scores(vol, mask, percentile=50)[0] == pytest.approx(7.5)
    seg = np.zeros((4, 4, 3), np.uint8)
    seg[0, 0, 1] = 2
    assert slice_labels(seg).tolist() == [False, True, False]
    with pytest.raises(InputError):
        slice_scores(vol, mask[:, :, :2])


def make_subjects(n: int, seed: int, shift: float = 1.0, size: int = 400) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Subjects with their own contrast (so subjects matter), a quarter of them healthy."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        labels = np.zeros(size, bool) if i % 4 == 3 else rng.random(size) < rng.uniform(0.02, 0.15)
        scores = rng.standard_normal(size) + rng.uniform(0.3, 2.0) * shift * labels
        out.append((f"s{i:03d}", scores.astype(np.float32), labels))
    return out


def accumulate(subjects) -> ScoreAccumulator:
    acc = ScoreAccumulator()
    for name, scores, labels in subjects:
        acc.add(name, scores, labels)
    return acc


def test_accumulator_pooled_metrics_and_per_subject_dice():
    subjects = make_subjects(8, seed=1)
    acc = accumulate(subjects)
    scores = np.concatenate([s for _, s, _ in subjects])
    labels = np.concatenate([lab for _, _, lab in subjects])
    summary = acc.summary(threshold=1.0)
    assert summary["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert summary["auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert (summary["best_dice"], summary["best_threshold"]) == best_dice(scores, labels)
    assert summary["dice"] == pytest.approx(direct_dice(scores, labels, 1.0))
    assert acc.best_dice() == (summary["best_dice"], summary["best_threshold"])
    per = acc.per_subject_dice(1.0)
    assert tuple(per) == acc.subjects
    assert per["s002"] == pytest.approx(direct_dice(subjects[2][1], subjects[2][2], 1.0))
    assert per["s003"] == direct_dice(subjects[3][1], subjects[3][2], 1.0)  # healthy subject
    curves, expected = acc.curves(max_points=50), roc_pr_curves(scores, labels, max_points=50)
    assert all(np.array_equal(curves[k], expected[k]) for k in expected)
    with pytest.raises(InputError, match="twice"):
        acc.add("s000", subjects[0][1], subjects[0][2])


def test_binned_metrics_are_close_to_exact():
    from pipeline.evaluation.pooled import _binned_auprc, _binned_auroc

    acc = accumulate(make_subjects(12, seed=2))
    hist = acc.histograms()
    pos, neg = hist.pos.sum(0, keepdims=True).astype(float), hist.neg.sum(0, keepdims=True).astype(float)
    assert _binned_auroc(pos, neg)[0] == pytest.approx(acc.auroc(), abs=2e-3)
    assert _binned_auprc(pos, neg)[0] == pytest.approx(acc.auprc(), abs=5e-3)


def test_bootstrap_contains_estimate_is_deterministic_and_narrows():
    small, large = accumulate(make_subjects(8, seed=4)), accumulate(make_subjects(48, seed=4))
    threshold = small.best_dice()[1]
    ci = small.bootstrap(threshold=threshold, n_boot=300, seed=3)
    assert ci == small.bootstrap(threshold=threshold, n_boot=300, seed=3)
    assert ci != small.bootstrap(threshold=threshold, n_boot=300, seed=4)
    for name in ("auroc", "auprc", "dice"):
        low, high = ci[name]
        assert low <= small.point(name, threshold) <= high
    wide = ci["auroc"][1] - ci["auroc"][0]
    low, high = large.bootstrap(["auroc"], n_boot=300, seed=3)["auroc"]
    assert high - low < wide
    with pytest.raises(InputError, match="threshold"):
        small.bootstrap(["dice"])


def test_bootstrap_equals_a_naive_patient_bootstrap():
    """Dice replicates are exact; AUROC / AUPRC replicates come from binned scores, so close."""
    subjects = make_subjects(12, seed=8)
    acc = accumulate(subjects)
    threshold = acc.best_dice()[1]
    ci = acc.bootstrap(threshold=threshold, n_boot=200, seed=5)

    def pooled(idx):
        return (np.concatenate([subjects[i][1] for i in idx]), np.concatenate([subjects[i][2] for i in idx]))

    assert ci["dice"] == pytest.approx(naive_bootstrap(lambda idx: direct_dice(*pooled(idx), threshold),
                                                       len(subjects), 200, seed=5), abs=1e-12)
    for name, fn in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
        expected = naive_bootstrap(lambda idx: fn(*pooled(idx)[::-1]), len(subjects), 200, seed=5)
        assert ci[name] == pytest.approx(expected, abs=5e-3)
    with pytest.raises(InputError, match="n_boot"):
        acc.bootstrap(["auroc"], n_boot=0)


def test_accumulator_hands_out_what_it_holds_read_only():
    subjects = make_subjects(3, seed=9)
    acc = accumulate([(name, scores.astype(np.float64), labels.astype(np.uint8)) for name, scores, labels in subjects])
    assert [name for name, _, _ in acc.items()] == [name for name, _, _ in subjects]
    for (name, scores, labels), (_, held_scores, held_labels) in zip(subjects, acc.items()):
        assert held_scores.dtype == np.float32 and np.array_equal(held_scores, scores)
        assert held_labels.dtype == bool and np.array_equal(held_labels, labels)
        assert acc.subject(name)[0] is held_scores
        with pytest.raises(ValueError, match="read-only"):
            held_scores[0] = 1.0
    with pytest.raises(InputError, match="not added"):
        acc.subject("nobody")
