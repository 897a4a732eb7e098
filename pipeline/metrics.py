"""Evaluation metrics over brain voxels: exact pixel AUROC / AUPRC / Dice and patient-level bootstrap.

Protocol (design.md, "Evaluation protocol"): pixel AUROC and AUPRC over the brain voxels of all
test subjects, Dice at a threshold chosen on validation subjects (:func:`choose_threshold`, the
honest number) next to the best Dice over thresholds on test (:func:`best_dice`, the oracle
number), per-subject Dice, slice-level AUROC and patient-level bootstrap intervals; beside them the
figures pixel AUROC hides: subject-level detection AUROC, false-positive volume on healthy subjects
and pooled reconstruction quality.

Exactness. AUROC equals ``sklearn.metrics.roc_auc_score`` and AUPRC equals
``sklearn.metrics.average_precision_score`` (step-wise, tied scores grouped), ties included:

* For each distinct score ``v`` held by a positive voxel, ``n_v`` positives sit at ``v``,
  ``TP(v) = #positives >= v``, ``FP(v) = #negatives >= v``. Only these thresholds move recall.
* AUROC: the trapezoid under the tie-grouped ROC curve equals the Mann-Whitney sum
  ``sum_v n_v * (#neg < v + #neg == v / 2) / (P N)``, kept as an exact integer until the last division.
* AP: ``sum_v (n_v / P) * TP(v) / (TP(v) + FP(v))`` (precision times the recall step).
* Best Dice: predicting ``scores >= v`` gives ``2 TP(v) / (TP(v) + FP(v) + P)``; adding a
  negative-only tie group only lowers it, so the maximum is at one of these ``v``.

Memory (why 10^8 voxels fit). scikit-learn argsorts (8 B/voxel of int64 indices) and keeps
several float64 / int64 arrays of the full length (several GB at 10^8). Here the scores are split
by label into two copies in the input's float dtype -- every voxel lands in exactly one of them,
so 4 B/voxel for float32 -- and each is sorted in place (no index array). ``TP(v)`` is a
position in the sorted positives and ``#neg < v`` / ``#neg <= v`` are binary searches into the
sorted negatives, done :data:`GROUP_CHUNK` positives at a time, so the int64 tables never
exceed a few times ``GROUP_CHUNK`` entries. Label masks and comparisons are taken :data:`CHUNK`
voxels at a time. Peak beyond the inputs: 4 B/voxel + ~80 MB of chunk buffers; measured 473 MB
at 10^8 float32 voxels, against 5.1 GB for scikit-learn (benchmarks/bench_metrics.py).

Bootstrap. Resampling subjects and re-sorting 10^8 pooled voxels per replicate is too slow, so
each subject's scores are binned once into at most :data:`DEFAULT_BINS` bins with edges at
quantiles of the pooled positive and of the pooled negative scores (so the tumour score range
gets bins even at 3 % positives). A replicate's pooled histogram is ``weights @ per-subject
histograms`` and AUROC / AP come from it, ties within a bin grouped. Bootstrap intervals for
AUROC / AUPRC therefore use binned scores; Dice replicates and all point estimates are exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

CHUNK = 1 << 22
"""Voxels (or positives) handled at once: bounds temporaries to a few tens of MB."""

GROUP_CHUNK = 1 << 20
"""Positives per tie-group table: ~8 int64/float64 arrays of this length live at once (~64 MB)."""

DEFAULT_BINS = 4096
"""Score bins per subject for bootstrap replicates."""

METRICS = ("auroc", "auprc", "dice")

_BOOT_BATCH = 128  # bootstrap replicates evaluated together: (batch, bins) float64 arrays


# ----------------------------------------------------------------------------- input checks


def _check_pair(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores (float32 / float64, finite) and flat bool labels of the same shape."""
    s, lab = np.asarray(scores), np.asarray(labels)
    if s.shape != lab.shape:
        raise InputError("labels", f"shape {lab.shape} does not match the scores' shape {s.shape}")
    if s.size == 0:
        raise InputError("scores", "no voxels to evaluate")
    return _as_scores(s), _as_labels(lab)


def _as_scores(arr: np.ndarray) -> np.ndarray:
    if arr.dtype not in (np.float32, np.float64):
        if arr.dtype.kind not in "biuf":
            raise InputError("scores", f"scores must be real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)  # exact for integers and float16
    flat = arr.ravel()
    # min/max allocate nothing and NaN propagates through them.
    if not (np.isfinite(flat.min()) and np.isfinite(flat.max())):
        raise InputError("scores", "scores contain NaN or infinite values")
    return flat


def _as_labels(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.ravel()
    if arr.dtype.kind not in "biuf":
        raise InputError("labels", f"labels must be boolean or 0/1, got dtype {arr.dtype}")
    flat = arr.ravel()
    if not np.all((flat == 0) | (flat == 1)):
        raise InputError("labels", "labels must be boolean or 0/1")
    return flat != 0


def _as_threshold(threshold) -> float:
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or math.isnan(threshold):
        raise InputError("threshold", f"threshold must be a real number, got {threshold!r}")
    return float(threshold)


def _check_percentile(percentile) -> None:
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        raise InputError("percentile", f"percentile must lie in [0, 100], got {percentile!r}")


def _check_boot(n_boot, alpha) -> None:
    if not isinstance(n_boot, numbers.Integral) or isinstance(n_boot, bool) or n_boot < 1:
        raise InputError("n_boot", f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise InputError("alpha", f"alpha must lie strictly between 0 and 1, got {alpha!r}")


# ----------------------------------------------------------------------------- sorted split


@dataclass(frozen=True)
class _Split:
    """Scores of positive and of negative voxels, each sorted ascending."""

    pos: np.ndarray
    neg: np.ndarray

    @property
    def n_pos(self) -> int:
        return self.pos.size

    @property
    def n_neg(self) -> int:
        return self.neg.size


def _split_sorted(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> _Split:
    """Sort once without an index array: 4 B/voxel (float32) extra, see the module docstring."""
    dtype = np.result_type(*(s.dtype for s, _ in pairs))
    n_pos = sum(int(np.count_nonzero(lab)) for _, lab in pairs)
    n_all = sum(s.size for s, _ in pairs)
    pos, neg = np.empty(n_pos, dtype), np.empty(n_all - n_pos, dtype)
    i_pos = i_neg = 0
    for s, lab in pairs:
        for a in range(0, s.size, CHUNK):
            sc, lc = s[a:a + CHUNK], lab[a:a + CHUNK]
            k = int(np.count_nonzero(lc))
            pos[i_pos:i_pos + k] = sc[lc]
            neg[i_neg:i_neg + sc.size - k] = sc[~lc]
            i_pos, i_neg = i_pos + k, i_neg + sc.size - k
    pos.sort()
    neg.sort()
    return _Split(pos, neg)


def _need_both_classes(split: _Split) -> None:
    if split.n_pos == 0 or split.n_neg == 0:
        which = "positive (tumour)" if split.n_pos == 0 else "negative (healthy)"
        raise InputError("labels", f"labels contain no {which} voxel: AUROC is undefined for one class")


def _need_positives(split: _Split) -> None:
    if split.n_pos == 0:
        raise InputError("labels", "labels contain no positive (tumour) voxel: precision-recall is undefined")


# ----------------------------------------------------------------------------- exact scan


@dataclass(frozen=True)
class _Groups:
    """One chunk of distinct positive scores ``v`` (ascending) and their counts."""

    value: np.ndarray  # v
    count: np.ndarray  # positives equal to v
    tp: np.ndarray  # positives >= v
    neg_lt: np.ndarray  # negatives < v
    neg_le: np.ndarray  # negatives <= v


def _positive_groups(split: _Split) -> Iterator[_Groups]:
    """Tie-group tables, GROUP_CHUNK positives at a time; a tie group never straddles two chunks."""
    pos, neg = split.pos, split.neg
    a = 0
    while a < pos.size:
        b = min(a + GROUP_CHUNK, pos.size)
        if b < pos.size:
            b = int(np.searchsorted(pos, pos[b - 1], side="right"))
        vals = pos[a:b]
        first = np.flatnonzero(np.concatenate(([True], vals[1:] != vals[:-1])))
        value = vals[first]
        yield _Groups(value=value, count=np.diff(np.append(first, vals.size)), tp=pos.size - a - first,
                      neg_lt=np.searchsorted(neg, value, side="left"),
                      neg_le=np.searchsorted(neg, value, side="right"))
        a = b


@dataclass(frozen=True)
class _Exact:
    auroc: float  # NaN without negatives
    auprc: float
    best_dice: float
    best_value: float  # predicting scores >= best_value gives best_dice


def _scan(split: _Split) -> _Exact:
    """AUROC, AP and best Dice in one pass over the positive tie groups (needs positives)."""
    n_pos, n_neg = split.n_pos, split.n_neg
    twice_u, ap, best, best_value = 0, 0.0, -1.0, math.nan
    for g in _positive_groups(split):
        twice_u += int(np.dot(g.count, g.neg_lt + g.neg_le))  # int64, <= 2 P N: exact
        fp = n_neg - g.neg_lt
        ap += float(np.dot(g.count, g.tp / (g.tp + fp)))
        dice = 2.0 * g.tp / (g.tp + fp + n_pos)
        i = dice.size - 1 - int(np.argmax(dice[::-1]))  # highest threshold among equal maxima
        if dice[i] >= best:
            best, best_value = float(dice[i]), g.value[i]
    auroc_ = twice_u / (2.0 * n_pos * n_neg) if n_neg else math.nan
    return _Exact(auroc=auroc_, auprc=ap / n_pos, best_dice=best, best_value=best_value)


def _threshold_below(split: _Split, value) -> float:
    """A threshold t with ``scores > t`` exactly ``scores >= value`` on these scores.

    The midpoint to the next-lower distinct score (rounded to the scores' dtype, falling back to
    that lower score when the two are adjacent floats), so it also generalises to new data; below
    the minimum, the next representable value down.
    """
    lower = []
    for arr in (split.pos, split.neg):
        i = int(np.searchsorted(arr, value, side="left"))  # arr[i - 1] < value <= arr[i]
        if i > 0:
            lower.append(arr[i - 1])
    if not lower:
        return float(np.nextafter(value, value.dtype.type(-np.inf)))
    low = max(lower)
    mid = value.dtype.type(float(low) + (float(value) - float(low)) / 2)
    return float(mid if low <= mid < value else low)


def _best(split: _Split) -> tuple[float, float]:
    if split.n_pos == 0:  # predicting nothing is perfect: scores > max(scores) is empty
        return 1.0, float(split.neg[-1])
    exact = _scan(split)
    return exact.best_dice, _threshold_below(split, exact.best_value)


# ----------------------------------------------------------------------------- public pixel metrics


def auroc(scores, labels) -> float:
    """Exact pixel AUROC, equal to ``sklearn.metrics.roc_auc_score`` (ties count one half)."""
    split = _split_sorted([_check_pair(scores, labels)])
    _need_both_classes(split)
    return _scan(split).auroc


def auprc(scores, labels) -> float:
    """Exact average precision, equal to ``sklearn.metrics.average_precision_score``."""
    split = _split_sorted([_check_pair(scores, labels)])
    _need_positives(split)
    return _scan(split).auprc


def best_dice(scores, labels) -> tuple[float, float]:
    """(best Dice over all thresholds, threshold t giving it via ``scores > t``), exact, one sort.

    Among equal maxima the highest threshold wins. Without positives, Dice 1.0 at ``max(scores)``.
    This is the oracle number on test; the honest one uses :func:`choose_threshold` on validation.
    """
    return _best(_split_sorted([_check_pair(scores, labels)]))


def pixel_metrics(scores, labels) -> dict[str, float]:
    """AUROC, AUPRC, best Dice and its threshold from a single sort (cheapest on 10^8 voxels)."""
    split = _split_sorted([_check_pair(scores, labels)])
    _need_both_classes(split)
    exact = _scan(split)
    return {"auroc": exact.auroc, "auprc": exact.auprc, "best_dice": exact.best_dice,
            "best_threshold": _threshold_below(split, exact.best_value)}


def choose_threshold(scores, labels=None) -> float:
    """Threshold maximising Dice on validation data, to be applied unchanged to test subjects.

    Takes flat scores and labels, or a :class:`ScoreAccumulator` of validation subjects.
    """
    if isinstance(scores, ScoreAccumulator):
        return scores.best_dice()[1]
    return best_dice(scores, labels)[1]


def _dice_counts(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(true positives, predicted positives, positives) of ``scores > threshold``, chunked."""
    tp = pred = 0
    for a in range(0, scores.size, CHUNK):
        hit = scores[a:a + CHUNK] > threshold
        pred += int(np.count_nonzero(hit))
        tp += int(np.count_nonzero(hit & labels[a:a + CHUNK]))
    return tp, pred, int(np.count_nonzero(labels))


def _dice(tp, pred, pos) -> float:
    return 1.0 if pred + pos == 0 else 2.0 * tp / (pred + pos)


def dice_at_threshold(scores, labels, threshold) -> float:
    """Dice ``2TP / (2TP + FP + FN)`` of ``scores > threshold``; 1.0 when both masks are empty.

    The comparison follows NumPy's rules for a Python float against the scores' dtype.
    """
    s, lab = _check_pair(scores, labels)
    return _dice(*_dice_counts(s, lab, _as_threshold(threshold)))


def roc_pr_curves(scores, labels, max_points: int = 2000) -> dict[str, np.ndarray]:
    """ROC and PR curve points for plotting, exact points at up to ``max_points`` thresholds.

    Thresholds are taken at evenly spaced ranks among the positive and among the negative scores,
    so both the FPR and the recall axis are covered. Arrays share one length; entry 0 is the
    threshold +inf (fpr = tpr = recall = 0, precision = 1, as scikit-learn's PR curve ends).
    Thresholds decrease; a point predicts ``scores >= threshold``.
    """
    if not isinstance(max_points, numbers.Integral) or max_points < 2:
        raise InputError("max_points", f"max_points must be an integer >= 2, got {max_points!r}")
    split = _split_sorted([_check_pair(scores, labels)])
    _need_both_classes(split)
    cand = np.unique(np.concatenate([arr[_even_ranks(arr.size, max_points // 2)]
                                     for arr in (split.pos, split.neg)]))[::-1]
    if cand.size > max_points - 1:
        cand = cand[np.unique(np.linspace(0, cand.size - 1, max_points - 1).round().astype(np.int64))]
    tp = split.n_pos - np.searchsorted(split.pos, cand, side="left")
    fp = split.n_neg - np.searchsorted(split.neg, cand, side="left")
    return {"thresholds": np.concatenate(([np.inf], cand.astype(np.float64))),
            "fpr": np.concatenate(([0.0], fp / split.n_neg)),
            "tpr": np.concatenate(([0.0], tp / split.n_pos)),
            "precision": np.concatenate(([1.0], tp / (tp + fp))),
            "recall": np.concatenate(([0.0], tp / split.n_pos))}


def _even_ranks(size: int, count: int) -> np.ndarray:
    return np.unique(np.linspace(0, size - 1, max(count, 2)).round().astype(np.int64))


# ----------------------------------------------------------------------------- slice level


def slice_scores(volume_scores, brain_mask, percentile: float = 99.0) -> np.ndarray:
    """Per axial slice (last axis), a high percentile of the in-brain anomaly map; 0 without brain.

    A percentile rather than the maximum, so a single noisy voxel does not flag a slice.
    """
    vol, mask = np.asarray(volume_scores, dtype=np.float64), np.asarray(brain_mask, dtype=bool)
    if vol.ndim != 3:
        raise InputError("scores", f"volume scores must be 3D (H, W, D), got shape {vol.shape}")
    if mask.shape != vol.shape:
        raise InputError("brain_mask", f"shape {mask.shape} does not match the scores' shape {vol.shape}")
    _check_percentile(percentile)
    out = np.zeros(vol.shape[2])
    for d in range(vol.shape[2]):
        inside = vol[:, :, d][mask[:, :, d]]
        if inside.size:
            out[d] = np.percentile(inside, percentile)
    return out


def slice_labels(label_volume) -> np.ndarray:
    """Per axial slice (last axis): does it hold any tumour voxel (any non-zero label)?"""
    lab = np.asarray(label_volume)
    if lab.ndim != 3:
        raise InputError("labels", f"label volume must be 3D (H, W, D), got shape {lab.shape}")
    return (lab != 0).any(axis=(0, 1))


# ----------------------------------------------------------------------------- subject level and volumes

SUBJECT_SCORE_PERCENTILE = 99.0
"""Subject score = this percentile of the in-brain map (as for slices: a few hot voxels do not flag a scan)."""

RECON_FIELDS = ("healthy_residual_sum", "healthy_voxels", "tumour_residual_sum", "tumour_voxels",
                "psnr_sum", "ssim_sum", "healthy_slices")
"""Per-subject sums the score stage records under ``recon`` in index.json; sums so that they pool."""


def _in_brain(score, brain) -> np.ndarray:
    s, mask = np.asarray(score), np.asarray(brain)
    if mask.shape != s.shape:
        raise InputError("brain_mask", f"shape {mask.shape} does not match the scores' shape {s.shape}")
    return s[mask.astype(bool)]


def subject_score(score, brain, percentile: float = SUBJECT_SCORE_PERCENTILE) -> float:
    """One detection score per subject: a high percentile of its anomaly map over its brain voxels."""
    _check_percentile(percentile)
    inside = _in_brain(score, brain)
    if inside.size == 0:
        raise InputError("brain_mask", "the brain mask is empty: no voxel to score")
    return float(np.percentile(inside.astype(np.float64), percentile))


def _aligned(values, flags) -> tuple[np.ndarray, np.ndarray]:
    """Two mappings keyed by subject (same keys) or two sequences in the same order, as arrays."""
    if isinstance(values, Mapping) and isinstance(flags, Mapping):
        if set(values) != set(flags):
            raise InputError("has_tumour", "the subjects of the scores and of the tumour flags differ")
        keys = list(values)
        values, flags = [values[k] for k in keys], [flags[k] for k in keys]
    return np.asarray(list(values), dtype=np.float64), np.asarray(list(flags))


def subject_detection_auroc(subject_scores, has_tumour) -> float | None:
    """AUROC of tumour vs healthy subjects by subject score (ties one half); None with one class only.

    Pooled pixel AUROC is dominated by large tumours and hides whether a healthy scan as a whole
    looks normal; this is the patient-level question a screening user asks.
    """
    scores, labels = _aligned(subject_scores, has_tumour)
    if not (labels.any() and not labels.all()):
        return None
    return auroc(scores, labels)


def voxel_volume_ml(affine) -> float:
    """Volume of one voxel in ml: NIfTI affines are in mm, so |det| of the 3x3 part is mm^3 (/1000 -> ml)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 3 or a.shape[1] < 3:
        raise InputError("affine", f"needs a 3x3 or 4x4 affine, got shape {a.shape}")
    return abs(float(np.linalg.det(a[:3, :3]))) / 1000.0


def false_positive_ml(score, brain, threshold, affine) -> float:
    """Brain volume (ml) with ``score > threshold``: on a healthy subject every such voxel is a false alarm."""
    flagged = int(np.count_nonzero(_in_brain(score, brain) > _as_threshold(threshold)))
    return flagged * voxel_volume_ml(affine)


def _recon_number(record, key: str, source):
    value = record.get(key) if isinstance(record, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(source, f"reconstruction record needs a number {key!r}, got {value!r}")
    return value


def _ratio(num, den) -> float | None:
    return None if num is None or den is None or den == 0 else float(num / den)


def reconstruction_figures(records, source="recon") -> dict:
    """Pooled reconstruction quality (threshold-free: did the model learn healthy anatomy?).

    ``records``: the subjects' ``recon`` dicts (see :data:`RECON_FIELDS`). Sums pool first, so
    every voxel / slice weighs the same. A missing record (None: an index from before the score
    stage wrote them) makes every figure None rather than a mean over a subset.
    """
    records = list(records)
    if not records or any(r is None for r in records):
        return {key: None for key in ("healthy_residual", "tumour_residual", "residual_ratio", "psnr", "ssim",
                                      "healthy_voxels", "tumour_voxels", "healthy_slices")}
    total = {key: sum(_recon_number(r, key, source) for r in records) for key in RECON_FIELDS}
    healthy = _ratio(total["healthy_residual_sum"], total["healthy_voxels"])
    tumour = _ratio(total["tumour_residual_sum"], total["tumour_voxels"])
    return {"healthy_residual": healthy, "tumour_residual": tumour, "residual_ratio": _ratio(tumour, healthy),
            "psnr": _ratio(total["psnr_sum"], total["healthy_slices"]),
            "ssim": _ratio(total["ssim_sum"], total["healthy_slices"]),
            **{key: int(total[key]) for key in ("healthy_voxels", "tumour_voxels", "healthy_slices")}}


# ----------------------------------------------------------------------------- bootstrap machinery


def _resample(n_subjects: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_subjects) subject indices drawn with replacement; one seed, one draw."""
    return np.random.default_rng(seed).integers(0, n_subjects, size=(n_boot, n_subjects))


def _weights(idx: np.ndarray, n_subjects: int) -> np.ndarray:
    """How often each subject was drawn, per replicate: (replicates, n_subjects) float64."""
    rows = idx.shape[0]
    flat = (idx + n_subjects * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n_subjects).reshape(rows, n_subjects).astype(np.float64)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval, dropping replicates where the metric is undefined (NaN)."""
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        raise InputError("labels", "the metric is undefined in every bootstrap replicate")
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(stat, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 n_subjects: int | None = None) -> tuple[float, float]:
    """Percentile CI from resampling subjects with replacement.

    ``stat`` is either per-subject values (the replicate is their mean) or a callable taking an
    array of resampled subject indices (repeats included) and returning the metric recomputed over
    the pooled voxels of those subjects; then ``n_subjects`` is required. NaN replicates are dropped.
    """
    _check_boot(n_boot, alpha)
    if callable(stat):
        if not isinstance(n_subjects, numbers.Integral) or n_subjects < 1:
            raise InputError("n_subjects", "a positive n_subjects is needed when the statistic is a callable")
        values = np.array([float(stat(row)) for row in _resample(int(n_subjects), n_boot, seed)])
    else:
        per_subject = np.asarray(stat, dtype=np.float64).ravel()
        if per_subject.size == 0 or not np.all(np.isfinite(per_subject)):
            raise InputError("values", "per-subject values must be a non-empty array of finite numbers")
        values = per_subject[_resample(per_subject.size, n_boot, seed)].mean(axis=1)
    return _percentile_ci(values, alpha)


def _binned_auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC per row of pooled (replicates, bins) counts, bins ascending, ties within a bin halved."""
    neg_below = np.cumsum(neg, axis=1) - neg
    twice_u = np.einsum("rb,rb->r", pos, 2 * neg_below + neg)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    ok = (n_pos > 0) & (n_neg > 0)
    return np.where(ok, twice_u / np.where(ok, 2 * n_pos * n_neg, 1), np.nan)


def _binned_auprc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision per row of pooled (replicates, bins) counts, one step per bin."""
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
    called = tp + np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    n_pos = tp[:, 0]
    return np.where(n_pos > 0, np.einsum("rb,rb->r", pos, precision) / np.where(n_pos > 0, n_pos, 1), np.nan)


def _check_metric(metric: str, threshold) -> None:
    if metric not in METRICS:
        raise InputError("metric", f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "dice" and threshold is None:
        raise InputError("threshold", "the 'dice' metric needs the threshold chosen on validation subjects")


def _replicates(acc: ScoreAccumulator, metric: str, idx: np.ndarray, threshold, n_bins: int) -> np.ndarray:
    """Metric over the pooled voxels of each resample (rows of ``idx``, acc's subject order)."""
    if metric == "dice":
        tp, pred, pos = acc._dice_table(threshold)
        w = _weights(idx, len(acc))
        num, den = w @ (2.0 * tp), w @ (pred + pos).astype(np.float64)
        return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
    binned = acc.histograms(n_bins)
    hist_pos, hist_neg = binned.pos.astype(np.float64), binned.neg.astype(np.float64)
    fn = _binned_auroc if metric == "auroc" else _binned_auprc
    out = []
    for a in range(0, idx.shape[0], _BOOT_BATCH):
        w = _weights(idx[a:a + _BOOT_BATCH], len(acc))
        out.append(fn(w @ hist_pos, w @ hist_neg))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- accumulator


@dataclass(frozen=True)
class BinnedScores:
    """Per-subject score histograms: bin ``i`` holds scores in ``[edges[i], edges[i+1])`` (last: ``>= edges[-1]``)."""

    edges: np.ndarray  # (bins,) ascending, edges[0] = smallest pooled score
    pos: np.ndarray  # (subjects, bins) int64 tumour voxels
    neg: np.ndarray  # (subjects, bins) int64 healthy voxels


class ScoreAccumulator:
    """Brain-voxel scores and labels collected subject by subject, evaluated pooled.

    Scores are stored as float32 (the anomaly maps are float32; 5 B/voxel with the labels).
    Pooled metrics need one extra 4 B/voxel while they sort; results and histograms are cached
    until the next :meth:`add`.
    """

    def __init__(self) -> None:
        self._scores: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._cache: dict = {}

    def add(self, subject: str, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add one subject's flattened brain-voxel scores (float) and labels (bool); copies them."""
        if subject in self._scores:
            raise InputError(subject, "subject added twice")
        s, lab = _check_pair(scores, labels)
        # astype copies; float64 scores beyond float32's range become inf and are refused.
        self._scores[subject] = _as_scores(s.astype(np.float32))
        self._labels[subject] = np.array(lab, dtype=bool)
        self._cache.clear()

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, subject) -> bool:
        return subject in self._scores

    @property
    def n_voxels(self) -> int:
        return sum(s.size for s in self._scores.values())

    @property
    def n_positive(self) -> int:
        return sum(int(np.count_nonzero(lab)) for lab in self._labels.values())

    def _need_subjects(self) -> None:
        if not self._scores:
            raise InputError("subjects", "no subject was added")

    def _pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self._scores[s], self._labels[s]) for s in self._scores]

    def _split(self) -> _Split:
        self._need_subjects()
        return _split_sorted(self._pairs())

    def _exact(self) -> tuple[_Exact, float]:
        """Exact pooled metrics and best threshold; the same sort also fixes the default bin edges."""
        if "exact" not in self._cache:
            split = self._split()
            _need_both_classes(split)
            exact = _scan(split)
            self._cache["exact"] = exact, _threshold_below(split, exact.best_value)
            self._cache[("edges", DEFAULT_BINS)] = _quantile_edges(split, DEFAULT_BINS)
        return self._cache["exact"]

    def auroc(self) -> float:
        return self._exact()[0].auroc

    def auprc(self) -> float:
        return self._exact()[0].auprc

    def best_dice(self) -> tuple[float, float]:
        exact, threshold = self._exact()
        return exact.best_dice, threshold

    def _dice_table(self, threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per subject (true positives, predicted positives, positives) at ``threshold``."""
        threshold = _as_threshold(threshold)
        key = ("dice", threshold)
        if key not in self._cache:
            self._need_subjects()
            rows = np.array([_dice_counts(s, lab, threshold) for s, lab in self._pairs()], dtype=np.int64)
            self._cache[key] = rows[:, 0], rows[:, 1], rows[:, 2]
        return self._cache[key]

    def dice(self, threshold) -> float:
        """Dice of ``scores > threshold`` over the pooled voxels of all subjects."""
        tp, pred, pos = self._dice_table(threshold)
        return _dice(int(tp.sum()), int(pred.sum()), int(pos.sum()))

    def per_subject_dice(self, threshold) -> dict[str, float]:
        tp, pred, pos = self._dice_table(threshold)
        return {s: _dice(*row) for s, row in zip(self._scores, zip(tp.tolist(), pred.tolist(), pos.tolist()))}

    def summary(self, threshold=None) -> dict:
        """Exact pooled metrics; with ``threshold`` (chosen on validation) also Dice and mean per-subject Dice."""
        exact, best_threshold = self._exact()
        out = {"subjects": len(self), "voxels": self.n_voxels, "positives": self.n_positive,
               "auroc": exact.auroc, "auprc": exact.auprc,
               "best_dice": exact.best_dice, "best_threshold": best_threshold}
        if threshold is not None:
            out["threshold"] = _as_threshold(threshold)
            out["dice"] = self.dice(threshold)
            out["mean_subject_dice"] = float(np.mean(list(self.per_subject_dice(threshold).values())))
        return out

    def curves(self, max_points: int = 2000) -> dict[str, np.ndarray]:
        """ROC and PR curve points over the pooled voxels (downsampled for plotting)."""
        pairs = self._pairs()
        return roc_pr_curves(np.concatenate([s for s, _ in pairs]), np.concatenate([lab for _, lab in pairs]),
                             max_points)

    def histograms(self, n_bins: int = DEFAULT_BINS) -> BinnedScores:
        """Per-subject (positive, negative) histograms over shared quantile-spaced bins; cached."""
        if not isinstance(n_bins, numbers.Integral) or n_bins < 2:
            raise InputError("n_bins", f"n_bins must be an integer >= 2, got {n_bins!r}")
        key = ("hist", int(n_bins))
        if key not in self._cache:
            edges_key = ("edges", int(n_bins))
            if edges_key not in self._cache:
                self._cache[edges_key] = _quantile_edges(self._split(), int(n_bins))
            edges = self._cache[edges_key]
            counts = [_subject_histogram(s, lab, edges) for s, lab in self._pairs()]
            self._cache[key] = BinnedScores(edges, np.stack([c[0] for c in counts]), np.stack([c[1] for c in counts]))
        return self._cache[key]

    def point(self, metric: str, threshold=None) -> float:
        """Exact pooled value of ``metric`` (``dice`` at ``threshold``)."""
        _check_metric(metric, threshold)
        return self.dice(threshold) if metric == "dice" else getattr(self, metric)()

    def bootstrap(self, metrics: Iterable[str] = METRICS, threshold=None, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05, n_bins: int = DEFAULT_BINS) -> dict[str, tuple[float, float]]:
        """Patient-level percentile CIs: subjects resampled with replacement, metric over pooled voxels.

        AUROC / AUPRC replicates use binned scores (see the module docstring); Dice is exact.
        ``threshold`` is needed for ``dice``. Every metric sees the same resamples.
        """
        metrics = tuple(metrics)
        for name in metrics:
            _check_metric(name, threshold)
        _check_boot(n_boot, alpha)
        self._need_subjects()
        idx = _resample(len(self), n_boot, seed)
        return {name: _percentile_ci(_replicates(self, name, idx, threshold, n_bins), alpha) for name in metrics}


def _quantile_edges(split: _Split, n_bins: int) -> np.ndarray:
    """Bin edges at evenly spaced ranks of the positive and of the negative scores (<= n_bins)."""
    parts = [arr[_even_ranks(arr.size, n_bins // 2)] for arr in (split.pos, split.neg) if arr.size]
    return np.unique(np.concatenate(parts))


def _subject_histogram(scores: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) counts per bin: sort the subject once, then one binary search per edge.

    ~20x faster than a binary search per voxel; edges[0] is the pooled minimum, so nothing falls below.
    """
    split = _split_sorted([(scores, labels)])
    return tuple(np.diff(np.append(np.searchsorted(arr, edges, side="left"), arr.size)).astype(np.int64)
                 for arr in (split.pos, split.neg))


def per_subject_dice(acc: ScoreAccumulator, threshold) -> dict[str, float]:
    """Dice of ``scores > threshold`` for each subject of ``acc`` (1.0 when both masks are empty)."""
    return acc.per_subject_dice(threshold)


# ----------------------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class PairedResult:
    """Method A minus method B over the same subjects."""

    metric: str
    difference: float  # exact point estimate
    low: float  # percentile CI of the difference
    high: float
    p_value: float  # two-sided, H0: difference == 0


def _subject_map(acc_a: ScoreAccumulator, acc_b: ScoreAccumulator) -> np.ndarray:
    """For each of A's subjects, its index in B; both must hold the same subjects and labels."""
    only_a, only_b = set(acc_a.subjects) - set(acc_b.subjects), set(acc_b.subjects) - set(acc_a.subjects)
    if only_a or only_b or not len(acc_a):
        raise InputError("subjects", "the two methods must be evaluated on the same non-empty subject set; "
                         f"only in A: {sorted(only_a)[:5]}, only in B: {sorted(only_b)[:5]}")
    for s in acc_a.subjects:
        if not np.array_equal(acc_a._labels[s], acc_b._labels[s]):
            raise InputError(s, "labels differ between the two methods (different brain masks?)")
    where_b = {s: i for i, s in enumerate(acc_b.subjects)}
    return np.array([where_b[s] for s in acc_a.subjects], dtype=np.int64)


def _thresholds_pair(thresholds) -> tuple:
    if thresholds is None or isinstance(thresholds, numbers.Real):
        return thresholds, thresholds
    if len(thresholds) != 2:
        raise InputError("threshold", "give one threshold or a (method A, method B) pair")
    return tuple(thresholds)


def paired_bootstrap(acc_a: ScoreAccumulator, acc_b: ScoreAccumulator, metric: str = "auroc",
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, thresholds=None,
                     n_bins: int = DEFAULT_BINS) -> PairedResult:
    """Paired patient-level bootstrap of ``metric(A) - metric(B)``: each replicate resamples the
    same subjects for both methods. ``thresholds``: one value or (A, B), each chosen on validation.

    p-value: twice the smaller share of replicate differences on either side of zero (with the
    usual +1 correction), i.e. the level at which the percentile interval starts to exclude 0.
    """
    t_a, t_b = _thresholds_pair(thresholds)
    _check_metric(metric, t_a)
    _check_metric(metric, t_b)
    _check_boot(n_boot, alpha)
    a_to_b = _subject_map(acc_a, acc_b)
    idx = _resample(len(acc_a), n_boot, seed)
    diff = _replicates(acc_a, metric, idx, t_a, n_bins) - _replicates(acc_b, metric, a_to_b[idx], t_b, n_bins)
    low, high = _percentile_ci(diff, alpha)
    diff = diff[~np.isnan(diff)]
    tail = min(np.count_nonzero(diff <= 0), np.count_nonzero(diff >= 0))
    p_value = min(1.0, 2.0 * (1 + tail) / (1 + diff.size))
    return PairedResult(metric, acc_a.point(metric, t_a) - acc_b.point(metric, t_b), low, high, p_value)


def paired_bootstrap_pvalue(acc_a: ScoreAccumulator, acc_b: ScoreAccumulator, metric: str = "auroc",
                            n_boot: int = 1000, seed: int = 0, thresholds=None) -> float:
    """Two-sided p-value that ``metric`` differs between methods A and B (see :func:`paired_bootstrap`)."""
    return paired_bootstrap(acc_a, acc_b, metric, n_boot=n_boot, seed=seed, thresholds=thresholds).p_value
