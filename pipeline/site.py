"""Static leaderboard site: an index of ranked tables with forest plots, and one page per run.

Why static: the site must open from the file system on a machine with no server and no internet;
the pages are built from :mod:`pipeline.webpage` (own style and script, a Content Security Policy,
every piece of user text escaped) and the forest plot is SVG written here.

Layout of ``OUT``: ``index.html``; ``runs/<row_id>.html``; ``runs/<row_id>/report.png`` (the only
copied file, so the site stays small); NIfTI maps and masks are linked where they lie, by paths
relative to the page (:func:`os.path.relpath`). The folder is written to a temporary sibling and
swapped in whole, so a reader never sees half a site and rows that left the CSV leave no page.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .atomic import atomic_dir
from .common import is_real, read_optional_json
from .errors import InputError
from .leaderboard import COMPARABLE, ROW_ID_PATTERN
from .ranking import ALPHA, ranked_table
from .registry import read_registry
from .webpage import esc, facts, href, html_page, html_table, missing, num, short, sort_key, td

MARKER = ".leaderboard-site"
"""File that marks a folder as a site this module wrote (only such a folder is ever replaced)."""
BASELINE_PREFIX = "flair-baseline"
LABELS = {"auprc": "AUPRC", "auroc": "AUROC", "dice": "Dice"}
FOREST_METRICS = ("auprc", "auroc", "dice")


def is_baseline(method) -> bool:
    """The FLAIR-intensity baseline, named so by the benchmark runner (``flair-baseline...``)."""
    return str(method).startswith(BASELINE_PREFIX)


# ----------------------------------------------------------------------------- grouping and reading


def _groups(table: pd.DataFrame) -> list[pd.DataFrame]:
    """Entries that saw the same patients (protocol id and hash, dataset, split), each ranked 1..n."""
    groups = []
    for _, group in table.groupby(list(COMPARABLE), sort=False, dropna=False):
        group = group.copy()
        group["rank"] = range(1, len(group) + 1)
        groups.append(group)
    return sorted(groups, key=lambda g: (str(g["protocol_id"].iloc[0]), str(g["protocol_hash"].iloc[0])))


def _run_dir(row) -> Path | None:
    path = Path(str(row["run_dir"])) if str(row["run_dir"]) else None
    return path if path is not None and path.is_dir() else None


def _protocol_description(group: pd.DataFrame, registry: dict) -> str:
    """The protocol's description as the leaderboard registered it (:mod:`pipeline.registry`), else as
    ``results/<id>/protocol.json`` beside the runs has it, if that is the same protocol."""
    first = group.iloc[0]
    record = registry.get(str(first["protocol_id"]))
    if isinstance(record, dict) and record.get("hash") == first["protocol_hash"]:
        return str((record.get("content") or {}).get("description") or "")
    for _, row in group.iterrows():
        run_dir = _run_dir(row)
        record = read_optional_json(run_dir.parent.parent / "protocol.json") if run_dir else None
        if isinstance(record, dict) and record.get("hash") in (None, row["protocol_hash"]):
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


def paired_badge(row, metric: str) -> tuple[str, float]:
    """The paired-test verdict as a coloured badge, and a sort key (top first, untested last)."""
    if row["top_row_id"] == row["row_id"]:
        return '<span class="badge b-top" title="best entry of this protocol">top</span>', -1.0
    if row["differs_from_top"] is None or missing(row["p_vs_top"]):
        return '<span class="badge b-na" title="no per-subject values to pair">n/a</span>', 2.0
    p, n = float(row["p_vs_top"]), int(row["paired_subjects"])
    tip = (f"Wilcoxon signed-rank test of per-subject {LABELS[metric]} against the top entry over {n} test "
           f"subjects; mean difference top - entry {float(row['diff_vs_top']):+.3f}")
    if row["differs_from_top"]:
        return f'<span class="badge b-diff" title="{esc(tip)}">&#8800; p={p:.2g}</span>', p
    return f'<span class="badge b-same" title="{esc(tip)}">&#8776; p={p:.2g}</span>', p


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


def _with_ci(row, m: str, sep: str = " ") -> str:
    return (f"{num(row[m])}{sep}<span class=ci>[{num(row[m + '_ci_low'])}, {num(row[m + '_ci_high'])}]</span>"
            if not missing(row[m]) else "")


def _index_row(row, metric: str, pages: set) -> str:
    name = esc(row["method"])
    if row["row_id"] in pages:
        name = f'<a href="runs/{esc(row["row_id"])}.html">{name}</a>'
    if is_baseline(row["method"]):
        name += ' <span class="badge b-base">baseline</span>'
    supervision = row.get("supervision")
    if isinstance(supervision, str) and supervision not in ("", "unsupervised"):  # never ranked unmarked
        name += f' <span class="badge" title="learnt from labels">{esc(supervision.lstrip(chr(39)))}</span>'
    badge, key = paired_badge(row, metric)
    cells = [td(str(row["rank"]), row["rank"]), td(name, row["method"], "t"),
             *(td(_with_ci(row, m, "<br>"), sort_key(row[m])) for m in ("auprc", "auroc", "dice")),
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


def index_html(groups: list[pd.DataFrame], csv_path: Path, metric: str, pages: set) -> str:
    ids = [str(g["protocol_id"].iloc[0]) for g in groups]
    try:
        registry = read_registry(csv_path)
    except InputError:  # a damaged registry stops submissions, not the page (descriptions then come from runs)
        registry = {}
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


def _numbers(mapping) -> dict:
    """The numeric values of a mapping read from a run's own file (anything else is left out)."""
    if not isinstance(mapping, dict):
        return {}
    return {k: v for k, v in mapping.items() if is_real(v, finite=False)}


def _pair(a: str, b: str) -> str:
    return f"{a or 'n/a'} / {b or 'n/a'}"


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _subject_files(run_dir: Path | None) -> dict[str, dict[str, Path]]:
    """Per subject: the anomaly map and the thresholded mask, where the files exist inside the run."""
    if run_dir is None:
        return {}
    index = read_optional_json(run_dir / "scores" / "index.json")
    entries = index.get("subjects", {}) if isinstance(index, dict) else {}
    files = {}
    for name, item in entries.items() if isinstance(entries, dict) else ():
        found = {}
        score = (item.get("files") or {}).get("score") if isinstance(item, dict) else None
        if isinstance(score, str):
            found["map"] = run_dir / "scores" / score
        found["mask"] = run_dir / "evaluation" / "masks" / f"{name}_mask.nii.gz"
        files[name] = {k: p for k, p in found.items() if p.is_file() and _inside(p, run_dir)}
    return files


def _subjects_table(subjects: dict, files: dict, fp_ml: dict, page_dir: Path) -> str:
    headers = [("subject", "t"), ("tumour voxels", ""), ("Dice", ""), ("AUROC", ""), ("AUPRC", ""),
               ("FP ml", ""), ("map", "t"), ("mask", "t")]
    rows = []
    for name in sorted(subjects):
        values = subjects[name] if isinstance(subjects[name], dict) else {}
        links = {k: f'<a href="{href(p, page_dir)}">{k}</a>' for k, p in files.get(name, {}).items()}
        rows.append("<tr>" + "".join([
            td(esc(name), name, "t"), td(esc(values.get("tumour_voxels", "")), values.get("tumour_voxels")),
            *(td(num(values.get(m)), sort_key(values.get(m))) for m in ("dice", "auroc", "auprc")),
            td(num(fp_ml.get(name), ".2f"), sort_key(fp_ml.get(name))),
            td(links.get("map", ""), None, "t"), td(links.get("mask", ""), None, "t")]) + "</tr>")
    return html_table(headers, rows) if rows else "<p class=muted>No per-subject values were stored for this entry.</p>"


def _json_table(mapping: dict) -> str:
    """Key / value rows; values as compact JSON, all escaped."""
    mapping = mapping if isinstance(mapping, dict) else {}
    rows = [f"<tr><td class=t><code>{esc(k)}</code></td><td class=t><code>"
            f"{esc(json.dumps(v, default=str) if not isinstance(v, str) else v)}</code></td></tr>"
            for k, v in sorted(mapping.items())]
    return f"<table><tbody>{''.join(rows)}</tbody></table>" if rows else "<p class=muted>none recorded</p>"


def _code_version(row, env: dict) -> str:
    """The version the leaderboard row records, and the run's own record where it says otherwise."""
    text = f"<code>{esc(row['code_version'])}</code>"
    other = env.get("code_version")
    return text + (f" (environment.json: <code>{esc(other)}</code>)" if other and other != row["code_version"] else "")


def _run_links(run_dir: Path | None, page_dir: Path) -> str:
    names = ("run.json", "config.json", "environment.json", "evaluation/metrics.json", "evaluation/per_subject.csv",
             "scores/index.json")
    found = [(n, run_dir / n) for n in names if run_dir is not None and (run_dir / n).is_file()]
    return " · ".join(f'<a href="{href(p, page_dir)}">{esc(n)}</a>' for n, p in found) or "none found"


def _summary(row, metric: str) -> list[tuple[str, str]]:
    """The leaderboard's numbers for one entry (recomputed from its maps when it was submitted)."""
    return [(f"{LABELS[m]} [95% CI]", _with_ci(row, m)) for m in ("auprc", "auroc", "dice")] + [
        ("Dice oracle (best threshold on test)", num(row["dice_oracle"])),
        ("subject-level AUROC (tumour vs healthy subjects)", num(row["subject_auroc"])),
        ("false-positive ml per healthy test subject", num(row["fp_ml_healthy"], ".2f")),
        ("validation residual healthy / tumour:healthy",
         _pair(num(row["healthy_residual"], ".4f"), num(row["residual_ratio"], ".2f"))),
        ("validation PSNR / SSIM", _pair(num(row["psnr"], ".2f"), num(row["ssim"], ".3f"))),
        (f"paired test vs top ({LABELS[metric]})", paired_badge(row, metric)[0])]


def _environment(row, env: dict) -> str:
    packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    return "\n".join(["<h2>Environment</h2>", facts([
        ("code version", _code_version(row, env)), ("hardware", esc(env.get("hardware", row["hardware"]))),
        ("python", esc(env.get("python", ""))), ("platform", esc(env.get("platform", "")))]),
        "<h3>Packages</h3>", _json_table(packages)])


def _provenance(row, run_dir: Path | None, site_runs: Path) -> str:
    def code(column):
        return f"<code>{esc(row[column])}</code>"

    return facts([("row id", code("row_id")), ("seed", esc(num(row["seed"], ".0f"))),
                   ("config hash", code("config_hash")), ("protocol hash", code("protocol_hash")),
                   ("dataset fingerprint", code("dataset_fingerprint")), ("split fingerprint", code("split_fingerprint")),
                   ("run folder", code("run_dir") + ("" if run_dir else " (not found here)")),
                   ("files", _run_links(run_dir, site_runs))])


def run_html(row, metric: str, subjects: dict, site_runs: Path, figure: str | None) -> str:
    """One entry: numbers, report figure, per-subject table, environment, timings, config, files."""
    run_dir = _run_dir(row)
    record, config, env, metrics = ((read_optional_json(run_dir / name) if run_dir else None) or {} for name in
                                    ("run.json", "config.json", "environment.json", "evaluation/metrics.json"))
    test = metrics.get("test")
    fp_ml = _numbers(test.get("false_positive_ml_per_healthy_subject") if isinstance(test, dict) else None)
    base = ' <span class="badge b-base">baseline</span>' if is_baseline(row["method"]) else ""
    body = ['<p class="small"><a href="../index.html">&larr; leaderboard</a></p>',
            f"<h1>{esc(row['method'])}{base}</h1>",
            f'<p class="muted">rank {esc(row["rank"])} of protocol <b>{esc(row["protocol_id"])}</b>, '
            f"{esc(num(row['test_subjects'], '.0f'))} test subjects</p>",
            "<h2>Numbers (recomputed at submission)</h2>", facts(_summary(row, metric)),
            "<h2>Report</h2>",
            f'<img class="report" src="{esc(figure)}" alt="report figure">' if figure
            else "<p class=muted>No report figure found in the run folder.</p>",
            "<h2>Per test subject</h2>",
            '<p class="muted small">Dice at the validation threshold, AUROC / AUPRC over the subject\'s brain voxels '
            "(blank where undefined); FP ml: false-positive volume of a healthy subject, from the run's own "
            "evaluation. Maps and masks are NIfTI files in the subject's original space.</p>",
            _subjects_table(subjects, _subject_files(run_dir), fp_ml, site_runs),
            _environment(row, env),
            "<h2>Timings</h2>", facts([
                ("training s", num(row["train_seconds"], ".1f")), ("scoring s", num(row["inference_seconds"], ".1f")),
                ("run created", esc(record.get("created", ""))), ("submitted", esc(row["submitted_at"]))]),
            "<h2>Resolved config</h2>", _json_table(config or record.get("entry") or {}),
            "<h2>Provenance</h2>", _provenance(row, run_dir, site_runs)]
    return html_page(f"{row['method']} - {row['protocol_id']}", "\n".join(body))


def _copy_figure(row, tmp_runs: Path) -> str | None:
    """Copy the run's report PNG into the site (the only copied file); its link relative to the page."""
    run_dir = _run_dir(row)
    source = run_dir / "evaluation" / "report.png" if run_dir else None
    if source is None or not source.is_file():
        return None
    target = tmp_runs / row["row_id"] / "report.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return f"{row['row_id']}/report.png"


# ----------------------------------------------------------------------------- entry point


def default_out(csv_path) -> Path:
    """``site/`` beside the leaderboard CSV (``results/leaderboard.csv`` -> ``results/site``)."""
    return Path(csv_path).parent / "site"


def _check_out(out: Path) -> None:
    """Only a new or empty folder, or a site written here before, may be (re)placed."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise InputError(out, "exists and is not a leaderboard site; choose a new or empty folder")


def build_site(csv_path, out=None, metric: str = "auprc") -> Path:
    """Write the static site for ``csv_path`` into ``out`` (default :func:`default_out`); returns index.html."""
    csv_path = Path(csv_path)
    out = Path(out) if out is not None else default_out(csv_path)
    _check_out(out)
    groups = _groups(ranked_table(csv_path, metric=metric))
    final_runs = out.resolve() / "runs"
    with atomic_dir(out) as tmp:
        (tmp / MARKER).write_text("written by pipeline.site; the whole folder is replaced on every rebuild\n")
        (tmp / "runs").mkdir()
        pages = set()
        for group in groups:
            for _, row in group[[_has_page(r) for _, r in group.iterrows()]].iterrows():
                figure = _copy_figure(row, tmp / "runs")
                page = run_html(row, metric, _sidecar(csv_path, row["row_id"]), final_runs, figure)
                (tmp / "runs" / f"{row['row_id']}.html").write_text(page, encoding="utf-8")
                pages.add(row["row_id"])
        (tmp / "index.html").write_text(index_html(groups, csv_path, metric, pages), encoding="utf-8")
    return out / "index.html"
