"""Exact pixel metrics over brain voxels (AUROC / AUPRC / Dice); per-slice and per-subject figures are in
:mod:`pipeline.evaluation.subject_metrics`.

Protocol (docs/design.md, "Evaluation protocol"): pixel AUROC and AUPRC over the brain voxels of
all test subjects, Dice at a threshold chosen on validation subjects (``best_dice(...)[1]`` on
validation, the honest number) next to the best Dice over thresholds on test (:func:`best_dice`,
the oracle number), per-subject Dice, slice-level AUROC and patient-level bootstrap intervals
(:mod:`pipeline.evaluation.pooled`); beside them the figures pixel AUROC hides: subject-level detection
AUROC, false-positive volume on healthy subjects and pooled reconstruction quality.

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

The building blocks (:func:`check_pair`, :func:`sort_split`, :func:`exact_scan`,
:func:`threshold_below`, :func:`dice_counts`, :func:`split_curves`) are public because
:class:`pipeline.evaluation.pooled.ScoreAccumulator` runs the same exact scan over many subjects at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.common import is_int, is_real
from pipeline.errors import InputError

CHUNK = 1 << 22
"""Voxels (or positives) handled at once: bounds temporaries to a few tens of MB."""

GROUP_CHUNK = 1 << 20
"""Positives per tie-group table: ~8 int64/float64 arrays of this length live at once (~64 MB)."""

METRICS = ("auroc", "auprc", "dice")
"""The pooled metrics with point estimates and bootstrap intervals (leaderboard columns)."""


# ----------------------------------------------------------------------------- input checks


def check_pair(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores (float32 / float64, finite) and flat bool labels of the same shape."""
    s, lab = np.asarray(scores), np.asarray(labels)
    if s.shape != lab.shape:
        raise InputError("labels", f"shape {lab.shape} does not match the scores' shape {s.shape}")
    if s.size == 0:
        raise InputError("scores", "no voxels to evaluate")
    return check_scores(s), _as_labels(lab)


def check_scores(arr: np.ndarray) -> np.ndarray:
    """Flat float32 / float64 view of real, finite scores (other real dtypes become float64)."""
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


def check_threshold(threshold) -> float:
    """A real, non-NaN threshold as a Python float (compared as NumPy compares a float to the scores)."""
    if not is_real(threshold, finite=False) or math.isnan(threshold):
        raise InputError("threshold", f"threshold must be a real number, got {threshold!r}")
    return float(threshold)


def check_percentile(percentile) -> None:
    if not is_real(percentile) or not 0 <= percentile <= 100:
        raise InputError("percentile", f"percentile must lie in [0, 100], got {percentile!r}")


# ----------------------------------------------------------------------------- sorted split


@dataclass(frozen=True)
class SortedSplit:
    """Scores of positive and of negative voxels, each sorted ascending."""

    pos: np.ndarray
    neg: np.ndarray

    @property
    def n_pos(self) -> int:
        return self.pos.size

    @property
    def n_neg(self) -> int:
        return self.neg.size


def sort_split(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> SortedSplit:
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
    return SortedSplit(pos, neg)


def require_both_classes(split: SortedSplit) -> None:
    if split.n_pos == 0 or split.n_neg == 0:
        which = "positive (tumour)" if split.n_pos == 0 else "negative (healthy)"
        raise InputError("labels", f"labels contain no {which} voxel: AUROC is undefined for one class")


def _need_positives(split: SortedSplit) -> None:
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


def _positive_groups(split: SortedSplit) -> Iterator[_Groups]:
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
class ExactScan:
    auroc: float  # NaN without negatives
    auprc: float
    best_dice: float
    best_value: float  # predicting scores >= best_value gives best_dice


def exact_scan(split: SortedSplit) -> ExactScan:
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
    return ExactScan(auroc=auroc_, auprc=ap / n_pos, best_dice=best, best_value=best_value)


def threshold_below(split: SortedSplit, value) -> float:
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


def _best(split: SortedSplit) -> tuple[float, float]:
    if split.n_pos == 0:  # predicting nothing is perfect: scores > max(scores) is empty
        return 1.0, float(split.neg[-1])
    exact = exact_scan(split)
    return exact.best_dice, threshold_below(split, exact.best_value)


# ----------------------------------------------------------------------------- public pixel metrics


def _scan(scores, labels, require) -> ExactScan:
    """The exact scan of one score/label pair, after ``require`` checked the classes it needs."""
    split = sort_split([check_pair(scores, labels)])
    require(split)
    return exact_scan(split)


def auroc(scores, labels) -> float:
    """Exact pixel AUROC, equal to ``sklearn.metrics.roc_auc_score`` (ties count one half)."""
    return _scan(scores, labels, require_both_classes).auroc


def auprc(scores, labels) -> float:
    """Exact average precision, equal to ``sklearn.metrics.average_precision_score``."""
    return _scan(scores, labels, _need_positives).auprc


def best_dice(scores, labels) -> tuple[float, float]:
    """(best Dice over all thresholds, threshold t giving it via ``scores > t``), exact, one sort.

    Among equal maxima the highest threshold wins. Without positives, Dice 1.0 at ``max(scores)``.
    On test this is the oracle number; the honest one applies the threshold found on validation.
    """
    return _best(sort_split([check_pair(scores, labels)]))


def pixel_metrics(scores, labels) -> dict[str, float]:
    """AUROC, AUPRC, best Dice and its threshold from a single sort (cheapest on 10^8 voxels)."""
    split = sort_split([check_pair(scores, labels)])
    require_both_classes(split)
    exact = exact_scan(split)
    return {"auroc": exact.auroc, "auprc": exact.auprc, "best_dice": exact.best_dice,
            "best_threshold": threshold_below(split, exact.best_value)}


def dice_counts(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(true positives, predicted positives, positives) of ``scores > threshold``, chunked."""
    tp = pred = 0
    for a in range(0, scores.size, CHUNK):
        hit = scores[a:a + CHUNK] > threshold
        pred += int(np.count_nonzero(hit))
        tp += int(np.count_nonzero(hit & labels[a:a + CHUNK]))
    return tp, pred, int(np.count_nonzero(labels))


def dice_from_counts(tp, pred, pos) -> float:
    """Dice ``2TP / (predicted + positives)``; 1.0 when both masks are empty."""
    return 1.0 if pred + pos == 0 else 2.0 * tp / (pred + pos)


def roc_pr_curves(scores, labels, max_points: int = 2000) -> dict[str, np.ndarray]:
    """ROC and PR curve points for plotting, exact points at up to ``max_points`` thresholds.

    Thresholds are taken at evenly spaced ranks among the positive and among the negative scores,
    so both the FPR and the recall axis are covered. Arrays share one length; entry 0 is the
    threshold +inf (fpr = tpr = recall = 0, precision = 1, as scikit-learn's PR curve ends).
    Thresholds decrease; a point predicts ``scores >= threshold``.
    """
    _check_max_points(max_points)
    return split_curves(sort_split([check_pair(scores, labels)]), max_points)


def _check_max_points(max_points) -> None:
    if not is_int(max_points) or max_points < 2:
        raise InputError("max_points", f"max_points must be an integer >= 2, got {max_points!r}")


def split_curves(split: SortedSplit, max_points: int = 2000) -> dict[str, np.ndarray]:
    """:func:`roc_pr_curves` of already sorted scores (no second copy of pooled voxels)."""
    _check_max_points(max_points)
    require_both_classes(split)
    cand = np.unique(np.concatenate([arr[even_ranks(arr.size, max_points // 2)]
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


def even_ranks(size: int, count: int) -> np.ndarray:
    """About ``count`` evenly spaced indices into a sorted array of ``size`` (ends included)."""
    return np.unique(np.linspace(0, size - 1, max(count, 2)).round().astype(np.int64))
