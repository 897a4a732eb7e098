"""Copies and leaks on the leaderboard (issue 25): a monotone transform of an entry's maps is the same
entry to every metric and is refused naming the row it copies; a row scoring at or above the review
ceiling (a label leak) is held as ``needs review``, not ranked."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_leaderboard import bad_map, make_run
from test_leaderboard_integrity import cli_error, copy_run, edit_json, official  # noqa: F401

from pipeline.cli import main
from pipeline.leaderboard.clones import NEEDS_REVIEW, RankSample, spearman
from pipeline.leaderboard.ranking import ranked_table, show
from pipeline.leaderboard.registry import read_registry
from pipeline.leaderboard.submission import read_leaderboard


def _submit(run: Path, board: Path, protocol: Path, *extra: str) -> int:
    return main(["leaderboard", "submit", str(run), "--leaderboard", str(board), "--protocol", str(protocol), *extra])


def _rewrite_test_maps(run: Path, change) -> None:
    for path in sorted((run / "scores" / "test").glob("*_score.nii.gz")):
        image = nib.load(path)
        values = change(np.asarray(image.dataobj, dtype=np.float32)).astype(np.float32)
        nib.save(nib.Nifti1Image(values, image.affine), str(path))


def _copy_as(official, tmp_path: Path, name: str, change) -> Path:  # noqa: F811
    run = copy_run(official, tmp_path, name)
    _rewrite_test_maps(run, change)
    edit_json(run / "run.json", lambda r: r.update(method=name, config_hash="d00d" * 6))
    return run


@pytest.mark.parametrize("name, change", [("plus-one", lambda s: s + 1.0), ("times-two", lambda s: 2.0 * s),
                                          ("log1p", np.log1p), ("plus-tiny", lambda s: s + 1e-6)])
def test_a_monotone_transform_of_an_entry_is_refused_naming_the_row(official, tmp_path, capsys, name, change):  # noqa: F811
    board = tmp_path / "lb.csv"
    assert _submit(official["run"], board, official["path"]) == 0
    original = read_leaderboard(board)["row_id"].iloc[0]
    copy = _copy_as(official, tmp_path, name, change)
    line = cli_error(capsys, ["leaderboard", "submit", str(copy), "--leaderboard", str(board)])
    assert f"rank voxels as those of honest (row {original})" in line
    assert list(read_leaderboard(board)["method"]) == ["honest"]
    assert not list((tmp_path / "lb.subjects").glob(f"*{name}*"))
    other = make_run(tmp_path / "results" / "runs" / "other", official["dataset"], official["split"],
                     official["record"], bad_map, "other-method", seed=3, config_hash="beef" * 6)
    assert _submit(other, board, official["path"]) == 0, "a map that ranks voxels differently still lands"
    assert sorted(read_leaderboard(board)["method"]) == ["honest", "other-method"]


def test_the_rank_sample_sees_order_only_and_samples_the_same_voxels_for_every_row():
    rng = np.random.default_rng(0)
    brain = rng.random((12, 12, 12)) > 0.3
    score = rng.random((12, 12, 12), dtype=np.float32)
    first, second, other = RankSample(per_subject=300), RankSample(per_subject=300), RankSample(per_subject=300)
    for name in ("b", "a"):
        first.add(name, {"score": score, "brain": brain})
        second.add(name, {"score": np.exp(3 * score), "brain": brain})
        other.add(name, {"score": rng.random((12, 12, 12), dtype=np.float32), "brain": brain})
    assert first.values().shape == (600,)
    assert spearman(first.values(), second.values()) == pytest.approx(1.0)
    assert abs(spearman(first.values(), other.values())) < 0.2
    assert spearman(first.values(), np.ones(600)) == 0.0  # a constant map has no order to copy


def test_a_row_at_or_above_the_review_ceiling_is_held_not_ranked(official, tmp_path, capsys):  # noqa: F811
    board = tmp_path / "lb.csv"
    leak = make_run(tmp_path / "results" / "runs" / "leak", official["dataset"], official["split"], official["record"],
                    lambda label, rng: (label > 0).astype(np.float32), "label-leak", config_hash="1eaf" * 6)
    noisy = make_run(tmp_path / "results" / "runs" / "noisy", official["dataset"], official["split"],
                     official["record"], lambda label, rng: (label > 0) + 2.0 * rng.random(label.shape, np.float32),
                     "noisy", config_hash="0123" * 6)
    assert _submit(leak, board, official["path"]) == 0 and _submit(noisy, board, official["path"]) == 0
    table = ranked_table(board).set_index("method")
    assert table.loc["label-leak", "auprc"] == pytest.approx(1.0)
    assert table.loc["label-leak", "status"] == NEEDS_REVIEW and table.loc["noisy", "status"] == "ranked"
    assert table.loc["noisy", "rank"] == 1 and table.loc["noisy", "top_row_id"] == table.loc["noisy", "row_id"]
    rows = [line for line in show(board).splitlines() if line.startswith("|")]
    assert "review" in rows[-1] and "| 1 | noisy" in show(board)
    assert main(["leaderboard", "site", "--csv", str(board)]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    assert "needs review" in index
    # the organiser raises the ceiling for this protocol: the row is ranked
    assert main(["leaderboard", "init", "--protocol", str(official["path"]), "--leaderboard", str(board),
                 "--review-ceiling", "1.0"]) == 0
    assert read_registry(board)[official["binding"]["id"]]["review_ceiling"] == 1.0
    line = cli_error(capsys, ["leaderboard", "init", "--protocol", str(official["path"]), "--leaderboard", str(board),
                              "--review-ceiling", "1.5"])
    assert "review_ceiling: must be a number in (0, 1]" in line
