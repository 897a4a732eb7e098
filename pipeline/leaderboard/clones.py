"""Copies and leaks: a row that only re-labels another row's maps, or scores too well to be a method.

The same test maps under another name are caught by :class:`MapsHash` (a hash of their voxel values).

AUROC, AUPRC and Dice at a chosen threshold see only the *order* of a map's values, so any increasing
transform of an existing map (plus 1e-9, times 2, a log) is the same entry to the metrics while its bytes,
and so ``maps_hash``, differ. :class:`RankSample` keeps each row's map values at a fixed set of brain
voxels of every test subject (drawn from the subject name, so every row of a protocol samples the same
voxels; the brain mask comes from the image, not the submitter); a new row whose sample has a Spearman
correlation of at least :data:`CLONE_SPEARMAN` with an earlier row's of the same protocol is refused,
naming that row. Two honest methods differ far more than that: the FLAIR baseline with and without a
3D median of 3, for instance, correlate at about 0.98 on the synthetic test data.

A "method" that is the test label (or a blur of it) ranks first with AUPRC near 1. Rows whose test AUPRC
is at or above the protocol's review ceiling (:data:`REVIEW_CEILING` unless the organiser set one with
``pipeline leaderboard init --review-ceiling``) are shown as ``needs review`` and not ranked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path

SAMPLE_PER_SUBJECT = 2000
"""Brain voxels sampled per test subject (all of them in a smaller brain)."""
CLONE_SPEARMAN = 0.9999
"""Rank correlation at or above which a new row counts as a copy of an earlier one."""
REVIEW_CEILING = 0.99
"""Default test AUPRC at or above which a row is held for review instead of ranked."""
NEEDS_REVIEW = "needs review"


class MapsHash:
    """SHA-256 over the test maps' float32 voxel values by sorted subject name, fed one subject at a
    time while evaluation streams: the same maps under another name or re-encoded in another file
    are the same submission."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._last = None

    def add(self, name: str, data: dict, _threshold: float | None = None) -> None:
        """Hash one subject's map (a :data:`pipeline.evaluation.evaluate.SubjectVisitor`); names must come sorted."""
        if self._last is not None and name <= self._last:
            raise ValueError(f"maps must be hashed in sorted subject order ({name!r} after {self._last!r})")
        score = np.ascontiguousarray(data["score"], dtype=np.float32)
        self._digest.update(f"{name}:{score.shape};".encode())
        self._digest.update(score)
        self._last = name

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _subject_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"rank-sample:{name}".encode()).digest()[:8], "little")


class RankSample:
    """Map values at fixed brain voxels of each test subject, gathered while evaluation streams
    (a :data:`pipeline.evaluation.evaluate.SubjectVisitor`), concatenated in sorted subject order."""

    def __init__(self, per_subject: int = SAMPLE_PER_SUBJECT) -> None:
        self.per_subject = int(per_subject)
        self._parts: dict[str, np.ndarray] = {}

    def add(self, name: str, data: dict, _threshold: float | None = None) -> None:
        inside = np.flatnonzero(np.asarray(data["brain"]).ravel())
        if inside.size > self.per_subject:
            rng = np.random.default_rng(_subject_seed(name))
            inside = np.sort(rng.choice(inside, size=self.per_subject, replace=False))
        self._parts[name] = np.asarray(data["score"], dtype=np.float32).ravel()[inside]

    def values(self) -> np.ndarray:
        return np.concatenate([self._parts[k] for k in sorted(self._parts)]) if self._parts \
            else np.zeros(0, np.float32)


def sample_path(folder: Path, row_id: str) -> Path:
    """``<name>.subjects/<row_id>.ranks.npy`` beside the row's per-subject JSON."""
    return Path(folder) / f"{row_id}.ranks.npy"


def write_sample(folder: Path, row_id: str, values: np.ndarray) -> None:
    with atomic_path(sample_path(folder, row_id), suffix=".npy") as tmp:
        np.save(tmp, np.asarray(values, dtype=np.float32), allow_pickle=False)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two equally long samples; 0 where either is constant (no order to copy)."""
    import warnings

    from scipy.stats import spearmanr

    if a.shape != b.shape or a.size < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: scipy warns and returns NaN
        rho = float(spearmanr(a, b).statistic)
    return 0.0 if np.isnan(rho) else rho


def copied_row(folder: Path, values: np.ndarray, earlier: list[tuple[str, str]]) -> tuple[str, str, float] | None:
    """(row id, method, correlation) of the first earlier row (``(row id, method)`` of the same protocol)
    whose stored sample ranks like ``values``; None when every one differs."""
    for row_id, method in earlier:
        path = sample_path(folder, row_id)
        if not path.is_file() or path.is_symlink():
            continue
        rho = spearman(np.load(path, allow_pickle=False), values)
        if rho >= CLONE_SPEARMAN:
            return row_id, method, rho
    return None


def review_status(auprc, ceiling: float | None) -> str:
    """``needs review`` for a test AUPRC at or above the ceiling, else ``ranked``."""
    limit = REVIEW_CEILING if ceiling is None else float(ceiling)
    try:
        return NEEDS_REVIEW if float(auprc) >= limit else "ranked"
    except (TypeError, ValueError):
        return "ranked"
