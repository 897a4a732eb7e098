"""Static leaderboard site: an index of ranked tables with forest plots, and one page per run.

Why static: the site must open from the file system on a machine with no server and no internet;
the pages are built from :mod:`pipeline.leaderboard.webpage` (own style and script, a Content Security Policy,
every piece of user text escaped) and the forest plot is SVG written here.

Layout of ``OUT``: ``index.html``; ``runs/<row_id>.html``; ``runs/<row_id>/report.png`` (the only
copied file, so the site stays small); NIfTI maps and masks are linked where they lie, by paths
relative to the page (:func:`os.path.relpath`). The folder is written to a temporary sibling and
swapped in whole, so a reader never sees half a site and rows that left the CSV leave no page.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_dir, write_json
from pipeline.common import read_optional_json
from pipeline.errors import InputError
from pipeline.leaderboard.clones import NEEDS_REVIEW
from pipeline.leaderboard.columns import COMPARABLE, ROW_ID_PATTERN
from pipeline.leaderboard.ranking import ALPHA, ranked_table
from pipeline.leaderboard.registry import hides_test_labels, read_registry
from pipeline.leaderboard.run_files import read_run_json
from pipeline.leaderboard.run_page import (LABELS, copy_figure, is_baseline, paired_badge, run_dir_of, run_html,
                                           source_badges, with_ci)
from pipeline.leaderboard.webpage import esc, html_page, html_table, missing, num, short, sort_key, td

MARKER = ".leaderboard-site"
"""File that marks a folder as a site this module wrote (only such a folder is ever replaced)."""
FOREST_METRICS = ("auprc", "auroc", "dice")


# ----------------------------------------------------------------------------- grouping and reading


def _groups(table: pd.DataFrame) -> list[pd.DataFrame]:
    """Entries that saw the same patients (protocol id and hash, dataset, split), each ranked 1..n; rows held
    for review (:mod:`pipeline.leaderboard.clones`) come last, ranked ``review``."""
    groups = []
    for _, group in table.groupby(list(COMPARABLE), sort=False, dropna=False):
        group = group.copy()
        held = (group["status"] == NEEDS_REVIEW).to_numpy()
        group["rank"] = ["review" if h else int(i) for h, i in zip(held, (~held).cumsum())]
        groups.append(group)
    return sorted(groups, key=lambda g: (str(g["protocol_id"].iloc[0]), str(g["protocol_hash"].iloc[0])))


def _protocol_description(group: pd.DataFrame, registry: dict) -> str:
    """The protocol's description as the leaderboard registered it (:mod:`pipeline.leaderboard.registry`), else as
    ``results/<id>/protocol.json`` beside the runs has it, if that is the same protocol."""
    first = group.iloc[0]
    record = registry.get(str(first["protocol_id"]))
    if isinstance(record, dict) and record.get("hash") == first["protocol_hash"]:
        return str((record.get("content") or {}).get("description") or "")
    for _, row in group.iterrows():
        run_dir = run_dir_of(row)
        record = read_run_json(run_dir.parent.parent, "protocol.json") if run_dir else None
        if record and record.get("hash") in (None, row["protocol_hash"]):
            return str(record.get("description") or "")
    return ""


def _sidecar(csv_path: Path, row_id: str) -> dict:
    """Per-test-subject values the leaderboard keeps beside the CSV (``<name>.subjects/<row_id>.json``)."""
    record = read_optional_json(csv_path.with_name(csv_path.stem + ".subjects") / f"{row_id}.json")
    subjects = record.get("subjects") if isinstance(record, dict) else None
    return subjects if isinstance(subjects, dict) else {}


def _has_page(row) -> bool:
    return bool(ROW_ID_PATTERN.fullmatch(str(row["row_id"])))


# ----------------------------------------------------------------------------- paired test


def _paired_short(row) -> tuple[str, str]:
    """Forest-plot column text and class: 'top', '≠ p=...' (differs) or '≈ p=...'."""
    if row["top_row_id"] == row["row_id"]:
        return "top", "top"
    if row["differs_from_top"] is None or missing(row["p_vs_top"]):
        return "n/a", "na"
    return f"{'≠' if row['differs_from_top'] else '≈'} p={float(row['p_vs_top']):.2g}", \
        "diff" if row["differs_from_top"] else "same"


# ----------------------------------------------------------------------------- forest plot

ROW_H, TOP, LABEL_W, PANEL_W, GAP, PAIR_W = 24, 34, 150, 120, 14, 76
COLOURS = {"entry": "#1f5fa8", "baseline": "#c27c00"}


def _axis(group: pd.DataFrame, metric: str) -> tuple[float, float]:
    """Axis range of one panel: every interval, rounded out to 0.05, within [0, 1]."""
    values = pd.concat([group[f"{metric}_ci_low"], group[f"{metric}_ci_high"], group[metric]]).dropna()
    if values.empty:
        return 0.0, 1.0
    lo, hi = max(0.0, math.floor(values.min() * 20) / 20), min(1.0, math.ceil(values.max() * 20) / 20)
    return (lo, hi) if hi > lo else (max(0.0, lo - 0.05), min(1.0, hi + 0.05))


def _panel(group: pd.DataFrame, metric: str, x0: float, height: float) -> list[str]:
    lo, hi = _axis(group, metric)

    def x(v):
        return x0 + (float(v) - lo) / (hi - lo) * PANEL_W

    out = [f'<text x="{x0 + PANEL_W / 2:.1f}" y="14" class="ph">{LABELS[metric]}</text>',
           f'<line x1="{x0:.1f}" y1="{TOP - 8}" x2="{x0 + PANEL_W:.1f}" y2="{TOP - 8}" class="frame"/>']
    for tick, anchor in ((lo, "s"), ((lo + hi) / 2, "m"), (hi, "e")):
        out.append(f'<line x1="{x(tick):.1f}" y1="{TOP - 8}" x2="{x(tick):.1f}" y2="{height - 34}" class="grid"/>'
                   f'<text x="{x(tick):.1f}" y="{height - 22}" class="tick {anchor}">{tick:.2f}</text>')
    base = group[[is_baseline(m) for m in group["method"]]]
    if not base.empty and not missing(base[metric].iloc[0]):
        bx = x(base[metric].iloc[0])
        out.append(f'<line x1="{bx:.1f}" y1="{TOP - 8}" x2="{bx:.1f}" y2="{height - 34}" class="baseref">'
                   f"<title>best baseline: {esc(base['method'].iloc[0])} {num(base[metric].iloc[0])}</title></line>")
    for i, (_, row) in enumerate(group.iterrows()):
        y = TOP + i * ROW_H + ROW_H / 2
        kind = "baseline" if is_baseline(row["method"]) else "entry"
        tip = (f"{row['method']}: {LABELS[metric]} {num(row[metric])} "
               f"[{num(row[metric + '_ci_low'])}, {num(row[metric + '_ci_high'])}]")
        lo_v, hi_v = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
        if not (missing(lo_v) or missing(hi_v)):
            out.append(f'<line x1="{x(lo_v):.1f}" y1="{y:.1f}" x2="{x(hi_v):.1f}" y2="{y:.1f}" class="ci {kind}" '
                       f'data-metric="{metric}" data-row="{esc(row["row_id"])}" stroke="{COLOURS[kind]}">'
                       f"<title>{esc(tip)}</title></line>")
        if not missing(row[metric]):
            shape = (f'<rect x="{x(row[metric]) - 4:.1f}" y="{y - 4:.1f}" width="8" height="8"' if kind == "baseline"
                     else f'<circle cx="{x(row[metric]):.1f}" cy="{y:.1f}" r="4"')
            out.append(f'{shape} class="pt {kind}" fill="{COLOURS[kind]}"><title>{esc(tip)}</title>'
                       f'{"</rect>" if kind == "baseline" else "</circle>"}')
    return out


def forest_svg(group: pd.DataFrame, metric: str) -> str:
    """AUPRC, AUROC and Dice with 95 % intervals, one row per entry in rank order, baseline marked,
    the paired-test verdict against the top entry (on the ranking ``metric``) in the last column."""
    n = len(group)
    height = TOP + n * ROW_H + 42
    width = LABEL_W + len(FOREST_METRICS) * (PANEL_W + GAP) + PAIR_W
    parts = [f'<svg class="forest" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="forest plot">']
    for i, (_, row) in enumerate(group.iterrows()):
        y = TOP + i * ROW_H + ROW_H / 2 + 4
        kind = "baseline" if is_baseline(row["method"]) else "entry"
        label = f"{row['rank']}. {row['method']}" + (" (baseline)" if kind == "baseline" else "")
        shown = f"{row['rank']}. {row['method']}"
        shown = shown if len(shown) <= 24 else shown[:23] + "…"
        parts.append(f'<text x="6" y="{y:.1f}" class="lab {kind}"><title>{esc(label)}</title>{esc(shown)}</text>')
        text, cls = _paired_short(row)
        parts.append(f'<text x="{width - PAIR_W + 6}" y="{y:.1f}" class="pv {cls}">{esc(text)}</text>')
    for k, m in enumerate(FOREST_METRICS):
        parts += _panel(group, m, LABEL_W + k * (PANEL_W + GAP), height)
    parts.append(f'<text x="{width - PAIR_W + 6}" y="14" class="ph l">vs top</text>'
                 f'<text x="6" y="{height - 6}" class="key"><tspan class="entry">&#9679;</tspan> entry&#160;&#160; '
                 f'<tspan class="baseline">&#9632;</tspan> baseline (dashed: best baseline)&#160;&#160; '
                 f'paired test on {LABELS[metric]}: &#8800; differs from top (p &lt; {ALPHA:g}), &#8776; no '
                 "difference shown</text></svg>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- index


INDEX_HEADERS = [("rank", ""), ("method", "t"), ("AUPRC [95% CI]", ""), ("AUROC [95% CI]", ""),
                 ("Dice [95% CI]", ""), ("subject AUROC", ""), ("FP ml / healthy", ""),
                 ("paired test", "t"), ("train s", ""), ("score s", "")]


def _index_row(row, metric: str, pages: set) -> str:
    name = esc(row["method"])
    if row["row_id"] in pages:
        name = f'<a href="runs/{esc(row["row_id"])}.html">{name}</a>'
    if is_baseline(row["method"]):
        name += ' <span class="badge b-base">baseline</span>'
    supervision = row.get("supervision")
    if isinstance(supervision, str) and supervision not in ("", "unsupervised"):  # never ranked unmarked
        name += f' <span class="badge" title="learnt from labels">{esc(supervision.lstrip(chr(39)))}</span>'
    name += source_badges(row)
    badge, key = paired_badge(row, metric)
    cells = [td(str(row["rank"]), row["rank"] if row["rank"] != "review" else 10**6), td(name, row["method"], "t"),
             *(td(with_ci(row, m, "<br>"), sort_key(row[m])) for m in ("auprc", "auroc", "dice")),
             td(num(row["subject_auroc"]), sort_key(row["subject_auroc"])),
             td(num(row["fp_ml_healthy"], ".2f"), sort_key(row["fp_ml_healthy"])),
             td(badge, key, "t"),
             td(num(row["train_seconds"], ".0f"), sort_key(row["train_seconds"])),
             td(num(row["inference_seconds"], ".0f"), sort_key(row["inference_seconds"]))]
    return f'<tr class="{"baseline" if is_baseline(row["method"]) else "entry"}" data-row="{esc(row["row_id"])}">' \
           + "".join(cells) + "</tr>"


def _protocol_section(group: pd.DataFrame, metric: str, pages: set, same_id: bool, registry: dict) -> str:
    first = group.iloc[0]
    title = str(first["protocol_id"]) + (f" (hash {str(first['protocol_hash'])[:8]})" if same_id else "")
    subjects = sorted({int(s) for s in group["test_subjects"].dropna()})
    description = _protocol_description(group, registry)
    facts = [("protocol hash", short(first["protocol_hash"])),
             ("dataset fingerprint", short(first["dataset_fingerprint"])),
             ("split fingerprint", short(first["split_fingerprint"])),
             ("test subjects", esc(", ".join(map(str, subjects)) or "unknown")), ("entries", str(len(group)))]
    rows = [_index_row(row, metric, pages) for _, row in group.iterrows()]
    return (f'<section class="protocol" data-protocol="{esc(first["protocol_id"])}">\n<h2>{esc(title)}</h2>\n'
            + (f'<p class="muted">{esc(description)}</p>\n' if description else "")
            + '<p class="inline">' + "".join(f"<span><b>{k}</b> {v}</span>" for k, v in facts) + "</p>\n"
            + f'<div class="pair"><div class="tbl">{html_table(INDEX_HEADERS, rows)}</div>\n'
            + f'<div class="fig">{forest_svg(group, metric)}</div></div>\n</section>')


def _registry(csv_path: Path) -> dict:
    try:
        return read_registry(csv_path)
    except InputError:  # a damaged registry stops submissions, not the page (descriptions then come from runs)
        return {}


def index_html(groups: list[pd.DataFrame], csv_path: Path, metric: str, pages: set) -> str:
    ids = [str(g["protocol_id"].iloc[0]) for g in groups]
    registry = _registry(csv_path)
    sections = [_protocol_section(g, metric, pages, ids.count(i) > 1, registry) for g, i in zip(groups, ids)]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"<h1>Leaderboard</h1>\n<p class=\"muted\">{esc(csv_path.name)}, built {now}; each protocol's entries "
             f"are ranked by {LABELS[metric]} (pooled test brain voxels). Intervals: 95 % patient-level bootstrap. "
             f"Paired test: two-sided Wilcoxon signed-rank test of per-subject {LABELS[metric]} against the protocol's "
             f"top entry (<span class=\"badge b-diff\">&#8800;</span> p &lt; {ALPHA:g}, "
             f"<span class=\"badge b-same\">&#8776;</span> no difference shown). "
             f"<span class=\"badge b-base\">baseline</span> rows (FLAIR intensity) are the bar to beat; the dashed "
             f"line in each panel is the best baseline. Click a column header to sort.</p>")
    return html_page("Leaderboard", intro + "\n" + ("\n".join(sections) or "<p>No entries yet.</p>"))


# ----------------------------------------------------------------------------- run pages


# ----------------------------------------------------------------------------- entry point


def default_out(csv_path) -> Path:
    """``site/`` beside the leaderboard CSV (``results/leaderboard.csv`` -> ``results/site``)."""
    return Path(csv_path).parent / "site"


def _check_out(out: Path) -> None:
    """Only a new or empty folder, or a site written here before, may be (re)placed."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise InputError(out, "exists and is not a leaderboard site; choose a new or empty folder")


def organiser_out(out) -> Path:
    """``<site>.organiser/`` beside the site: what a hidden-label protocol's pages withhold (never published)."""
    out = Path(out)
    return out.with_name(out.name + ".organiser")


def _write_pages(csv_path: Path, groups: list, metric: str, tmp_runs: Path, final_runs: Path) -> tuple[set, dict]:
    """One page per row; rows of a hidden-label protocol get no per-subject values or figure (those
    go to the returned organiser records instead). Returns (row ids with a page, organiser records)."""
    registry, pages, organiser = _registry(csv_path), set(), {}
    for group in groups:
        hidden = hides_test_labels(registry.get(str(group["protocol_id"].iloc[0])))
        for _, row in group[[_has_page(r) for _, r in group.iterrows()]].iterrows():
            subjects = _sidecar(csv_path, row["row_id"])
            figure = None if hidden else copy_figure(row, tmp_runs)
            page = run_html(row, metric, {} if hidden else subjects, final_runs, figure, hidden)
            (tmp_runs / f"{row['row_id']}.html").write_text(page, encoding="utf-8")
            pages.add(row["row_id"])
            if hidden:
                test = read_run_json(run_dir_of(row), "evaluation/metrics.json").get("test")
                organiser[row["row_id"]] = {
                    "row_id": row["row_id"], "method": row["method"], "protocol_id": row["protocol_id"],
                    "run_dir": row["run_dir"], "subjects": subjects,
                    "false_positive_ml_per_healthy_subject": (test or {}).get("false_positive_ml_per_healthy_subject")
                    if isinstance(test, dict) else None}
    return pages, organiser


def _write_organiser(out: Path, records: dict) -> None:
    """The withheld per-subject values, one JSON per row, in a folder replaced whole like the site."""
    folder = organiser_out(out)
    _check_out(folder)
    with atomic_dir(folder) as tmp:
        (tmp / MARKER).write_text("organiser's copy of what the public leaderboard site withholds; do not publish\n")
        for row_id, record in records.items():
            write_json(tmp / f"{row_id}.json", record)


def build_site(csv_path, out=None, metric: str = "auprc") -> Path:
    """Write the static site for ``csv_path`` into ``out`` (default :func:`default_out`); returns index.html.
    Per-subject values of hidden-label protocols go to :func:`organiser_out` instead."""
    csv_path = Path(csv_path)
    out = Path(out) if out is not None else default_out(csv_path)
    _check_out(out)
    _check_out(organiser_out(out))
    groups = _groups(ranked_table(csv_path, metric=metric))
    with atomic_dir(out) as tmp:
        (tmp / MARKER).write_text("written by pipeline.leaderboard.site; the whole folder is replaced on every rebuild\n")
        (tmp / "runs").mkdir()
        pages, organiser = _write_pages(csv_path, groups, metric, tmp / "runs", out.resolve() / "runs")
        (tmp / "index.html").write_text(index_html(groups, csv_path, metric, pages), encoding="utf-8")
        if organiser:
            _write_organiser(out, organiser)
    return out / "index.html"
