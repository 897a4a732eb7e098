"""Ranking a leaderboard: rows sorted by a pooled metric, each compared with the best comparable entry.

Paired test over patients. Beside ``<name>.csv`` lives ``<name>.subjects/<row_id>.json`` with
per-test-subject AUROC, AUPRC (``null`` for a subject without tumour or without healthy voxels,
where they are undefined) and Dice at the validation threshold. :func:`ranked_table` compares
each entry with the best entry sharing its protocol (id and hash), dataset and split by a
two-sided Wilcoxon signed-rank test on the per-subject differences (``scipy.stats.wilcoxon``,
zero differences dropped). Why this and not a pooled-voxel paired bootstrap over patients: that
needs every voxel score of both methods, which the CSV does not keep, and a bootstrap over a
handful of test patients is anti-conservative (two patients that both favour A already give
p ~ 0.002), while the exact signed-rank test states honestly that fewer than 6 paired patients
can never reach p < 0.05. The test is on per-subject values (the BraTS-style per-case
comparison), the ranking on pooled values; both are reported.
"""

from __future__ import annotations

import html
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path
from pipeline.common import read_optional_json
from pipeline.errors import InputError
from pipeline.evaluation.metrics import METRICS
from pipeline.leaderboard.clones import NEEDS_REVIEW, review_status
from pipeline.leaderboard.columns import COMPARABLE, REPRODUCED, ROW_ID_PATTERN, SOURCES, SUPERVISION
from pipeline.leaderboard.registry import read_registry
from pipeline.leaderboard.submission import read_leaderboard, subjects_dir

ALPHA = 0.05
"""Significance level of the paired test against the top entry."""


def _load_subjects(folder: Path, row_id: str) -> dict | None:
    if not ROW_ID_PATTERN.fullmatch(str(row_id)):
        return None
    return (read_optional_json(folder / f"{row_id}.json") or {}).get("subjects")


def paired_wilcoxon(a: dict, b: dict, metric: str) -> tuple[float, float, int]:
    """(mean of a - b, two-sided signed-rank p, subjects) over subjects where both values exist."""
    from scipy.stats import wilcoxon

    common = sorted(s for s in set(a) & set(b) if a[s].get(metric) is not None and b[s].get(metric) is not None)
    d = np.array([a[s][metric] - b[s][metric] for s in common], dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan, 0
    if not np.any(d):
        return 0.0, 1.0, d.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # few subjects: scipy warns, the p-value stays valid
        p = float(wilcoxon(d, zero_method="wilcox").pvalue)
    return float(d.mean()), p, int(d.size)


def ranked_table(csv_path, protocol_id=None, metric: str = "auprc") -> pd.DataFrame:
    """Rows sorted best-first by ``metric`` (ties: earlier submission first), with ``rank`` (among rows
    of the same protocol hash, dataset and split, the only ones that are comparable) and, per
    entry, the paired test against the best entry sharing its protocol, dataset and split:
    ``top_row_id`` (the entry compared with; its own id for a top entry), ``diff_vs_top`` (mean
    per-subject top - entry), ``p_vs_top``, ``paired_subjects`` and ``differs_from_top``
    (p < 0.05; None for a top entry and where no test is possible). ``status``: ``needs review`` for a row
    whose test AUPRC reaches its protocol's review ceiling (:mod:`pipeline.leaderboard.clones`); such rows
    come last, get no rank and are never the top entry others are tested against."""
    if metric not in METRICS:
        raise InputError("metric", f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    df = read_leaderboard(csv_path)
    if protocol_id is not None:
        df = df[df["protocol_id"] == protocol_id]
    try:
        registry = read_registry(csv_path)
    except InputError:  # a damaged registry stops submissions, not the table: the default ceiling holds
        registry = {}
    df["status"] = [review_status(row["auprc"], (registry.get(row["protocol_id"]) or {}).get("review_ceiling"))
                    for _, row in df.iterrows()]
    df["_held"] = df["status"] == NEEDS_REVIEW
    df = df.sort_values(["_held", metric, "submitted_at"], ascending=[True, False, True], kind="stable",
                        na_position="last").reset_index(drop=True)
    rank = df.groupby(list(COMPARABLE), sort=False).cumcount() + 1  # within comparable rows; held rows sort last
    df.insert(0, "rank", rank.where(~df["_held"]).astype("Int64"))
    folder = subjects_dir(csv_path)
    subjects = {rid: _load_subjects(folder, rid) for rid in df["row_id"]}
    tops: dict[tuple, str] = {}
    tests = []
    for _, row in df.iterrows():
        if row["_held"]:
            tests.append((None, math.nan, math.nan, 0, None))
            continue
        top = tops.setdefault(tuple(row[c] for c in COMPARABLE), row["row_id"])
        a, b = subjects[top], subjects[row["row_id"]]
        if top == row["row_id"] or a is None or b is None:
            tests.append((top, math.nan, math.nan, 0, None))
            continue
        diff, p, n = paired_wilcoxon(a, b, metric)
        tests.append((top, diff, p, n, None if math.isnan(p) else bool(p < ALPHA)))
    cols = ["top_row_id", "diff_vs_top", "p_vs_top", "paired_subjects", "differs_from_top"]
    for i, col in enumerate(cols):
        df[col] = pd.Series([t[i] for t in tests], index=df.index, dtype=object if col == "differs_from_top" else None)
    return df.drop(columns="_held")


# ----------------------------------------------------------------------------- display

ADDED_DISPLAY = {"subject_auroc": ("subject AUROC", ".3f"), "fp_ml_healthy": ("FP ml healthy", ".2f"),
                 "healthy_residual": ("val residual", ".4f"), "residual_ratio": ("val tumour/healthy", ".2f"),
                 "psnr": ("val PSNR", ".2f"), "ssim": ("val SSIM", ".3f")}
"""Header and format of the added columns in the ranked table (blank where a row lacks them)."""


def source_text(row) -> str:
    """Where a row's maps came from, and whether the organiser has reproduced it (``leaderboard verify``)."""
    source = str(row.get("source") or "").lstrip("'") or SOURCES[0]
    verdict = str(row.get("reproduced") or "")
    return f"{source}, {verdict}" if verdict in REPRODUCED else source


def self_reported(row, column: str) -> bool:
    """Whether ``column`` of ``row`` was copied from the submitter's run unchecked (see :data:`SELF_REPORTED`)."""
    return column in str(row.get("self_reported") or "").split()


def _display(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    def num(x, spec=".3f"):
        return "" if pd.isna(x) else format(x, spec)

    def differs(row):
        if row["status"] == NEEDS_REVIEW:
            return NEEDS_REVIEW
        if row["top_row_id"] == row["row_id"]:
            return "top"
        if row["differs_from_top"] is None:
            return "n/a"
        return f"{'yes' if row['differs_from_top'] else 'no'} (p={row['p_vs_top']:.2g}, n={row['paired_subjects']})"

    rows = [r for _, r in table.iterrows()]
    return pd.DataFrame({
        "rank": ["review" if pd.isna(r) else str(r) for r in table["rank"]], "method": table["method"],
        "supervision": table["supervision"].map(lambda v: v or SUPERVISION[0]),
        "source": [source_text(r) for r in rows],
        "test n": table["test_subjects"].map(lambda n: "" if pd.isna(n) else str(int(n))),
        f"{metric} [95% CI]": [f"{num(r[metric])} [{num(r[metric + '_ci_low'])}, {num(r[metric + '_ci_high'])}]"
                               for r in rows],
        **{m: table[m].map(num) for m in (*METRICS, "dice_oracle") if m != metric},
        **{label: [num(r[c], spec) + ("*" if self_reported(r, c) else "") for r in rows]
           for c, (label, spec) in ADDED_DISPLAY.items()},
        f"differs from top (p<{ALPHA:g})": [differs(r) for r in rows],
        "protocol": table["protocol_id"], "seed": table["seed"].map(lambda s: "" if pd.isna(s) else str(int(s))),
        "code": table["code_version"], "submitted (UTC)": table["submitted_at"],
    })


def _markdown(frame: pd.DataFrame) -> str:
    def cell(text) -> str:  # no column breaks
        return str(text).replace("\\", "\\\\").replace("|", "\\|")

    def value(text) -> str:  # user text: no raw HTML for Markdown renderers
        return cell(html.escape(str(text), quote=False))

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(value(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def show(csv_path, protocol_id=None, metric: str = "auprc", html_path=None) -> str:
    """The ranked table as Markdown (returned); with ``html_path`` also written there as HTML."""
    frame = _display(ranked_table(csv_path, protocol_id, metric), metric)
    if html_path is not None:
        title = html.escape(f"Leaderboard {protocol_id or ''} ranked by {metric}".replace("  ", " "))
        body = frame.to_html(index=False, escape=True, border=0)
        with atomic_path(html_path, suffix=".html") as tmp:
            tmp.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n"
                           f"<body><h1>{title}</h1>\n{body}\n</body></html>\n", encoding="utf-8")
    marked = any(str(v).endswith("*") for label, _ in ADDED_DISPLAY.values() for v in frame[label])
    return _markdown(frame) + (f"\n\n{SELF_REPORTED_NOTE}" if marked else "")


SELF_REPORTED_NOTE = ("`*` self-reported: the run's own figure (reconstructions are not saved, so nothing recomputes "
                      "it); `pipeline leaderboard verify ROW_ID` re-runs the entry and checks it")
