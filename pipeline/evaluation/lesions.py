"""Per-lesion figures: which ground-truth lesions a thresholded map finds, by size, and how many
false-positive lesions it raises.

Why. Voxel metrics (AUROC, AUPRC, Dice) are dominated by the largest tumours: a map that outlines
big tumours and misses every small one still scores well there, and so does one that adds many
small false alarms. Counting lesions -- connected components -- makes both visible.

Definitions (all inside the brain mask, at one threshold, on the original grid):

* ground-truth lesion: a 3D connected component of ``label > 0`` (26-connectivity: voxels that
  touch by a face, an edge or a corner belong together);
* predicted lesion: a connected component of ``score > threshold`` (the same strict ``>`` as the
  Dice of :func:`pipeline.evaluation.metrics.dice_counts`, so the mask on disk is what is counted);
* detected: a ground-truth lesion with at least one predicted voxel ("any overlap", as in BraTS
  lesion-wise evaluation); ``min_overlap`` > 0 asks for that fraction of the lesion's voxels instead;
* false-positive lesion: a predicted lesion that touches no ground-truth voxel;
* size bins by lesion volume (ml, from the affine): see :data:`SIZE_BINS_ML`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.common import is_real
from pipeline.errors import InputError
from pipeline.evaluation.metrics import check_threshold

SMALL_BELOW_ML = 1.0
"""A lesion under 1 ml is "small" (a 1 ml sphere is ~12 mm across): what a screening read must not miss."""
LARGE_FROM_ML = 10.0
"""A lesion of 10 ml or more (a sphere ~27 mm across) is "large"; in between is "medium"."""
SIZE_BINS_ML = {"small": (0.0, SMALL_BELOW_ML), "medium": (SMALL_BELOW_ML, LARGE_FROM_ML),
                "large": (LARGE_FROM_ML, None)}
"""Bin -> [lower, upper) volume in ml (None: no upper bound)."""
SIZE_BINS = tuple(SIZE_BINS_ML)
ALL = "all"
"""The key of the totals over every bin."""

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
"""26-connectivity: a tumour that narrows to a diagonal bridge between slices is still one lesion."""
VOLUME_DECIMALS = 9
"""Lesion volumes are rounded to 1e-9 ml before binning, so 1000 voxels of 1 mm^3 are exactly 1 ml."""

CRITERION = ("a ground-truth lesion (26-connected component of label > 0 in the brain) is detected when at least "
             "{what} of its voxels has score > threshold; a predicted lesion touching no ground-truth voxel is a "
             "false positive")


def size_bin(volume_ml: float) -> str:
    """The bin of a lesion volume in ml (see :data:`SIZE_BINS_ML`)."""
    volume = round(float(volume_ml), VOLUME_DECIMALS)
    return "small" if volume < SMALL_BELOW_ML else "medium" if volume < LARGE_FROM_ML else "large"


def components(mask) -> tuple[np.ndarray, int]:
    """(component index per voxel, 0 outside; number of components) of a 3D boolean mask, 26-connected."""
    return ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)


@dataclass(frozen=True)
class SubjectLesions:
    """One subject's lesion counts at one threshold; small enough to keep for every subject."""

    lesions: dict[str, int]  # ground-truth lesions per size bin
    detected: dict[str, int]  # of those, detected
    false_positive_lesions: int
    false_positive_ml: float  # total volume of the false-positive lesions

    def as_dict(self) -> dict:
        """The subject's entry under ``lesions.per_subject`` in metrics.json."""
        return {"lesions": dict(self.lesions), "detected": dict(self.detected),
                "false_positive_lesions": self.false_positive_lesions, "false_positive_ml": self.false_positive_ml}


def csv_columns(entry: Mapping) -> dict:
    """Flat per_subject.csv columns of one :meth:`SubjectLesions.as_dict` entry: ``lesions_<bin>``,
    ``detected_<bin>``, ``false_positive_lesions``, ``false_positive_lesion_ml``."""
    return {**{f"lesions_{b}": entry["lesions"][b] for b in SIZE_BINS},
            **{f"detected_{b}": entry["detected"][b] for b in SIZE_BINS},
            "false_positive_lesions": entry["false_positive_lesions"],
            "false_positive_lesion_ml": entry["false_positive_ml"]}


def _check_volumes(score, label, brain) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three 3D arrays of one shape (the brain mask and label as booleans)."""
    score, label, brain = np.asarray(score), np.asarray(label), np.asarray(brain)
    if score.ndim != 3:
        raise InputError("scores", f"the anomaly map must be 3D (H, W, D), got shape {score.shape}")
    for name, arr in (("labels", label), ("brain_mask", brain)):
        if arr.shape != score.shape:
            raise InputError(name, f"shape {arr.shape} does not match the scores' shape {score.shape}")
    return score, label > 0, brain.astype(bool)


def _check_fraction(voxel_ml, min_overlap) -> None:
    if not is_real(voxel_ml) or voxel_ml <= 0:
        raise InputError("voxel_ml", f"voxel volume must be a positive number of ml, got {voxel_ml!r}")
    if not is_real(min_overlap) or not 0 <= min_overlap <= 1:
        raise InputError("min_overlap", f"min_overlap must lie in [0, 1], got {min_overlap!r}")


def _box(brain: np.ndarray) -> tuple[slice, ...]:
    """The brain's bounding box: nothing outside it counts, and it is typically well under half a BraTS volume."""
    spans = []
    for axis in range(brain.ndim):
        hit = np.flatnonzero(brain.any(axis=tuple(a for a in range(brain.ndim) if a != axis)))
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(spans)


def subject_lesions(score, label, brain, threshold, voxel_ml: float, min_overlap: float = 0.0) -> SubjectLesions:
    """Lesion counts of one subject at ``threshold`` (see the module docstring for the definitions).

    ``voxel_ml``: :func:`pipeline.evaluation.subject_metrics.voxel_volume_ml` of the map's affine.
    ``min_overlap`` 0 (default): any predicted voxel detects a lesion; ``f`` > 0: at least that
    fraction of its voxels must be predicted (a lesion so grazed is then neither found nor a false positive).
    """
    score, tumour, brain = _check_volumes(score, label, brain)
    threshold = check_threshold(threshold)
    _check_fraction(voxel_ml, min_overlap)
    box = _box(brain)
    score, tumour, brain = score[box], tumour[box], brain[box]
    predicted = (score > threshold) & brain
    tumour = tumour & brain
    truth, n_truth = components(tumour)
    sizes = np.bincount(truth[tumour], minlength=n_truth + 1)[1:]  # over the few lesion voxels, not the volume
    hits = np.bincount(truth[predicted], minlength=n_truth + 1)[1:]
    found = (hits > 0) & (hits >= min_overlap * sizes)
    bins = [size_bin(n * voxel_ml) for n in sizes.tolist()]
    lesions = {b: bins.count(b) for b in SIZE_BINS}
    detected = {b: sum(1 for k, f in zip(bins, found.tolist()) if f and k == b) for b in SIZE_BINS}
    blobs, n_blobs = components(predicted)
    touching = np.zeros(n_blobs + 1, dtype=bool)
    touching[blobs[predicted & tumour]] = True
    blob_sizes = np.bincount(blobs[predicted], minlength=n_blobs + 1)
    false = ~touching[1:]
    return SubjectLesions(lesions, detected, int(false.sum()), float(blob_sizes[1:][false].sum()) * voxel_ml)


@dataclass(frozen=True)
class PackedBrain:
    """A brain mask at 1 bit per voxel: with a subject's pooled brain-voxel scores and labels (what a
    :class:`~pipeline.evaluation.pooled.ScoreAccumulator` keeps) it rebuilds the volumes lesion
    counting needs, for a threshold fixed only after the subject's volumes were released."""

    bits: np.ndarray
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, brain) -> PackedBrain:
        brain = np.asarray(brain, dtype=bool)
        return cls(np.packbits(brain.ravel()), brain.shape)

    def unpack(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).reshape(self.shape).astype(bool)


def lesions_from_brain_voxels(scores, labels, brain: PackedBrain, threshold, voxel_ml: float,
                              min_overlap: float = 0.0) -> SubjectLesions:
    """:func:`subject_lesions` from the in-brain scores and labels (``volume[brain]`` order) and the mask."""
    mask = brain.unpack()
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=bool)
    if scores.shape != (int(mask.sum()),) or labels.shape != scores.shape:
        raise InputError("brain_mask", f"{int(mask.sum())} brain voxels, but {scores.shape} scores and "
                                       f"{labels.shape} labels")
    score = np.zeros(mask.shape, dtype=scores.dtype)
    score[mask] = scores
    tumour = np.zeros(mask.shape, dtype=bool)
    tumour[mask] = labels
    return subject_lesions(score, tumour, mask, threshold, voxel_ml, min_overlap)


def _rate(found: int, total: int) -> float | None:
    return found / total if total else None


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def pool_lesions(per_subject: Mapping[str, SubjectLesions], threshold, healthy: Iterable[str] | None = None,
                 min_overlap: float = 0.0) -> dict:
    """The ``lesions`` block of a metrics.json section: counts and detection rate per size bin and
    over all (rate None where a bin holds no lesion), false-positive lesions per subject, the same
    on ``healthy`` subjects only (default: those without a ground-truth lesion), and per subject.
    ``min_overlap``: the one the counts were made with (recorded in the block, not applied here)."""
    if not per_subject:
        raise InputError("subjects", "no subject to pool lesion counts over")
    healthy = ({n for n, s in per_subject.items() if not sum(s.lesions.values())} if healthy is None
               else set(healthy) & set(per_subject))
    lesions = {b: sum(s.lesions[b] for s in per_subject.values()) for b in SIZE_BINS}
    detected = {b: sum(s.detected[b] for s in per_subject.values()) for b in SIZE_BINS}
    lesions[ALL], detected[ALL] = sum(lesions.values()), sum(detected.values())
    fp = [s.false_positive_lesions for s in per_subject.values()]
    fp_ml = [s.false_positive_ml for s in per_subject.values()]
    healthy_fp = [per_subject[n].false_positive_lesions for n in sorted(healthy)]
    healthy_ml = [per_subject[n].false_positive_ml for n in sorted(healthy)]
    return {
        "criterion": CRITERION.format(what="one" if min_overlap == 0 else f"a fraction {min_overlap:g}"),
        "threshold": check_threshold(threshold), "min_overlap": min_overlap, "connectivity": 26,
        "size_bins_ml": {b: list(edges) for b, edges in SIZE_BINS_ML.items()},
        "lesions": lesions, "detected": detected,
        "detection_rate": {b: _rate(detected[b], lesions[b]) for b in lesions},
        "subjects": len(per_subject), "false_positive_lesions": int(sum(fp)),
        "false_positive_lesions_per_subject": _mean(fp), "false_positive_ml_per_subject": _mean(fp_ml),
        "healthy": {"subjects": len(healthy), "false_positive_lesions_per_subject": _mean(healthy_fp),
                    "false_positive_ml_per_subject": _mean(healthy_ml)},
        "per_subject": {n: s.as_dict() for n, s in per_subject.items()},
    }


class LesionCounter:
    """Per-subject lesion counts of one evaluated section, filled a subject at a time while streaming.

    With the threshold known before the section is read (test: validation chose it) each subject
    is counted while its volumes are in memory and nothing else is kept. Otherwise (validation: its
    own pooled voxels choose the threshold) only a 1-bit brain mask per subject is kept (~1 MB at
    240x240x155) and :meth:`pooled` rebuilds each subject from the section's pooled brain voxels.
    """

    def __init__(self, threshold=None) -> None:
        self.threshold = None if threshold is None else check_threshold(threshold)
        self.counts: dict[str, SubjectLesions] = {}
        self._brains: dict[str, tuple[PackedBrain, float]] = {}

    def add(self, name: str, volumes: Mapping, voxel_ml: float) -> None:
        """One subject's ``score``, ``tumour`` and ``brain`` volumes, as
        :func:`~pipeline.evaluation.evaluate.load_subject_maps` gives them."""
        if self.threshold is None:
            self._brains[name] = PackedBrain.pack(volumes["brain"]), voxel_ml
        else:
            self.counts[name] = subject_lesions(volumes["score"], volumes["tumour"], volumes["brain"],
                                                self.threshold, voxel_ml)

    def pooled(self, threshold, voxels, healthy: Iterable[str] | None = None) -> dict:
        """The section's ``lesions`` block (:func:`pool_lesions`) at ``threshold``; ``voxels``: the section's
        :class:`~pipeline.evaluation.pooled.ScoreAccumulator`, read only where subjects must be rebuilt."""
        threshold = check_threshold(threshold)
        if threshold != self.threshold:
            if self.counts and not self._brains:
                raise InputError("threshold", f"lesions were counted at {self.threshold!r} while streaming, "
                                              f"not at {threshold!r}")
            self.counts = {name: lesions_from_brain_voxels(*voxels.subject(name), brain, threshold, voxel_ml)
                           for name, (brain, voxel_ml) in self._brains.items()}
            self.threshold = threshold
        return pool_lesions(self.counts, threshold, healthy)
