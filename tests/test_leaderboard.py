"""Leaderboard: recomputed numbers, provenance checks, CSV safety, concurrent appends, ranking.

Run folders are faked without training: score maps written straight into each label's space
(tumour indicator plus noise for a good method, noise only for a bad one) with the index.json
that ``pipeline.scoring.score.score_split`` writes (with :data:`RECON` as every subject's reconstruction
record), and the run.json of the benchmark runner.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.atomic import write_json
from pipeline.data.dataset import dataset_fingerprint, load_subjects
from pipeline.data.split import make_split
from pipeline.errors import InputError
from pipeline.evaluation.evaluate import compute_metrics
from pipeline.leaderboard.ranking import ranked_table, show
from pipeline.leaderboard.registry import protocol_hash, protocol_record, split_fingerprint
from pipeline.leaderboard.submission import (ADDED_COLUMNS, COLUMNS, append_row, check_method_name, read_leaderboard,
                                             submission_row, submit)

N_BOOT = 50
PROTOCOL_CONTENT = {"id": "synthetic-test-v1", "dataset": "synthetic", "methods": ["good", "bad"], "seeds": [0]}


def recon_record(tumour: bool) -> dict:
    """Pooled over any subjects: healthy residual 0.1, tumour residual 0.3 (ratio 3), PSNR 25, SSIM 0.75."""
    return {"healthy_residual_sum": 2.0, "healthy_voxels": 20, "tumour_residual_sum": 3.0 if tumour else 0.0,
            "tumour_voxels": 10 if tumour else 0, "psnr_sum": 50.0, "ssim_sum": 1.5, "healthy_slices": 2}


def good_map(label, rng):
    """Tumour above most healthy voxels, not all: AUPRC well below the review ceiling (a perfect map is held)."""
    return (label > 0).astype(np.float32) + 1.2 * rng.random(label.shape, dtype=np.float32)


def bad_map(label, rng):
    return rng.random(label.shape, dtype=np.float32)


def make_run(run_dir: Path, dataset_dir: Path, split: dict, protocol: dict, score_fn, method: str,
             seed: int = 0, **run_fields) -> Path:
    """A finished run folder: scores/<section>/<subject>_score.nii.gz + index.json, run.json, evaluation/."""
    items = {item["subject"]: item for item in load_subjects(dataset_dir).data}
    rng = np.random.default_rng(seed)
    subjects = {}
    for section in ("validation", "test"):
        (run_dir / "scores" / section).mkdir(parents=True, exist_ok=True)
        for name in split[section]:
            label = nib.load(items[name]["label"])
            score = score_fn(np.asarray(label.dataobj), rng)
            nib.save(nib.Nifti1Image(score, label.affine), str(run_dir / "scores" / section / f"{name}_score.nii.gz"))
            subjects[name] = {"section": section, "seconds": 0.1, "recon": recon_record(bool(np.any(label.dataobj))),
                              "files": {"score": f"{section}/{name}_score.nii.gz"}}
    write_json(run_dir / "scores" / "index.json", {"format": 1, "settings": {"sampler": "fake"}, "subjects": subjects})
    write_json(run_dir / "evaluation" / "metrics.json", {"test": {"auroc": 0.999, "auprc": 0.999, "dice": 0.999}})
    record = {"method": method, "entry": {"kind": "fake"}, "supervision": "unsupervised",
              "protocol": {"id": protocol["id"], "hash": protocol["hash"]},
              "dataset": {"dir": str(dataset_dir), "fingerprint": dataset_fingerprint(dataset_dir)},
              "split": {"file": "split.json", "fingerprint": split_fingerprint(split)},
              "config_hash": "c0ffee" * 4, "seed": seed, "code_version": "0.1.0", "hardware": "cpu (test)",
              "timings": {"train_seconds": 12.5, "inference_seconds": 4.25}, "created": "2025-01-01T00:00:00+00:00"}
    record.update(run_fields)
    write_json(run_dir / "run.json", record)
    return run_dir


def direct_maps_hash(run: Path, test: list[str]) -> str:
    """SHA-256 over the test maps' float32 voxel values (C order) by sorted subject name, from the files."""
    digest = hashlib.sha256()
    for name in sorted(test):
        score = np.asarray(nib.load(run / "scores" / "test" / f"{name}_score.nii.gz").dataobj, dtype=np.float32)
        digest.update(f"{name}:{score.shape};".encode() + np.ascontiguousarray(score).tobytes())
    return digest.hexdigest()


def usable_split(synth_root) -> dict:
    """The canonical split (default fractions) of the first seed whose validation and test sections
    both hold subjects with and without a tumour."""
    items = load_subjects(synth_root).data
    tumour = {it["subject"] for it in items if np.asarray(nib.load(it["label"]).dataobj).any()}
    for split_seed in range(200):
        split = make_split([it["subject"] for it in items], seed=split_seed)
        if all(0 < len(tumour & set(split[s])) < len(split[s]) for s in ("validation", "test")):
            return split
    raise AssertionError("no usable split seed")


def binding_for(dataset_dir, split, content=PROTOCOL_CONTENT) -> dict:
    """What ``pipeline.protocols.protocol_for_submission`` hands the leaderboard."""
    return {"id": content["id"], "hash": protocol_hash(content), "content": content,
            "dataset_dir": str(dataset_dir), "split": split}


@pytest.fixture(scope="module")
def bench(synth_root, tmp_path_factory):
    """Protocol binding and record, and three run folders (good, an identical copy of good, bad)."""
    root = tmp_path_factory.mktemp("bench")
    split = usable_split(synth_root)
    items = load_subjects(synth_root).data
    tumour = {it["subject"] for it in items if np.asarray(nib.load(it["label"]).dataobj).any()}
    binding = binding_for(synth_root, split)
    protocol = protocol_record(binding)
    runs = {name: make_run(root / "runs" / name, synth_root, split, protocol, fn, name)
            for name, fn in (("good", good_map), ("bad", bad_map))}
    runs["good-copy"] = root / "runs" / "good-copy"
    shutil.copytree(runs["good"], runs["good-copy"])
    record = json.loads((runs["good-copy"] / "run.json").read_text())
    write_json(runs["good-copy"] / "run.json", {**record, "method": "good-copy"})
    return {"root": root, "split": split, "binding": binding, "protocol": protocol, "runs": runs, "tumour": tumour}


def fake_row(method="m", seed=0, metric=0.5, subjects=None, **fields) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(row_id=uuid.uuid4().hex, method=method, protocol_id="p1", protocol_hash="h1", dataset_fingerprint="d1",
               split_fingerprint="s1", config_hash="c1", seed=seed, code_version="v1", hardware="cpu",
               submitted_at="2025-01-01T00:00:00+00:00", run_dir="/runs/x", test_subjects=10, n_boot=10)
    for m in ("auroc", "auprc", "dice"):
        row.update({m: metric, f"{m}_ci_low": metric - 0.1, f"{m}_ci_high": metric + 0.1})
    row.update(subjects=subjects, **fields)
    return row


def raw_rows(csv_path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprints_are_canonical():
    split = {"train": ["b", "a"], "validation": ["c"], "test": ["e", "d"], "seed": 3}
    assert split_fingerprint(split) == split_fingerprint({"test": ["d", "e"], "validation": ["c"], "train": ["a", "b"]})
    assert split_fingerprint(split) != split_fingerprint({**split, "test": ["d"]})
    assert protocol_hash({"a": 1, "b": [1, 2]}) == protocol_hash({"b": [1, 2], "a": 1}) != protocol_hash({"a": 2})
    with pytest.raises(InputError, match="lists"):
        split_fingerprint({"train": ["a"]})


# ----------------------------------------------------------------------------- submission


def test_submission_recomputes_numbers_and_ignores_tampered_metrics(bench, tmp_path):
    csv_path = tmp_path / "lb.csv"
    run = bench["runs"]["good"]
    row = submit(run, csv_path, bench["binding"], n_boot=N_BOOT)
    expected = compute_metrics(bench["protocol"]["dataset_dir"], run / "scores", n_boot=N_BOOT, progress=False).metrics
    for m in ("auroc", "auprc", "dice"):
        assert row[m] == expected["test"][m] != 0.999
        assert [row[f"{m}_ci_low"], row[f"{m}_ci_high"]] == expected["test"]["ci95"][m]
    assert row["dice_oracle"] == expected["test"]["dice_oracle"]
    assert row["subject_auroc"] == expected["test"]["subject_auroc"] is not None  # bench: both classes in test
    assert row["fp_ml_healthy"] == expected["test"]["false_positive_ml_healthy"] is not None
    recon = (row["healthy_residual"], row["residual_ratio"], row["psnr"], row["ssim"])
    assert recon == pytest.approx((0.1, 3.0, 25, 0.75))  # recon_record, pooled over the validation subjects
    assert row["protocol_hash"] == bench["protocol"]["hash"] and row["run_dir"] == str(run.resolve())
    assert row["maps_hash"] == direct_maps_hash(run, bench["split"]["test"])
    assert set(row["subjects"]) == set(bench["split"]["test"])
    for name, values in row["subjects"].items():
        assert (values["auprc"] is None) == (name not in bench["tumour"])

    stored = read_leaderboard(csv_path)  # numbers round-trip exactly
    assert len(stored) == 1 and stored.loc[0, "auroc"] == row["auroc"] and stored.loc[0, "seed"] == 0
    assert stored.loc[0, "train_seconds"] == 12.5 and stored.loc[0, "submitted_at"].endswith("+00:00")
    for column in ADDED_COLUMNS:
        assert stored.loc[0, column] == row[column]
    sidecar = json.loads((tmp_path / "lb.subjects" / f"{row['row_id']}.json").read_text())
    assert sidecar["subjects"] == row["subjects"]
    with pytest.raises(InputError, match="already on the leaderboard"):
        submit(run, csv_path, bench["binding"], n_boot=N_BOOT)


def test_changed_dataset_is_refused(bench, dataset_copy):
    protocol = protocol_record({**bench["binding"], "dataset_dir": str(dataset_copy)})
    label = next((dataset_copy / "Task01_BrainTumour" / "labelsTr").glob("*.nii.gz"))
    label.write_bytes(label.read_bytes() + b"\0")  # size changes -> fingerprint changes
    with pytest.raises(InputError, match="dataset content changed") as err:
        submission_row(bench["runs"]["good"], protocol, n_boot=N_BOOT)
    assert err.value.source == str(dataset_copy.resolve())


def test_label_edited_in_place_with_same_size_and_mtime_is_refused(bench, dataset_copy):
    """The fingerprint hashes contents; its cache is keyed by ctime too, which os.utime cannot reset."""
    protocol = protocol_record({**bench["binding"], "dataset_dir": str(dataset_copy)})
    label = sorted((dataset_copy / "Task01_BrainTumour" / "labelsTr").glob("*.nii.gz"))[0]
    before = label.stat()
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data.flat[0] = 1 - data.flat[0]
    blob = nib.Nifti1Image(data, img.affine, img.header).to_bytes()
    import gzip
    with gzip.open(label, "wb", compresslevel=1) as f:
        f.write(blob)
    raw = label.read_bytes()
    size = before.st_size
    label.write_bytes(raw[:size] if len(raw) >= size else raw + b"\0" * (size - len(raw)))
    os.utime(label, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert label.stat().st_size == before.st_size and label.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(InputError, match="dataset content changed"):
        submission_row(bench["runs"]["good"], protocol, n_boot=N_BOOT)


@pytest.mark.parametrize("change, message", [({"hash": "0" * 64}, "protocol hash"),
                                             ({"id": "other-protocol"}, "protocol id")])
def test_other_protocol_is_refused(bench, change, message):
    with pytest.raises(InputError, match=message) as err:
        submission_row(bench["runs"]["good"], {**bench["protocol"], **change}, n_boot=N_BOOT)
    assert err.value.source.endswith("run.json")


def test_other_split_or_missing_test_subjects_are_refused(bench, tmp_path):
    moved = bench["split"]["test"][0]
    split = dict(bench["split"], test=bench["split"]["test"][1:], train=bench["split"]["train"] + [moved])
    with pytest.raises(InputError, match="split fingerprint"):
        submission_row(bench["runs"]["good"], protocol_record({**bench["binding"], "split": split}))

    run = tmp_path / "run"
    shutil.copytree(bench["runs"]["good"], run)
    index = json.loads((run / "scores" / "index.json").read_text())
    del index["subjects"][bench["split"]["test"][0]]  # drop a (hard?) test patient
    write_json(run / "scores" / "index.json", index)
    with pytest.raises(InputError, match="test subjects scored") as err:
        submission_row(run, bench["protocol"])
    assert err.value.source.endswith("index.json")


# ----------------------------------------------------------------------------- CSV safety


def test_formula_like_text_is_neutralised_numbers_are_not(bench, tmp_path):
    csv_path = tmp_path / "lb.csv"
    run = make_run(tmp_path / "run", Path(bench["protocol"]["dataset_dir"]), bench["split"], bench["protocol"],
                   good_map, "flair-baseline", hardware="=cmd|' /C calc'!A0", code_version="@SUM(A1)",
                   config_hash="-2+3")
    submit(run, csv_path, bench["binding"], n_boot=N_BOOT)
    append_row(csv_path, fake_row(seed=-1, hardware="\tx", code_version="+1", train_seconds=-0.5))
    first, second = raw_rows(csv_path)
    assert first["hardware"] == "'=cmd|' /C calc'!A0" and first["code_version"] == "'@SUM(A1)"
    assert first["config_hash"] == "'-2+3" and first["method"] == "flair-baseline"
    assert second["hardware"] == "'\tx" and second["code_version"] == "'+1"
    assert second["seed"] == "-1" and second["train_seconds"] == "-0.5"  # numbers stay numbers
    assert read_leaderboard(csv_path)["seed"].tolist() == [0, -1]


@pytest.mark.parametrize("field, value", [("hardware", "gpu\n=1+1"), ("code_version", "v1\r"),
                                          ("run_dir", "/runs/a\x00b"), ("config_hash", "a\u2028b"),
                                          ("row_id", "../../etc"), ("seed", "0"), ("auroc", float("inf"))])
def test_bad_fields_are_refused(tmp_path, field, value):
    with pytest.raises(InputError, match=field):
        append_row(tmp_path / "lb.csv", fake_row(**{field: value}))
    assert not (tmp_path / "lb.csv").exists()


def test_run_folder_with_newline_or_bad_method_is_refused(bench, tmp_path):
    with pytest.raises(InputError, match="line break"):
        submission_row(tmp_path / "run\nx", bench["protocol"])
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "run.json", {"method": "../evil", "protocol": {"id": "x", "hash": "y"}})
    with pytest.raises(InputError, match=r"method: '\.\./evil' does not match") as err:  # with the other 7 problems
        submission_row(run, bench["protocol"])
    assert err.value.source.endswith("run.json") and "8 problem(s)" in err.value.problem


@pytest.mark.parametrize("name", ["simplex-ddim-t250-s0", "flair-baseline", "gaussian-ddpm-t200", "AnoDDPM_v2.1+ema",
                                  "0", "x" * 80])
def test_runner_method_names_are_accepted(name):
    assert check_method_name(name) == name


@pytest.mark.parametrize("name", ["", "=cmd", "-x", "+x", "@x", ".hidden", "a/b", "a\\b", "..", "a b", "a\nb",
                                  "x" * 81, "é", None, 3])
def test_bad_method_names_are_refused(name):
    with pytest.raises(InputError, match="method name"):
        check_method_name(name)


# ----------------------------------------------------------------------------- concurrency


def _submitter(csv_path: str, worker: int, count: int) -> None:
    for k in range(count):
        append_row(csv_path, fake_row(method=f"w{worker}", seed=k, subjects={"s": {"auprc": 0.5}},
                                      hardware=f"=worker {worker}, row {k}"))


def test_concurrent_submitters_lose_no_row(tmp_path):
    csv_path = str(tmp_path / "lb.csv")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_submitter, args=(csv_path, w, 25)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    df = read_leaderboard(csv_path)
    assert len(df) == 200 and df["row_id"].is_unique
    assert sorted(zip(df["method"], df["seed"])) == sorted((f"w{w}", k) for w in range(8) for k in range(25))
    assert len(pd.read_csv(csv_path)) == 200
    assert len(list((tmp_path / "lb.subjects").glob("*.json"))) == 200
    assert not list(tmp_path.glob(".lb.csv.*"))  # no temporary file left behind


def test_csv_without_the_added_columns_still_reads_and_is_upgraded_on_append(tmp_path):
    csv_path = tmp_path / "lb.csv"
    old = fake_row("old", metric=0.6)
    old_columns = [c for c in COLUMNS if c not in ADDED_COLUMNS]
    with open(csv_path, "w", newline="") as f:  # as written before the columns were added
        csv.writer(f).writerows([old_columns, ["" if old[c] is None else str(old[c]) for c in old_columns]])
    stored = read_leaderboard(csv_path)
    assert list(stored.columns) == COLUMNS and stored.loc[0, "auroc"] == 0.6
    assert stored[list(ADDED_COLUMNS)].isna().all(axis=None)

    append_row(csv_path, fake_row("new", subject_auroc=0.75, fp_ml_healthy=1.5, healthy_residual=0.0123,
                                  residual_ratio=2.5, psnr=25.0, ssim=0.8))
    first, second = raw_rows(csv_path)
    assert list(first) == COLUMNS and first["method"] == "old" and first["auroc"] == "0.6" and first["psnr"] == ""
    assert second["psnr"] == "25.0" and second["fp_ml_healthy"] == "1.5"
    table = show(csv_path, metric="auroc")
    assert "| subject AUROC | FP ml healthy | val residual | val tumour/healthy | val PSNR | val SSIM |" in table
    assert "| 0.750 | 1.50 | 0.0123 | 2.50 | 25.00 | 0.800 |" in table


def test_foreign_csv_is_refused(tmp_path):
    csv_path = tmp_path / "lb.csv"
    for header in ("name,score", ",".join(COLUMNS[1:]), ",".join(COLUMNS + ["extra"]), ",".join(COLUMNS[::-1])):
        csv_path.write_text(header + "\nx,1\n")
        with pytest.raises(InputError, match="not a leaderboard"):
            append_row(csv_path, fake_row())
        with pytest.raises(InputError, match="not a leaderboard"):
            read_leaderboard(csv_path)
    with pytest.raises(InputError, match="not found"):
        read_leaderboard(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------- ranking and display


def _subjects(values):
    return {f"s{i}": {"auroc": v, "auprc": v, "dice": v} for i, v in enumerate(values)}


@pytest.fixture
def board(tmp_path):
    rng = np.random.default_rng(0)
    top = rng.uniform(0.6, 0.9, size=10)
    csv_path = tmp_path / "lb.csv"
    rows = {"worse": fake_row("worse", metric=0.45, subjects=_subjects(top - rng.uniform(0.1, 0.3, size=10))),
            "top": fake_row("top", metric=0.75, subjects=_subjects(top)),
            "same": fake_row("same", metric=0.75, subjects=_subjects(top), submitted_at="2025-02-01T00:00:00+00:00"),
            "noisy": fake_row("noisy", metric=0.74, subjects=_subjects(top + rng.normal(0, 0.05, size=10))),
            "other": fake_row("other", metric=0.9, protocol_id="p2", protocol_hash="h2", subjects=_subjects(top))}
    for row in rows.values():
        append_row(csv_path, row)
    return csv_path


def test_ranked_table_orders_and_tests_against_the_top(board):
    table = ranked_table(board, protocol_id="p1", metric="auprc")
    assert table["method"].tolist() == ["top", "same", "noisy", "worse"]  # tie: earlier submission first
    assert table["rank"].tolist() == [1, 2, 3, 4]
    by = table.set_index("method")
    assert by.loc["top", "differs_from_top"] is None
    assert by.loc["same", "differs_from_top"] is False and by.loc["same", "p_vs_top"] == 1.0
    assert by.loc["worse", "differs_from_top"] is True and by.loc["worse", "p_vs_top"] < 0.01
    assert by.loc["worse", "diff_vs_top"] > 0.1 and by.loc["worse", "paired_subjects"] == 10
    assert by.loc["noisy", "differs_from_top"] is False

    everything = ranked_table(board, metric="dice").set_index("method")
    assert everything.index[0] == "other"  # another protocol: ranked, but never tested against p1 entries
    assert everything.loc["other", "top_row_id"] == everything.loc["other", "row_id"]
    assert everything.loc["same", "top_row_id"] == everything.loc["top", "row_id"]
    with pytest.raises(InputError, match="unknown metric"):
        ranked_table(board, metric="accuracy")


def test_real_submissions_rank_and_few_patients_are_not_overclaimed(bench, synth_root, tmp_path):
    csv_path = tmp_path / "lb.csv"
    for name in ("bad", "good"):
        submit(bench["runs"][name], csv_path, bench["binding"], n_boot=N_BOOT)
    with pytest.raises(InputError, match="identical to those of good"):  # same maps, another name
        submit(bench["runs"]["good-copy"], csv_path, bench["binding"], n_boot=N_BOOT)
    good_again = make_run(tmp_path / "good-again", synth_root, bench["split"], bench["protocol"], good_map,
                          "good-again", seed=1)
    submit(good_again, csv_path, bench["binding"], n_boot=N_BOOT)
    table = ranked_table(csv_path, metric="auprc").set_index("method")
    assert table.index.tolist()[-1] == "bad" and len(table) == 3
    assert table["differs_from_top"].tolist()[1:] == [False, False]  # < 6 tumour test patients: p >= 1/16
    assert table.loc["bad", "p_vs_top"] >= 0.05 and table.loc["bad", "diff_vs_top"] > 0


def test_show_gives_markdown_and_html(board, tmp_path):
    html_path = tmp_path / "out" / "board.html"
    text = show(board, protocol_id="p1", metric="auroc", html_path=html_path)
    lines = text.splitlines()
    assert lines[0].startswith("| rank | method | supervision | source | test n | auroc [95% CI] |") and "differs from top (p<0.05)" in lines[0]
    assert set(lines[1]) <= set("|-") and len(lines) == 2 + 4
    assert lines[2].startswith("| 1 | top | unsupervised | pipeline run | 10 | 0.750 [0.650, 0.850] |") and "| top |" in lines[2]
    assert "yes (p=" in lines[-1] and "| worse |" in lines[-1]
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table" in page and "worse" in page
