"""The leaderboard CSV's columns and how one value becomes a checked cell (OWASP-safe text, numbers as numbers).

Kept apart from :mod:`pipeline.leaderboard.submission` (which builds, appends and reads rows) so that every
module that reads the table (ranking, site, external submissions, verification) shares one column list.
"""

from __future__ import annotations

import math
import numbers
import re
import unicodedata

from pipeline.common import SUPERVISION_LEVELS, is_real
from pipeline.errors import InputError
from pipeline.evaluation.metrics import METRICS

COLUMNS = [
    "row_id",  # 32 hex digits; names the per-subject sidecar
    "method", "protocol_id", "protocol_hash", "dataset_fingerprint", "split_fingerprint",
    "config_hash", "maps_hash", "seed", "code_version",
    "supervision",  # what labels the method learnt from: "unsupervised" or "weak slice labels"
    "source",  # "pipeline run" (this tool's run folder) or "external maps" (pipeline leaderboard submit-maps)
    "auroc", "auroc_ci_low", "auroc_ci_high",  # pooled test brain voxels, patient-level 95 % bootstrap CI
    "auprc", "auprc_ci_low", "auprc_ci_high",
    "dice", "dice_ci_low", "dice_ci_high",  # threshold chosen on validation subjects (the honest number)
    "dice_oracle",  # best Dice over thresholds on test itself (an oracle, not achievable)
    "subject_auroc",  # tumour vs healthy test subjects, each scored by the 99th percentile of its map
    "fp_ml_healthy",  # mean false-positive ml per healthy test subject at the validation threshold
    "healthy_residual", "residual_ratio", "psnr", "ssim",  # reconstruction quality on validation subjects
    "test_subjects", "n_boot",
    "train_seconds", "inference_seconds", "hardware",
    "submitted_at",  # UTC, ISO 8601
    "run_dir",  # absolute path of the run folder
    "description", "code_url",  # the submitter's words and code (external maps), shown as given
    "self_reported",  # space-separated columns copied from the run unchecked (timings, reconstruction figures)
    "reproduced",  # "" (not tried), "reproduced" or "not reproduced": pipeline leaderboard verify ROW_ID
]
"""CSV columns, in file order."""

ADDED_COLUMNS = {"subject_auroc": "test.subject_auroc", "fp_ml_healthy": "test.false_positive_ml_healthy",
                 "healthy_residual": "validation.reconstruction.healthy_residual",
                 "residual_ratio": "validation.reconstruction.residual_ratio",
                 "psnr": "validation.reconstruction.psnr", "ssim": "validation.reconstruction.ssim"}
"""Columns added after the first CSVs were written (-> their place in metrics.json). A CSV without
them still reads (empty cells) and gains them, empty for the old rows, on its next append."""

LATER_COLUMNS = frozenset({*ADDED_COLUMNS, "maps_hash", "supervision", "source", "description", "code_url",
                           "self_reported", "reproduced"})
"""Columns a CSV from an earlier version may lack (read as empty)."""

NUMERIC_COLUMNS = frozenset({"seed", "test_subjects", "n_boot", "train_seconds", "inference_seconds",
                             "dice_oracle", *ADDED_COLUMNS}
                            | {f"{m}{s}" for m in METRICS for s in ("", "_ci_low", "_ci_high")})

SUPERVISION = SUPERVISION_LEVELS
SOURCES = ("pipeline run", "external maps")
"""Where a row's maps came from: a run folder of this tool, or maps made anywhere (:mod:`pipeline.leaderboard.external`)."""
SELF_REPORTED = ("train_seconds", "inference_seconds", "hardware", "healthy_residual", "residual_ratio", "psnr", "ssim")
"""Columns a submission states and nothing recomputes from the maps (figures of reconstructions the run did not
save): kept for pipeline runs and marked as such, left empty for external maps."""
REPRODUCED = ("reproduced", "not reproduced")
"""What a method may have learnt from; weakly supervised entries are marked, never ranked as unsupervised."""

METHOD_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,79}")
"""Method names: a letter or digit, then up to 79 of letters, digits, ``. _ + -`` (no paths, no spaces)."""

ROW_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
COMPARABLE = ("protocol_id", "protocol_hash", "dataset_fingerprint", "split_fingerprint")
"""Entries agreeing on these saw the same patients; only they are tested against each other."""
DUPLICATE_KEY = ("method", "protocol_hash", "dataset_fingerprint", "split_fingerprint", "config_hash", "seed",
                 "code_version")
"""A second row equal on all of these is the same run submitted again, and is refused."""


# ----------------------------------------------------------------------------- field checks


def check_method_name(name, source="method") -> str:
    if not isinstance(name, str) or not METHOD_PATTERN.fullmatch(name):
        raise InputError(source, f"method name {name!r} must match {METHOD_PATTERN.pattern} "
                                 "(letters, digits, '._+-', at most 80 characters)")
    return name


def check_text(column: str, value, source) -> str:
    """A text cell: a string without line breaks or control characters (tab allowed)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(source, f"{column} must be text, got {type(value).__name__}")
    bad = [c for c in value if c != "\t" and unicodedata.category(c) in ("Cc", "Zl", "Zp")]
    if bad:
        raise InputError(source, f"{column} contains a line break or control character ({bad[0]!r})")
    return value


def _check_number(column: str, value, source):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not is_real(value):
        raise InputError(source, f"{column} must be a finite number, got {value!r}")
    return value


def cell(column: str, value, source="leaderboard row") -> str:
    """The CSV text of one checked value; formula-like text gets a leading quote (OWASP)."""
    if column in NUMERIC_COLUMNS:
        value = _check_number(column, value, source)
        if value is None:
            return ""
        return str(int(value)) if isinstance(value, numbers.Integral) else repr(float(value))
    text = check_text(column, value, source)
    return "'" + text if text.startswith(FORMULA_START) else text


def serialise(row: dict) -> list[str]:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise InputError("leaderboard row", f"missing columns: {', '.join(missing)}")
    check_method_name(row["method"], "leaderboard row")
    if not isinstance(row["row_id"], str) or not ROW_ID_PATTERN.fullmatch(row["row_id"]):
        raise InputError("leaderboard row", f"row_id must be 32 lowercase hex digits, got {row['row_id']!r}")
    return [cell(c, row[c]) for c in COLUMNS]
