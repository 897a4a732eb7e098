"""Submissions that would carry files or bindings past the leaderboard's checks (issue 25).

Links in a run folder (the site copies ``report.png`` and shows ``config.json``) and a participant
binding a hidden-label protocol before the organiser: each is one ``error:`` line, exit 2, and
nothing written to the leaderboard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_input_safety import hidden  # noqa: F401  (module fixture: a hidden-label dataset)
from test_leaderboard_integrity import cli_error, copy_run, official  # noqa: F401

from pipeline.atomic import write_json
from pipeline.cli import main
from pipeline.leaderboard.registry import registry_path

SECRET = b"organiser-secret-4711"


def secret_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "organiser" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


def _symlink(run: Path, name: str, target: Path) -> None:
    if (run / name).is_dir():
        shutil.rmtree(run / name)
    (run / name).unlink(missing_ok=True)
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).symlink_to(target)


@pytest.mark.parametrize("name", ["evaluation/report.png", "config.json", "environment.json", "run.json"])
def test_a_symlinked_run_file_is_refused_at_submit(official, tmp_path, capsys, name):  # noqa: F811
    run = copy_run(official, tmp_path)
    if name == "run.json":  # the record itself, moved out and linked back
        shutil.move(run / "run.json", tmp_path / "outside-run.json")
        _symlink(run, name, tmp_path / "outside-run.json")
    else:
        _symlink(run, name, secret_file(tmp_path, Path(name).name))
    board = tmp_path / "lb.csv"
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", str(board),
                              "--protocol", str(official["path"])])
    assert f"{run.resolve() / name}: is a symbolic link" in line
    assert not board.exists() and not registry_path(board).exists()


def test_a_hard_link_or_a_folder_outside_is_refused_at_submit(official, tmp_path, capsys):  # noqa: F811
    board = tmp_path / "lb.csv"
    run = copy_run(official, tmp_path, "hard")
    os.link(secret_file(tmp_path, "synthetic.json"), run / "config.json")
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", str(board),
                              "--protocol", str(official["path"])])
    assert "config.json: is a hard link" in line
    run = copy_run(official, tmp_path, "folder")
    secret_file(tmp_path, "report.png")
    _symlink(run, "evaluation", tmp_path / "organiser")  # the folder, not the file, is the link
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", str(board),
                              "--protocol", str(official["path"])])
    assert "report.png: lies in a folder outside the run folder" in line
    assert not board.exists()
    assert main(["leaderboard", "submit", str(official["run"]), "--leaderboard", str(board),
                 "--protocol", str(official["path"])]) == 0, "an honest run still lands"


# ----------------------------------------------------------------------------- hidden labels: first come


def public_protocol(tmp_path: Path, hidden: dict) -> Path:  # noqa: F811
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump({
        "id": "public-v1", "dataset": {"dir": str(hidden["data"])}, "split": {"seed": hidden["seed"]},
        "bundle": {"image_size": 32, "pixdim": [4.0, 4.0, 4.0]}, "evaluation": {"bootstrap_resamples": 20},
        "methods": [{"name": "flair-baseline", "sampler": "flair"}]}))
    return path


def test_only_the_organiser_binds_a_hidden_label_protocol(hidden, tmp_path, capsys):  # noqa: F811
    protocol, board = public_protocol(tmp_path, hidden), tmp_path / "lb.csv"
    results = tmp_path / "results"
    bench = ["benchmark", str(protocol), "--results", str(results), "--leaderboard", str(board), "--quiet"]
    # a participant's first submission (through the runner, with labels of their own) cannot bind the id
    fake_truth = tmp_path / "fake-truth"
    shutil.copytree(hidden["truth"], fake_truth)
    line = cli_error(capsys, [*bench, "--ground-truth", str(fake_truth)])
    assert "not bound on this leaderboard" in line and "leaderboard init" in line and "--ground-truth" in line
    assert not registry_path(board).exists() and not board.exists() and not (results / "public-v1" / "runs").exists()
    # nor can a submitted run folder (made by the organiser's data, submitted by anyone)
    write_json(tmp_path / "dummy" / "run.json", {  # a well-formed record (the schema is checked first)
        "method": "dummy", "protocol": {"id": "public-v1", "hash": "0" * 64}, "dataset": {"fingerprint": "0" * 16},
        "split": {"fingerprint": "0" * 64}, "config_hash": "x", "seed": 0, "code_version": "t",
        "supervision": "unsupervised"})
    line = cli_error(capsys, ["leaderboard", "submit", str(tmp_path / "dummy"), "--leaderboard", str(board),
                              "--protocol", str(protocol)])
    assert "hides its test labels" in line and not registry_path(board).exists()
    # init needs the ground truth, and binds it
    line = cli_error(capsys, ["leaderboard", "init", "--protocol", str(protocol), "--leaderboard", str(board)])
    assert "only the organiser binds it" in line and not registry_path(board).exists()
    assert main(["leaderboard", "init", "--protocol", str(protocol), "--leaderboard", str(board),
                 "--ground-truth", str(hidden["truth"])]) == 0
    bound = json.loads(registry_path(board).read_text())["public-v1"]["ground_truth"]
    assert len(bound) == 16
    # now the organiser's runs land, and other labels are still refused
    assert main([*bench, "--ground-truth", str(hidden["truth"])]) == 0
    assert board.is_file()
    line = cli_error(capsys, ["leaderboard", "init", "--protocol", str(protocol), "--leaderboard", str(board),
                              "--ground-truth", str(tmp_path / "missing")])
    assert "no hidden label for test subject" in line
