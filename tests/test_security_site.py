"""The public site publishes only the run's own regular files, and nothing per test subject of a
hidden-label protocol (issue 25).

Rows are appended as in ``test_site`` (no metric computation); the run folders are then tampered
with after their submission, as their owner could, and the registry beside the CSV says which
protocol is scored against hidden labels.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from test_site import HEALTHY, SUBJECTS, make_row, make_run

from pipeline.atomic import write_json
from pipeline.leaderboard.site import build_site, organiser_out
from pipeline.leaderboard.submission import append_row

SECRET = "organiser-secret-4711"


def site_bytes(site: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file())


def one_row_board(tmp_path: Path, protocol_id: str = "proto-a") -> tuple[Path, dict, Path]:
    run = make_run(tmp_path, protocol_id, "diffusion-x0-s0")
    row = make_row(protocol_id, "diffusion-x0-s0", (0.9, 0.95, 0.8), run, 0)
    csv_path = tmp_path / "results" / "leaderboard.csv"
    append_row(csv_path, row)
    return csv_path, row, run


def secret_png(path: Path) -> Path:
    """A real PNG (what a label rendered as an image could be) that carries the secret in its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.eye(8), cmap="gray", metadata={"Comment": SECRET})
    assert SECRET.encode() in path.read_bytes()
    return path


def test_links_in_a_run_folder_never_reach_the_site(tmp_path):
    csv_path, row, run = one_row_board(tmp_path)
    organiser = tmp_path / "organiser"
    write_json(organiser / "synthetic.json", {"seed": SECRET})
    (run / "config.json").unlink()
    (run / "config.json").symlink_to(organiser / "synthetic.json")
    (run / "evaluation" / "report.png").unlink()
    (run / "evaluation" / "report.png").symlink_to(secret_png(organiser / "label.png"))
    site = build_site(csv_path, tmp_path / "site").parent
    assert SECRET.encode() not in site_bytes(site)
    assert not (site / "runs" / row["row_id"] / "report.png").exists()
    page = (site / "runs" / f"{row['row_id']}.html").read_text()
    assert "not regular files of the run, not shown: config.json, evaluation/report.png" in page
    assert 'href="../../results/proto-a/runs/diffusion-x0-s0/config.json"' not in page

    (run / "evaluation" / "report.png").unlink()  # a hard link is another name for the same secret
    os.link(organiser / "label.png", run / "evaluation" / "report.png")
    site = build_site(csv_path, tmp_path / "site").parent
    assert SECRET.encode() not in site_bytes(site) and not (site / "runs" / row["row_id"] / "report.png").exists()


def test_a_run_folder_swapped_for_a_link_is_not_read(tmp_path):
    csv_path, row, run = one_row_board(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run, elsewhere)
    write_json(elsewhere / "config.json", {"seed": SECRET})
    run.symlink_to(elsewhere)
    site = build_site(csv_path, tmp_path / "site").parent
    assert SECRET.encode() not in site_bytes(site)
    assert "(not found here)" in (site / "runs" / f"{row['row_id']}.html").read_text()


def test_hidden_label_protocols_show_no_per_subject_ground_truth(tmp_path):
    open_csv, open_row, _ = one_row_board(tmp_path / "open")
    hidden_csv, hidden_row, hidden_run = one_row_board(tmp_path / "hidden")
    for csv_path, labels in ((open_csv, "dataset labels"), (hidden_csv, "0123456789abcdef")):
        write_json(csv_path.with_name("leaderboard.protocols.json"),
                   {"proto-a": {"hash": "hash-proto-a", "content": {}, "ground_truth": labels}})

    site = build_site(open_csv, tmp_path / "open" / "site").parent  # the dataset's own labels: all shown
    page = (site / "runs" / f"{open_row['row_id']}.html").read_text()
    assert ">tumour voxels</th>" in page and all(name in page for name in SUBJECTS)
    assert (site / "runs" / open_row["row_id"] / "report.png").is_file()
    assert not organiser_out(site).exists()

    site = build_site(hidden_csv, tmp_path / "hidden" / "site").parent
    page = (site / "runs" / f"{hidden_row['row_id']}.html").read_text()
    assert ">tumour voxels</th>" not in page and not any(name in page for name in SUBJECTS)
    assert "test labels are hidden" in page and "&lt;site&gt;.organiser/" in page
    assert "per_subject.csv" not in page and "metrics.json" not in page
    assert not (site / "runs" / hidden_row["row_id"] / "report.png").exists()
    assert not any(name.encode() in site_bytes(site) for name in SUBJECTS)
    organiser = organiser_out(site)
    assert organiser == tmp_path / "hidden" / "site.organiser" and not organiser.is_relative_to(site)
    kept = json.loads((organiser / f"{hidden_row['row_id']}.json").read_text())
    assert kept["subjects"] == hidden_row["subjects"] and set(kept["false_positive_ml_per_healthy_subject"]) == HEALTHY
    assert str(hidden_run.resolve()) == kept["run_dir"]
