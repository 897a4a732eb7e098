"""Exact pixel metrics over brain voxels (AUROC / AUPRC / Dice) and the per-slice and per-subject figures.

Protocol (docs/design.md, "Evaluation protocol"): pixel AUROC and AUPRC over the brain voxels of
all test subjects, Dice at a threshold chosen on validation subjects (``best_dice(...)[1]`` on
validation, the honest number) next to the best Dice over thresholds on test (:func:`best_dice`,
the oracle number), per-subject Dice, slice-level AUROC and patient-level bootstrap intervals
(:mod:`pipeline.pooled`); beside them the figures pixel AUROC hides: subject-level detection
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
:class:`pipeline.pooled.ScoreAccumulator` runs the same exact scan over many subjects at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .common import is_int, is_real
from .errors import InputError

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


def _check_percentile(percentile) -> None:
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


def auroc(scores, labels) -> float:
    """Exact pixel AUROC, equal to ``sklearn.metrics.roc_auc_score`` (ties count one half)."""
    split = sort_split([check_pair(scores, labels)])
    require_both_classes(split)
    return exact_scan(split).auroc


def auprc(scores, labels) -> float:
    """Exact average precision, equal to ``sklearn.metrics.average_precision_score``."""
    split = sort_split([check_pair(scores, labels)])
    _need_positives(split)
    return exact_scan(split).auprc


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


# ----------------------------------------------------------------------------- slice level


def slice_scores(volume_scores, brain_mask, percentile: float = 99.0) -> np.ndarray:
    """Per axial slice (last axis), a high percentile of the in-brain anomaly map; 0 without brain.

    A percentile rather than the maximum, so a single noisy voxel does not flag a slice.
    """
    vol, mask = np.asarray(volume_scores), np.asarray(brain_mask, dtype=bool)  # float64 per slice, not per volume
    if vol.ndim != 3:
        raise InputError("scores", f"volume scores must be 3D (H, W, D), got shape {vol.shape}")
    if mask.shape != vol.shape:
        raise InputError("brain_mask", f"shape {mask.shape} does not match the scores' shape {vol.shape}")
    _check_percentile(percentile)
    out = np.zeros(vol.shape[2])
    for d in range(vol.shape[2]):
        inside = vol[:, :, d][mask[:, :, d]].astype(np.float64)
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
    flagged = int(np.count_nonzero(_in_brain(score, brain) > check_threshold(threshold)))
    return flagged * voxel_volume_ml(affine)


def _recon_number(record, key: str, source):
    value = record.get(key) if isinstance(record, Mapping) else None
    if not is_real(value, finite=False):
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


