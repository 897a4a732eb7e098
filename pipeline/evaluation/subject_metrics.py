"""Per-slice and per-subject figures beside the voxel metrics: what pixel AUROC hides.

Slice scores and labels (slice-level AUROC), one score per subject (subject-level detection AUROC),
false-positive volume on healthy subjects and pooled reconstruction quality. The exact voxel metrics
they build on are in :mod:`pipeline.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from pipeline.common import is_real
from pipeline.errors import InputError
from pipeline.evaluation.metrics import auroc, check_percentile, check_threshold


def slice_scores(volume_scores, brain_mask, percentile: float = 99.0) -> np.ndarray:
    """Per axial slice (last axis), a high percentile of the in-brain anomaly map; 0 without brain.

    A percentile rather than the maximum, so a single noisy voxel does not flag a slice.
    """
    vol, mask = np.asarray(volume_scores), np.asarray(brain_mask, dtype=bool)  # float64 per slice, not per volume
    if vol.ndim != 3:
        raise InputError("scores", f"volume scores must be 3D (H, W, D), got shape {vol.shape}")
    if mask.shape != vol.shape:
        raise InputError("brain_mask", f"shape {mask.shape} does not match the scores' shape {vol.shape}")
    check_percentile(percentile)
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
    check_percentile(percentile)
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
