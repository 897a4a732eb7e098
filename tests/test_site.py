"""Static leaderboard site, checked in a real headless Chromium: rows, sorting, forest plot,
links that resolve, and user text that stays text.

The leaderboard is a small fixture (no training, no metric computation): rows appended with
:func:`pipeline.leaderboard.submission.append_row` and their per-subject sidecars, plus run folders holding
what the benchmark runner leaves (run.json, config, environment, report PNG, NIfTI maps and masks).
One row is written into the CSV by hand, as a hostile editor could, with markup in its method
name and code version (``append_row`` itself refuses such names).
"""

from __future__ import annotations

import csv
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import nibabel as nib
import numpy as np
import pytest

from pipeline.atomic import write_json
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.leaderboard.site import build_site
from pipeline.leaderboard.submission import COLUMNS, append_row

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
SUBJECTS = [f"BRATS_{i:03d}" for i in range(1, 9)]
HEALTHY = {"BRATS_007", "BRATS_008"}
EVIL_METHOD = "evil<script>window.pwned=1</script>"
EVIL_CODE = '"><img src=x onerror="window.pwned=2">'
PROTOCOLS = {  # protocol id -> [(method, AUPRC, AUROC, Dice)], the first a baseline
    "proto-a": [("flair-baseline-s0", 0.80, 0.93, 0.78), ("diffusion-x0-s0", 0.90, 0.95, 0.84),
                ("diffusion-ddim-s0", 0.70, 0.97, 0.60), ("simplex-s1", 0.85, 0.91, 0.81)],
    "proto-b<i>": [("flair-baseline-s0", 0.60, 0.90, 0.55), ("diffusion-x0-s0", 0.65, 0.92, 0.57)],
}


def tiny_nifti(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.float32), np.eye(4)), str(path))


def make_run(root: Path, protocol_id: str, method: str) -> Path:
    """A run folder as the benchmark runner leaves it (numbers are not read from it)."""
    import matplotlib.pyplot as plt

    run = root / "results" / protocol_id / "runs" / method
    for name in SUBJECTS:
        tiny_nifti(run / "scores" / "test" / f"{name}_score.nii.gz", 0.5)
        tiny_nifti(run / "evaluation" / "masks" / f"{name}_mask.nii.gz", 1)
    index = {"format": 1, "subjects": {n: {"section": "test", "files": {"score": f"test/{n}_score.nii.gz"}}
                                       for n in SUBJECTS}}
    write_json(run / "scores" / "index.json", index)
    plt.imsave(run / "evaluation" / "report.png", np.linspace(0, 1, 400).reshape(20, 20), cmap="inferno")
    write_json(run / "evaluation" / "metrics.json",
               {"test": {"false_positive_ml_per_healthy_subject": {n: 1.25 for n in HEALTHY}}})
    write_json(run / "config.json", {"sampler": "x0", "t_start": 150, "method_name": method})
    write_json(run / "environment.json", {"code_version": "abc123", "hardware": "x86_64 2 CPUs, no GPU",
                                          "python": "3.11.7", "platform": "Linux", "packages": {"monai": "1.6.1"}})
    write_json(run / "run.json", {"method": method, "created": "2025-01-01T00:00:00+00:00", "entry": {}})
    return run


def make_row(protocol_id: str, method: str, values: tuple, run: Path, k: int) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(row_id=uuid.uuid4().hex, method=method, protocol_id=protocol_id, protocol_hash=f"hash-{protocol_id}",
               dataset_fingerprint="d" * 16, split_fingerprint="s" * 64, config_hash=f"cfg{k}", seed=0,
               code_version="abc123", hardware="cpu", submitted_at=f"2025-01-0{k + 1}T00:00:00+00:00",
               run_dir=str(run.resolve()), test_subjects=len(SUBJECTS), n_boot=50, train_seconds=10.0 * k,
               inference_seconds=3.5, subject_auroc=1.0, fp_ml_healthy=1.25, dice_oracle=values[2] + 0.01)
    for m, v in zip(("auprc", "auroc", "dice"), values):
        row.update({m: v, f"{m}_ci_low": v - 0.03 - 0.01 * k, f"{m}_ci_high": v + 0.02})
    rng = np.random.default_rng(k)
    row["subjects"] = {n: {"auroc": None if n in HEALTHY else float(values[1] + rng.normal(0, 0.01)),
                           "auprc": None if n in HEALTHY else float(values[0] + rng.normal(0, 0.01)),
                           "dice": float(rng.uniform(0.2, 0.95)), "tumour_voxels": 0 if n in HEALTHY else 100 + i}
                       for i, n in enumerate(SUBJECTS)}
    return row


def append_raw(csv_path: Path, row: dict) -> None:
    """A row written into the CSV by hand (no validation), with its sidecar."""
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f))
    with open(csv_path, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(["" if row.get(c) is None else row[c] for c in header])
    write_json(csv_path.with_name(csv_path.stem + ".subjects") / f"{row['row_id']}.json",
               {"row_id": row["row_id"], "method": row["method"], "subjects": row["subjects"]})


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("site")
    csv_path = root / "results" / "leaderboard.csv"
    rows = {}
    for p, entries in PROTOCOLS.items():
        write_json(root / "results" / p / "protocol.json",
                   {"id": p, "hash": f"hash-{p}", "description": f"Protocol {p} <b>not bold</b>"})
        for k, (method, *values) in enumerate(entries):
            rows[p, method] = make_row(p, method, tuple(values), make_run(root, p, method), k)
            append_row(csv_path, rows[p, method])
    evil = make_row("proto-a", EVIL_METHOD, (0.5, 0.6, 0.4), root / "results" / "proto-a" / "runs" / "simplex-s1", 5)
    evil["code_version"] = EVIL_CODE
    append_raw(csv_path, evil)
    rows["proto-a", EVIL_METHOD] = evil
    index = build_site(csv_path)
    return {"root": root, "csv": csv_path, "index": index, "rows": rows}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium binary on PATH (CI installs Debian's chromium and chromium-driver in .ci/run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"  # a path: selenium never downloads one
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def section(driver, protocol_id: str):
    from selenium.webdriver.common.by import By

    found = [s for s in driver.find_elements(By.CSS_SELECTOR, "section.protocol")
             if s.get_attribute("data-protocol") == protocol_id]
    assert len(found) == 1, protocol_id
    return found[0]


def row_ids(table) -> list[str]:
    return [tr.get_attribute("data-row") for tr in table.find_elements("css selector", "tbody tr")]


def click_header(driver, table, label: str) -> None:
    th = next(th for th in table.find_elements("css selector", "thead th") if th.text.startswith(label))
    th.click()
    time.sleep(0.05)


def links_resolve(driver) -> list[str]:
    """Every href / src of the page as an absolute URL; asserts each is a file that exists."""
    urls = driver.execute_script(
        "return Array.from(document.querySelectorAll('[href],[src]')).map(function (e) {"
        "  return new URL(e.getAttribute('href') || e.getAttribute('src'), document.baseURI).href; });")
    for url in urls:
        parsed = urlparse(url)
        assert parsed.scheme == "file", url  # nothing from a server or the internet
        assert Path(url2pathname(parsed.path)).is_file(), url
    return urls


def assert_no_injection(driver) -> None:
    assert driver.execute_script("return document.scripts.length") == 1  # the site's own sorting script
    assert driver.execute_script("return window.pwned === undefined")
    assert not driver.execute_script("return document.querySelector('img[src=x]')")


# ----------------------------------------------------------------------------- index


def test_index_tables_sorting_forest_and_links(board, browser):
    open_page(browser, board["index"])
    rows = board["rows"]
    for p, entries in PROTOCOLS.items():
        sec = section(browser, p)
        table = sec.find_element("css selector", "table.sortable")
        ids = {rows[p, m]["row_id"] for m, *_ in entries} | ({rows["proto-a", EVIL_METHOD]["row_id"]}
                                                              if p == "proto-a" else set())
        assert len(row_ids(table)) == len(ids) and set(row_ids(table)) == ids
        ranked = sorted(ids, key=lambda r: -next(v for v in rows.values() if v["row_id"] == r)["auprc"])
        assert row_ids(table) == ranked  # ranked by AUPRC, the default metric
        for metric in ("auprc", "auroc", "dice"):  # one interval per entry and metric
            lines = sec.find_elements("css selector", f"svg.forest line.ci[data-metric={metric}]")
            assert sorted(line.get_attribute("data-row") for line in lines) == sorted(ids)
        baseline = sec.find_elements("css selector", "svg.forest line.ci.baseline[data-metric=auprc]")
        assert [b.get_attribute("data-row") for b in baseline] == [rows[p, "flair-baseline-s0"]["row_id"]]
        verdicts = [t.text for t in sec.find_elements("css selector", "svg.forest text.pv")]
        assert verdicts[0] == "top" and len(verdicts) == len(ids)
        assert all(v.startswith(("≈ p=", "≠ p=", "n/a")) for v in verdicts[1:])
    assert "Protocol proto-b<i> <b>not bold</b>" in section(browser, "proto-b<i>").text

    table = section(browser, "proto-a").find_element("css selector", "table.sortable")
    by_auroc = sorted((v for (p, _), v in rows.items() if p == "proto-a"), key=lambda v: v["auroc"])
    click_header(browser, table, "AUROC")
    assert row_ids(table) == [v["row_id"] for v in by_auroc]
    click_header(browser, table, "AUROC")
    assert row_ids(table) == [v["row_id"] for v in by_auroc[::-1]]
    th = next(th for th in table.find_elements("css selector", "thead th") if th.text.startswith("AUROC"))
    assert th.get_attribute("aria-sort") == "descending"
    click_header(browser, table, "method")
    assert [tr.find_elements("css selector", "td")[1].text.split(" baseline")[0]
            for tr in table.find_elements("css selector", "tbody tr")] == sorted(
        (m for p, m in rows if p == "proto-a"), key=str.lower)

    urls = links_resolve(browser)
    assert sum("/runs/" in u and u.endswith(".html") for u in urls) == len(rows)  # every entry links its page


def test_markup_in_user_text_renders_as_text(board, browser):
    open_page(browser, board["index"])
    assert_no_injection(browser)
    evil = board["rows"]["proto-a", EVIL_METHOD]
    cell = browser.find_element("css selector", f'tr[data-row="{evil["row_id"]}"] td:nth-child(2)')
    assert cell.text == EVIL_METHOD
    assert "<i>" in section(browser, "proto-b<i>").find_element("css selector", "h2").text

    open_page(browser, board["index"].parent / "runs" / f"{evil['row_id']}.html")
    assert_no_injection(browser)
    assert browser.find_element("css selector", "h1").text == EVIL_METHOD
    assert EVIL_CODE in browser.find_element("css selector", "body").text
    assert browser.title.startswith(EVIL_METHOD)


# ----------------------------------------------------------------------------- run page


def test_run_page_figure_subjects_config_and_files(board, browser):
    row = board["rows"]["proto-a", "diffusion-x0-s0"]
    open_page(browser, board["index"].parent / "runs" / f"{row['row_id']}.html")
    assert browser.execute_script("var i = document.querySelector('img.report'); return i.complete && i.naturalWidth") == 20
    table = browser.find_element("css selector", "table.sortable")
    assert len(row_ids(table)) == len(SUBJECTS)
    click_header(browser, table, "Dice")
    dice = [float(tr.find_elements("css selector", "td")[2].text) for tr in table.find_elements("css selector", "tbody tr")]
    assert dice == sorted(round(v["dice"], 3) for v in row["subjects"].values())
    text = browser.find_element("css selector", "body").text
    for needed in ("monai", "1.6.1", "x86_64 2 CPUs, no GPU", "t_start", "subject-level AUROC", "1.25"):
        assert needed in text
    urls = links_resolve(browser)
    assert sum(u.endswith("_score.nii.gz") for u in urls) == sum(u.endswith("_mask.nii.gz") for u in urls) == 8
    assert any(u.endswith("/index.html") for u in urls) and any(u.endswith("/run.json") for u in urls)


# ----------------------------------------------------------------------------- files and command line


def test_site_is_small_and_copies_only_report_figures(board):
    site = board["index"].parent
    files = [p for p in site.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".html", ".png", ""}
    assert sum(p.stat().st_size for p in files) < 2_000_000
    assert len(list(site.glob("runs/*.html"))) == len(board["rows"])
    page = board["index"].read_text()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_command_rebuilds_and_refuses_a_foreign_folder(board, tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["leaderboard", "site", "--csv", str(board["csv"]), "--out", str(out), "--metric", "dice"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    (out / "runs" / "stale.html").write_text("old")
    assert main(["leaderboard", "site", "--csv", str(board["csv"]), "--out", str(out)]) == 0
    assert not (out / "runs" / "stale.html").exists()  # the folder is replaced whole

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a leaderboard site"):
        build_site(board["csv"], foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["leaderboard", "site", "--csv", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2


def test_weakly_supervised_entries_are_marked(tmp_path):
    from test_leaderboard import fake_row

    from pipeline.leaderboard.site import build_site

    csv_path = tmp_path / "lb.csv"
    append_row(csv_path, fake_row("guided-cf", metric=0.9, supervision="weak slice labels"))
    append_row(csv_path, fake_row("x0", metric=0.8, supervision="unsupervised"))
    page = build_site(csv_path, tmp_path / "site").read_text()  # the index page
    assert page.count('title="learnt from labels">weak slice labels</span>') == 1


def test_description_comes_from_the_registered_protocol(board, tmp_path):
    """The leaderboard's own registry is trusted over a protocol.json left beside the runs; a damaged
    registry leaves the page to the runs' description."""
    csv_path = tmp_path / "leaderboard.csv"
    shutil.copy(board["csv"], csv_path)
    shutil.copytree(board["csv"].with_name("leaderboard.subjects"), tmp_path / "leaderboard.subjects")
    registry = tmp_path / "leaderboard.protocols.json"
    write_json(registry, {"proto-a": {"hash": "hash-proto-a", "content": {"description": "Registered text"}},
                          "proto-b<i>": {"hash": "another-hash", "content": {"description": "Not this one"}}})
    html = build_site(csv_path, tmp_path / "site").read_text()
    assert "Registered text" in html and "Protocol proto-a" not in html
    assert "Not this one" not in html and "Protocol proto-b&lt;i&gt;" in html, "a record of another hash is unused"
    registry.write_text("{damaged")
    html = build_site(csv_path, tmp_path / "site").read_text()
    assert "Registered text" not in html and "Protocol proto-a" in html
