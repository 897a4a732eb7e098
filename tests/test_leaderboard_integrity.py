"""Adversarial submissions the leaderboard must refuse, and crash hygiene of its files.

Each test replays one attempt of the integrity issue's table with copies of faked runs (see
``test_leaderboard.make_run``) and checks the one-line error that names the file and the problem.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import shutil
import signal
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_leaderboard import N_BOOT, fake_row, good_map, make_run, usable_split

from pipeline.atomic import write_json
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.leaderboard.ranking import show
from pipeline.leaderboard.registry import protocol_hash, protocol_record, registry_path
from pipeline.leaderboard.submission import append_row, read_leaderboard, submit


@pytest.fixture(scope="module")
def official(synth_root, tmp_path_factory):
    """The organiser's protocol file, its binding and one honest run made under it."""
    from pipeline.protocols import load_protocol, protocol_for_submission

    root = tmp_path_factory.mktemp("official")
    split = usable_split(synth_root)
    content = {"id": "integrity-v1", "dataset": {"dir": str(synth_root)}, "split": {"seed": split["seed"]},
               "methods": [{"name": "m"}]}
    path = root / "protocol.yaml"
    path.write_text(yaml.safe_dump(content))
    binding = protocol_for_submission(load_protocol(path))
    assert binding["split"]["test"] == split["test"]  # the canonical split is the one the runs use
    record = protocol_record(binding)
    run = make_run(root / "results" / "runs" / "honest", synth_root, split, record, good_map, "honest")
    return {"root": root, "path": path, "binding": binding, "record": record, "split": split, "run": run,
            "dataset": synth_root}


def copy_run(official, tmp_path, name="copy") -> Path:
    run = tmp_path / "results" / "runs" / name
    shutil.copytree(official["run"], run)
    return run


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    write_json(path, data)


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- protocol binding


def test_own_split_file_with_healthy_test_patients_removed_is_refused(official, tmp_path, capsys):
    split = official["split"]
    healthy = [s for s in split["test"] if not np.asarray(nib.load(
        official["dataset"] / "Task01_BrainTumour" / "labelsTr" / f"{s}.nii.gz").dataobj).any()]
    assert healthy
    own = {**split, "test": [s for s in split["test"] if s not in healthy], "train": split["train"] + healthy}
    run = make_run(tmp_path / "results" / "runs" / "cherry", official["dataset"], own, official["record"],
                   good_map, "cherry")
    write_json(tmp_path / "results" / "split.json", own)  # beside the run, where the old code read it
    board = str(tmp_path / "lb.csv")
    with pytest.raises(InputError, match="split fingerprint differs from the split registered"):
        submit(run, board, official["binding"], n_boot=N_BOOT)
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", board,
                              "--protocol", str(official["path"])])
    assert "run.json" in line and "split fingerprint" in line
    assert not read_leaderboard_rows(board)


def read_leaderboard_rows(board) -> list:
    return [] if not Path(board).exists() else read_leaderboard(board).to_dict("records")


def test_run_json_cannot_name_its_own_protocol_file(official, tmp_path, capsys):
    own = {"id": "integrity-v1", "dataset": {"dir": str(tmp_path / "own-data")}, "methods": [{"name": "m"}]}
    own_path = tmp_path / "own.yaml"
    own_path.write_text(yaml.safe_dump(own))
    run = copy_run(official, tmp_path)
    edit_json(run / "run.json", lambda r: r.update(protocol={"id": own["id"], "hash": protocol_hash(own),
                                                             "path": str(own_path)}))
    board = str(tmp_path / "lb.csv")
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", board])
    assert "not registered" in line and str(registry_path(board)) in line  # nothing to check against yet
    assert main(["leaderboard", "init", "--protocol", str(official["path"]), "--leaderboard", board]) == 0
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", board])
    assert "run.json" in line and "protocol hash" in line and "registered" in line
    assert main(["leaderboard", "submit", str(official["run"]), "--leaderboard", board]) == 0  # honest run lands
    assert len(read_leaderboard(board)) == 1


def test_a_registered_id_cannot_be_rebound(official, tmp_path):
    board = tmp_path / "lb.csv"
    submit(official["run"], board, official["binding"], n_boot=N_BOOT)
    other = {**official["binding"], "hash": "0" * 64}
    with pytest.raises(InputError, match="is registered with hash") as err:
        submit(copy_run(official, tmp_path), board, other, n_boot=N_BOOT)
    assert err.value.source == str(registry_path(board))
    stored = json.loads(registry_path(board).read_text())["integrity-v1"]
    assert stored["hash"] == official["binding"]["hash"] and stored["split"]["test"] == official["split"]["test"]


# ----------------------------------------------------------------------------- maps confined to their run


def _point_first_test_map(run: Path, target: str) -> None:
    def change(index):
        name = sorted(s for s, r in index["subjects"].items() if r["section"] == "test")[0]
        index["subjects"][name]["files"]["score"] = target
    edit_json(run / "scores" / "index.json", change)


@pytest.mark.parametrize("attack", ["label-absolute", "label-relative", "other-run", "symlink-out", "hardlink-label"])
def test_map_paths_that_leave_the_run_are_refused(official, tmp_path, attack):
    run = copy_run(official, tmp_path)
    name = sorted(official["split"]["test"])[0]
    label = official["dataset"] / "Task01_BrainTumour" / "labelsTr" / f"{name}.nii.gz"
    if attack == "label-absolute":
        _point_first_test_map(run, str(label))
    elif attack == "label-relative":
        _point_first_test_map(run, os.path.relpath(label, run / "scores"))
    elif attack == "other-run":
        _point_first_test_map(run, os.path.relpath(official["run"] / "scores" / "test" / f"{name}_score.nii.gz",
                                                   run / "scores"))
    elif attack == "symlink-out":
        (run / "scores" / "test" / "evil.nii.gz").symlink_to(label)
        _point_first_test_map(run, "test/evil.nii.gz")
    else:
        local = tmp_path / "label-copy.nii.gz"  # a hard link needs the same file system
        shutil.copy(label, local)
        item = run / "scores" / "test" / "evil.nii.gz"
        os.link(local, item)
        _point_first_test_map(run, "test/evil.nii.gz")
        from pipeline.evaluation.evaluate import load_subject_maps
        with pytest.raises(InputError, match="is the label file"):
            load_subject_maps({"image": str(label).replace("labelsTr", "imagesTr"), "label": str(local)}, item)
        return
    with pytest.raises(InputError, match="must be relative|must stay inside|leaves the scores folder") as err:
        submit(run, tmp_path / "lb.csv", official["binding"], n_boot=N_BOOT)
    assert err.value.source.endswith("index.json")


def test_scores_folder_symlinked_elsewhere_is_refused(official, tmp_path):
    run = copy_run(official, tmp_path)
    shutil.rmtree(run / "scores")
    (run / "scores").symlink_to(official["run"] / "scores")
    with pytest.raises(InputError, match="scores folder leaves the run folder"):
        submit(run, tmp_path / "lb.csv", official["binding"], n_boot=N_BOOT)


def test_shifted_and_flipped_map_is_refused(official, tmp_path):
    run = copy_run(official, tmp_path)
    path = sorted((run / "scores" / "test").glob("*_score.nii.gz"))[0]
    img = nib.load(path)
    moved = img.affine.copy()
    moved[0, :] *= -1  # flip x
    moved[:3, 3] += 500.0  # and shift 500 mm
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), moved), path)
    with pytest.raises(InputError, match="map affine differs") as err:
        submit(run, tmp_path / "lb.csv", official["binding"], n_boot=N_BOOT)
    assert err.value.source == str(path.resolve())


def test_index_entry_without_section_is_a_one_line_error(official, tmp_path, capsys):
    run = copy_run(official, tmp_path)
    edit_json(run / "scores" / "index.json",
              lambda index: index["subjects"][official["split"]["test"][0]].pop("section"))
    board = str(tmp_path / "lb.csv")
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", board,
                              "--protocol", str(official["path"])])
    assert "index.json" in line and "'section' is a required property" in line


def test_the_same_maps_under_eight_names_land_once(official, tmp_path):
    board = tmp_path / "lb.csv"
    refused = 0
    for k in range(8):
        run = copy_run(official, tmp_path, f"alias{k}")
        edit_json(run / "run.json", lambda r, k=k: r.update(method=f"alias-{k}", config_hash=f"cfg{k}"))
        try:
            submit(run, board, official["binding"], n_boot=N_BOOT)
        except InputError as err:
            assert "identical to those of alias-0" in err.problem
            refused += 1
    assert refused == 7 and read_leaderboard(board)["method"].tolist() == ["alias-0"]


# ----------------------------------------------------------------------------- display and files


def test_markup_in_user_text_is_escaped_in_markdown(tmp_path):
    board = tmp_path / "lb.csv"
    append_row(board, fake_row(protocol_id="<script>alert(1)</script>", code_version="<img src=x onerror=alert(1)>"))
    text = show(board)
    assert "<script>" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_files_follow_the_umask(tmp_path):
    board = tmp_path / "lb.csv"
    old = os.umask(0o002)
    try:
        append_row(board, fake_row(subjects={"s": {"auprc": 0.5}}))
    finally:
        os.umask(old)
    sidecar = next((tmp_path / "lb.subjects").glob("*.json"))
    assert board.stat().st_mode & 0o777 == 0o664 and sidecar.stat().st_mode & 0o777 == 0o664


def _append_forever(board: str, worker: int) -> None:
    for k in range(10 ** 6):
        append_row(board, fake_row(method=f"k{worker}", seed=k, subjects={f"s{i}": {"auprc": 0.5} for i in range(50)}))


def test_kill_9_during_appends_leaves_a_clean_leaderboard(tmp_path):
    """30 writers killed with SIGKILL at random instants; the next writer tidies what they left."""
    board = str(tmp_path / "lb.csv")
    for k in range(50):  # a CSV big enough that a rewrite takes a while
        append_row(board, fake_row(method="base", seed=k))
    rng, ctx = random.Random(0), multiprocessing.get_context("fork")
    for worker in range(30):
        proc = ctx.Process(target=_append_forever, args=(board, worker))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
    append_row(board, fake_row(method="after", seed=0, subjects={"s": {"auprc": 0.5}}))
    rows = pd.read_csv(board)  # parses
    with open(board, newline="") as f:
        assert all(len(r) == len(rows.columns) for r in csv.reader(f))
    folder = tmp_path / "lb.subjects"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".lb")]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]
    sidecars = {p.stem for p in folder.glob("*.json")}
    with_subjects = set(rows.loc[rows["method"] != "base", "row_id"])
    assert sidecars == with_subjects and len(rows) > 51  # no orphan, none missing; the killed writers did append
    assert all(len(uuid.UUID(r).hex) == 32 for r in rows["row_id"])


def test_supervision_reaches_the_csv_and_the_table_and_a_missing_one_is_refused(official, tmp_path):
    board = tmp_path / "lb.csv"
    weak = copy_run(official, tmp_path, "weak")
    edit_json(weak / "run.json", lambda r: r.update(method="weak", supervision="weak slice labels"))
    submit(weak, board, official["binding"], n_boot=N_BOOT)
    assert read_leaderboard(board)["supervision"].tolist() == ["weak slice labels"]
    assert "| weak | weak slice labels |" in show(board)
    for bad in (None, "supervised"):
        run = copy_run(official, tmp_path, f"bad-{bad}")
        edit_json(run / "run.json", lambda r, bad=bad: r.pop("supervision") if bad is None else r.update(supervision=bad))
        with pytest.raises(InputError, match="supervision") as err:
            submit(run, board, official["binding"], n_boot=N_BOOT)
        assert err.value.source.endswith("run.json")
