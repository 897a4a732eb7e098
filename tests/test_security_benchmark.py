"""The benchmark runner never loses an entry and never writes outside ``--results`` (issue 25).

FLAIR-baseline entries only (no training): a few seconds each on the session's tiny dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

import pipeline.leaderboard.submission as submission
from pipeline.protocols import load_protocol, run_benchmark, run_entry
from pipeline.cli import main
from pipeline.errors import InputError

VOLATILE = ["row_id", "submitted_at", "run_dir", "train_seconds", "inference_seconds"]
"""Columns that differ between two honest runs of one protocol (ids, clocks, folders)."""


def flair_protocol(path: Path, dataset_dir: Path, protocol_id: str = "resume-v1", name: str = "flair-baseline") -> Path:
    path.write_text(yaml.safe_dump({
        "id": protocol_id, "dataset": {"dir": str(dataset_dir)}, "split": {"seed": 1},
        "bundle": {"image_size": 32, "pixdim": [4.0, 4.0, 4.0], "num_workers": 1, "score_batch_size": 128},
        "evaluation": {"bootstrap_resamples": 20},
        "methods": [{"name": name, "sampler": "flair", "median_3d": [1, 3, 5]}]}))
    return path


def board_rows(csv_path: Path) -> list[dict]:
    """The leaderboard row for row, without the columns that differ between honest runs."""
    board = pd.read_csv(csv_path, dtype=str, keep_default_na=False).drop(columns=VOLATILE)
    return board.sort_values("method").to_dict("records")


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def test_a_run_killed_before_its_row_is_submitted_next_time(synth_root, tmp_path, monkeypatch, capsys):
    protocol = flair_protocol(tmp_path / "p.yaml", synth_root)
    run_benchmark(protocol, tmp_path / "whole", tmp_path / "whole.csv", progress=False)  # uninterrupted

    real_submit, calls = submission.submit, []

    def killed_on_second(run_dir, *args, **kwargs):
        calls.append(Path(run_dir).name)
        if len(calls) == 2:  # run.json of the second entry is written; its row is not
            raise Killed
        return real_submit(run_dir, *args, **kwargs)

    monkeypatch.setattr(submission, "submit", killed_on_second)
    with pytest.raises(Killed):
        run_benchmark(protocol, tmp_path / "cut", tmp_path / "cut.csv", progress=False)
    second = tmp_path / "cut" / "resume-v1" / "runs" / calls[1] / "run.json"
    assert second.is_file() and len(pd.read_csv(tmp_path / "cut.csv")) == 1
    stamp = second.stat().st_mtime_ns
    monkeypatch.setattr(submission, "submit", real_submit)

    capsys.readouterr()
    run_benchmark(protocol, tmp_path / "cut", tmp_path / "cut.csv", progress=True)
    printed = capsys.readouterr().out
    methods = [r["method"] for r in board_rows(tmp_path / "whole.csv")]
    assert [r["method"] for r in board_rows(tmp_path / "cut.csv")] == methods
    assert board_rows(tmp_path / "cut.csv") == board_rows(tmp_path / "whole.csv")
    assert len(board_rows(tmp_path / "cut.csv")) == 3
    assert f"{calls[1]}: run found, submitting its missing row" in printed
    assert second.stat().st_mtime_ns == stamp, "the run is submitted, not run again"

    run_benchmark(protocol, tmp_path / "cut", tmp_path / "cut.csv", progress=True)  # now everything is done
    assert capsys.readouterr().out.count("already done") == 3
    assert len(board_rows(tmp_path / "cut.csv")) == 3


# ----------------------------------------------------------------------------- names and output folders


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("field, value, message", [
    ("id", "../../x", "protocol id"), ("id", "ABSOLUTE", "protocol id"), ("id", ".hidden", "protocol id"),
    ("id", "a/b", "protocol id"), ("id", "x" * 81, "protocol id"),
    ("name", "../../../../X", "method name"), ("name", "ok..no", "method name"), ("name", "/etc", "method name")])
def test_names_that_would_leave_the_results_folder_are_refused(synth_root, tmp_path, capsys, field, value, message):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    value = str(tmp_path / "abs-x") if value == "ABSOLUTE" else value
    protocol = flair_protocol(work / "p.yaml", synth_root, **{"protocol_id" if field == "id" else "name": value})
    before = files_under(tmp_path)
    capsys.readouterr()
    code = main(["benchmark", str(protocol), "--results", str(work / "results"), "--leaderboard",
                 str(work / "lb.csv"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {protocol}: {message} ")
    assert files_under(tmp_path) == before, "nothing written anywhere"


def test_output_folders_are_confined_even_past_the_name_check(synth_root, tmp_path):
    """The second guard: a path that resolves outside ``--results`` (a planted symlink, or an entry
    id that never went through the name check) is refused before anything is written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    results = tmp_path / "results"
    results.mkdir()
    (results / "resume-v1").symlink_to(outside)
    protocol = flair_protocol(tmp_path / "p.yaml", synth_root)
    with pytest.raises(InputError, match="leaves the results folder"):
        run_benchmark(protocol, results, tmp_path / "lb.csv", progress=False)
    loaded = load_protocol(protocol)
    with pytest.raises(InputError, match="leaves the results folder"):
        run_entry(loaded, {"id": "../../../escaped", "name": "x", "sampler": "flair", "seed": 0},
                  results / "ok", synth_root, progress=False)
    assert not list(outside.iterdir()) and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "lb.csv").exists() and not (results / "ok").exists()
    assert json.loads(json.dumps(os.listdir(results))) == ["resume-v1"]
