"""One leaderboard site page per run: recomputed numbers, per-subject table, environment, config, provenance.

Also the row helpers the index page shares (baseline marking, intervals, the paired-test badge); the
index and the folder it is written to are :mod:`pipeline.leaderboard.site`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.common import is_real
from pipeline.leaderboard.ranking import self_reported
from pipeline.leaderboard.run_files import file_problem, read_run_file, read_run_json, refused_files
from pipeline.leaderboard.webpage import esc, facts, href, html_page, html_table, missing, num, sort_key, td

BASELINE_PREFIX = "flair-baseline"


LABELS = {"auprc": "AUPRC", "auroc": "AUROC", "dice": "Dice"}


def is_baseline(method) -> bool:
    """The FLAIR-intensity baseline, named so by the benchmark runner (``flair-baseline...``)."""
    return str(method).startswith(BASELINE_PREFIX)


def run_dir_of(row) -> Path | None:
    """The row's run folder as submitted (stored resolved): a folder swapped for a link since is not read."""
    path = Path(str(row["run_dir"])) if str(row["run_dir"]) else None
    if path is None or not path.is_absolute() or path.is_symlink() or not path.is_dir():
        return None
    return path if path.resolve() == path else None


def paired_badge(row, metric: str) -> tuple[str, float]:
    """The paired-test verdict as a coloured badge, and a sort key (top first, untested last)."""
    if row.get("status") == "needs review":
        return ('<span class="badge b-na" title="test AUPRC at or above the review ceiling: held until the organiser '
                'has looked at it">needs review</span>', 3.0)
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


def source_badges(row) -> str:
    """Badges for maps made elsewhere (``external``) and for an entry the organiser re-ran (``reproduced``)."""
    out = ""
    if str(row.get("source") or "").lstrip("'") == "external maps":
        out += ' <span class="badge" title="maps made by the submitter\'s own code, submitted with submit-maps">external</span>'
    verdict = str(row.get("reproduced") or "")
    if verdict == "reproduced":
        out += (' <span class="badge b-top" title="re-run by the organiser from its recorded settings and weights: '
                'the same test metrics">reproduced</span>')
    elif verdict == "not reproduced":
        out += ' <span class="badge b-diff" title="re-run by the organiser: other test metrics">not reproduced</span>'
    return out


def _submitter(row) -> list[tuple[str, str]]:
    """Source, description and code link of a row (user text, escaped; a link only to an http(s) address)."""
    code = str(row.get("code_url") or "").lstrip("'")
    link = (f'<a href="{esc(code)}" rel="nofollow noopener">{esc(code)}</a>'
            if code.startswith(("https://", "http://")) and not any(c.isspace() for c in code) else esc(code))
    return [("source", esc(str(row.get("source") or "pipeline run").lstrip("'")) + source_badges(row)),
            ("description", esc(str(row.get("description") or "").lstrip("'"))), ("code", link)]


def with_ci(row, m: str, sep: str = " ") -> str:
    return (f"{num(row[m])}{sep}<span class=ci>[{num(row[m + '_ci_low'])}, {num(row[m + '_ci_high'])}]</span>"
            if not missing(row[m]) else "")


def _numbers(mapping) -> dict:
    """The numeric values of a mapping read from a run's own file (anything else is left out)."""
    if not isinstance(mapping, dict):
        return {}
    return {k: v for k, v in mapping.items() if is_real(v, finite=False)}


def _pair(a: str, b: str) -> str:
    return f"{a or 'n/a'} / {b or 'n/a'}"


def _subject_files(run_dir: Path | None) -> dict[str, dict[str, Path]]:
    """Per subject: the anomaly map and the thresholded mask, where the files exist inside the run."""
    if run_dir is None:
        return {}
    entries = read_run_json(run_dir, "scores/index.json").get("subjects", {})
    files = {}
    for name, item in entries.items() if isinstance(entries, dict) else ():
        found = {}
        score = (item.get("files") or {}).get("score") if isinstance(item, dict) else None
        if isinstance(score, str):
            found["map"] = f"scores/{score}"
        found["mask"] = f"evaluation/masks/{name}_mask.nii.gz"
        files[name] = {k: run_dir / rel for k, rel in found.items() if _own_file(run_dir, rel)}
    return files


def _own_file(run_dir: Path, relative: str) -> bool:
    """A regular file of the run folder (no link, nothing outside it) that exists: only such are linked."""
    try:
        return file_problem(run_dir, relative) is None and (run_dir / relative).is_file()
    except (OSError, ValueError):
        return False


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


def _bin_range(edges) -> str:
    """``< 1 ml``, ``1-10 ml``, ``>= 10 ml`` from a size bin's [lower, upper) edges; "" if they are not numbers."""
    if not isinstance(edges, list) or len(edges) != 2 or not is_real(edges[0]):
        return ""
    low, high = edges
    if high is None:
        return f"&ge; {esc(format(low, 'g'))} ml"
    if not is_real(high):
        return ""
    return f"&lt; {esc(format(high, 'g'))} ml" if low == 0 else f"{esc(format(low, 'g'))}-{esc(format(high, 'g'))} ml"


def _lesions_html(test) -> str:
    """Per-lesion detection by size and false-positive lesions, from the run's own metrics.json (every
    value checked and escaped: the file is the participant's); a note where it has none (older runs)."""
    lesions = test.get("lesions") if isinstance(test, dict) else None
    if not isinstance(lesions, dict):
        return "<p class=muted>No per-lesion figures in this run's evaluation (evaluated before they existed).</p>"
    total, found, rate = (_numbers(lesions.get(k)) for k in ("lesions", "detected", "detection_rate"))
    bins = lesions.get("size_bins_ml") if isinstance(lesions.get("size_bins_ml"), dict) else {}
    sized = [name for name in total if _bin_range(bins.get(name))]  # smallest first: metrics.json sorts keys
    order = sorted(sized, key=lambda name: bins[name][0]) + [name for name in total if name not in sized]
    rows = [f"<tr><td class=t>{esc(name)}</td><td class=t>{_bin_range(bins.get(name))}</td>"
            f"<td>{num(total[name], '.0f')}</td><td>{num(found.get(name), '.0f')}</td><td>{num(rate.get(name))}</td>"
            "</tr>" for name in order]
    heads = "".join(f'<th class="{c}">{esc(h)}</th>' for h, c in (("size bin", "t"), ("volume", "t"), ("lesions", ""),
                                                                  ("detected", ""), ("detection rate", "")))
    healthy = lesions.get("healthy") if isinstance(lesions.get("healthy"), dict) else {}
    criterion = lesions.get("criterion")
    return "\n".join([
        f"<table><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        facts([("false-positive lesions per test subject",
                num(_numbers(lesions).get("false_positive_lesions_per_subject"), ".2f")),
               ("false-positive lesions per healthy test subject",
                num(_numbers(healthy).get("false_positive_lesions_per_subject"), ".2f"))]),
        f'<p class="muted small">{esc(criterion)}.</p>' if isinstance(criterion, str) else ""])


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


def _run_links(run_dir: Path | None, page_dir: Path, hidden: bool) -> str:
    """Links to the run's own records; a hidden-label protocol's evaluation files (per-subject values) are left out."""
    names = ("run.json", "config.json", "environment.json", "scores/index.json") + \
        (() if hidden else ("evaluation/metrics.json", "evaluation/per_subject.csv"))
    found = [(n, run_dir / n) for n in names if run_dir is not None and _own_file(run_dir, n)]
    links = " · ".join(f'<a href="{href(p, page_dir)}">{esc(n)}</a>' for n, p in found) or "none found"
    refused = refused_files(run_dir)
    return links + (f" (not regular files of the run, not shown: {esc(', '.join(refused))})" if refused else "")


def _summary(row, metric: str) -> list[tuple[str, str]]:
    """The leaderboard's numbers for one entry (recomputed from its maps when it was submitted)."""
    return [(f"{LABELS[m]} [95% CI]", with_ci(row, m)) for m in ("auprc", "auroc", "dice")] + [
        ("Dice oracle (best threshold on test)", num(row["dice_oracle"])),
        ("subject-level AUROC (tumour vs healthy subjects)", num(row["subject_auroc"])),
        ("false-positive ml per healthy test subject", num(row["fp_ml_healthy"], ".2f")),
        ("validation residual healthy / tumour:healthy" + _self_reported(row, "healthy_residual"),
         _pair(num(row["healthy_residual"], ".4f"), num(row["residual_ratio"], ".2f"))),
        ("validation PSNR / SSIM" + _self_reported(row, "psnr"), _pair(num(row["psnr"], ".2f"), num(row["ssim"], ".3f"))),
        (f"paired test vs top ({LABELS[metric]})", paired_badge(row, metric)[0])]


def _self_reported(row, column: str) -> str:
    return " (self-reported, not recomputed)" if self_reported(row, column) else ""


def _environment(row, env: dict) -> str:
    packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    return "\n".join(["<h2>Environment</h2>", facts([
        ("code version", _code_version(row, env)), ("hardware", esc(env.get("hardware", row["hardware"]))),
        ("python", esc(env.get("python", ""))), ("platform", esc(env.get("platform", "")))]),
        "<h3>Packages</h3>", _json_table(packages)])


def _provenance(row, run_dir: Path | None, site_runs: Path, hidden: bool) -> str:
    def code(column):
        return f"<code>{esc(row[column])}</code>"

    return facts([("row id", code("row_id")), ("seed", esc(num(row["seed"], ".0f"))),
                   ("config hash", code("config_hash")), ("protocol hash", code("protocol_hash")),
                   ("dataset fingerprint", code("dataset_fingerprint")), ("split fingerprint", code("split_fingerprint")),
                   ("run folder", code("run_dir") + ("" if run_dir else " (not found here)")),
                   ("files", _run_links(run_dir, site_runs, hidden))])


HIDDEN_NOTE = ("<p class=muted>This protocol's test labels are hidden: no figure derived from them per test subject "
               "(tumour voxels, per-subject Dice / AUROC / AUPRC, false-positive ml of healthy subjects, the report "
               "figure) is published. The organiser's copy is written beside the site, in <code>&lt;site&gt;.organiser/"
               "</code>, never into it.</p>")


def _subjects_section(subjects: dict, run_dir: Path | None, test, site_runs: Path, hidden: bool) -> list[str]:
    """The per-test-subject table, or for a hidden-label protocol the note that it is withheld."""
    if hidden:
        return ["<h2>Per test subject</h2>", HIDDEN_NOTE]
    fp_ml = _numbers(test.get("false_positive_ml_per_healthy_subject") if isinstance(test, dict) else None)
    return ["<h2>Per test subject</h2>",
            '<p class="muted small">Dice at the validation threshold, AUROC / AUPRC over the subject\'s brain voxels '
            "(blank where undefined); FP ml: false-positive volume of a healthy subject, from the run's own "
            "evaluation. Maps and masks are NIfTI files in the subject's original space.</p>",
            _subjects_table(subjects, _subject_files(run_dir), fp_ml, site_runs)]


def run_html(row, metric: str, subjects: dict, site_runs: Path, figure: str | None, hidden: bool = False) -> str:
    """One entry: numbers, report figure, per-subject table, environment, timings, config, files.

    Run files are read only as regular files of the run (:mod:`pipeline.leaderboard.run_files`);
    ``hidden``: the protocol's test labels are hidden, so nothing per test subject is shown."""
    run_dir = run_dir_of(row)
    record, config, env, metrics = (read_run_json(run_dir, name) for name in
                                    ("run.json", "config.json", "environment.json", "evaluation/metrics.json"))
    test = metrics.get("test")
    base = ' <span class="badge b-base">baseline</span>' if is_baseline(row["method"]) else ""
    body = ['<p class="small"><a href="../index.html">&larr; leaderboard</a></p>',
            f"<h1>{esc(row['method'])}{base}</h1>",
            f'<p class="muted">rank {esc(row["rank"])} of protocol <b>{esc(row["protocol_id"])}</b>, '
            f"{esc(num(row['test_subjects'], '.0f'))} test subjects</p>",
            facts(_submitter(row)),
            "<h2>Numbers (recomputed at submission)</h2>", facts(_summary(row, metric)),
            "<h2>Report</h2>",
            f'<img class="report" src="{esc(figure)}" alt="report figure">' if figure
            else "<p class=muted>No report figure " + ("published (hidden test labels)." if hidden
                                                        else "found in the run folder.") + "</p>",
            "<h2>Per lesion (test, at the validation threshold; the run's own evaluation)</h2>", _lesions_html(test),
            *_subjects_section(subjects, run_dir, test, site_runs, hidden),
            _environment(row, env),
            "<h2>Timings</h2>", facts([
                ("training s", num(row["train_seconds"], ".1f")), ("scoring s", num(row["inference_seconds"], ".1f")),
                ("run created", esc(record.get("created", ""))), ("submitted", esc(row["submitted_at"]))]),
            "<h2>Resolved config</h2>", _json_table(config or record.get("entry") or {}),
            "<h2>Provenance</h2>", _provenance(row, run_dir, site_runs, hidden)]
    return html_page(f"{row['method']} - {row['protocol_id']}", "\n".join(body))


def copy_figure(row, tmp_runs: Path) -> str | None:
    """Copy the run's report PNG into the site (the only copied file; a regular file of the run, never
    a link); its link relative to the page."""
    run_dir = run_dir_of(row)
    data = read_run_file(run_dir, "evaluation/report.png") if run_dir else None
    if data is None:
        return None
    target = tmp_runs / row["row_id"] / "report.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"{row['row_id']}/report.png"
