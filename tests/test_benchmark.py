"""Benchmark runner on a tiny protocol: run folders, skipping, leaderboard, exact reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.protocols import (config_hash, entry_score_settings, entry_train_settings, expand_methods, load_protocol,
                                run_benchmark, validation_only)
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def tiny_protocol(path: Path, dataset_dir: Path) -> Path:
    protocol = {
        "id": "tiny-v1",
        "dataset": {"dir": str(dataset_dir)},
        "split": {"seed": 1},
        "bundle": {"image_size": 32, "pixdim": [4.0, 4.0, 4.0], "unet_channels": [32, 32, 32], "epochs": 1, "train_steps": 0,
                   "batch_size": 16, "num_workers": 1, "score_batch_size": 128},
        "evaluation": {"bootstrap_resamples": 100},
        "methods": [
            {"name": "simplex", "noise": "simplex", "sampler": "ddim", "t_start": 20, "ddim_steps": 2},
            {"name": "flair-baseline", "sampler": "flair"},
        ],
    }
    path.write_text(yaml.safe_dump(protocol))
    return path


@pytest.fixture(scope="module")
def first_run(synth_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    protocol = tiny_protocol(work / "tiny.yaml", synth_root)
    runs = run_benchmark(protocol, work / "results", work / "leaderboard.csv", progress=False)
    return work, protocol, runs


def test_matrix_expands_with_readable_ids(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"id": "m", "dataset": {"dir": "d"}, "methods": [
        {"name": "simplex", "noise": "simplex", "t_start": [100, 250], "seed": [0, 1]},
        {"name": "flair-baseline", "sampler": "flair"}]}))
    ids = [e["id"] for e in expand_methods(load_protocol(path))]
    assert ids == ["simplex-t100-s0", "simplex-t100-s1", "simplex-t250-s0", "simplex-t250-s1", "flair-baseline-s0"]


def test_run_folders_hold_everything(first_run):
    work, _, runs = first_run
    assert len(runs) == 2
    for run in runs:
        for name in ("run.json", "config.json", "environment.json", "scores/index.json", "evaluation/metrics.json",
                     "evaluation/report.png"):
            assert (run / name).is_file(), name
        record = json.loads((run / "run.json").read_text())
        assert record["protocol"]["id"] == "tiny-v1" and record["dataset"]["fingerprint"]
        assert set(record["timings"]) == {"train_seconds", "inference_seconds"}
    baseline = json.loads((runs[1] / "scores" / "index.json").read_text())["settings"]
    assert baseline["sampler"] == "flair" and baseline["model_path"] is None
    board = pd.read_csv(work / "leaderboard.csv")
    assert sorted(board["method"]) == sorted(r.name for r in runs)


def test_rerun_skips_finished_entries(first_run):
    work, protocol, runs = first_run
    stamps = {r: (r / "run.json").stat().st_mtime_ns for r in runs}
    run_benchmark(protocol, work / "results", work / "leaderboard.csv", progress=False)
    assert all((r / "run.json").stat().st_mtime_ns == stamps[r] for r in runs)
    assert len(pd.read_csv(work / "leaderboard.csv")) == 2


def test_same_seed_reproduces_metrics_exactly(first_run, tmp_path):
    work, protocol, runs = first_run
    again = run_benchmark(protocol, tmp_path / "results", tmp_path / "leaderboard.csv", progress=False)
    for a, b in zip(runs, again):
        first = json.loads((a / "evaluation" / "metrics.json").read_text())["test"]
        second = json.loads((b / "evaluation" / "metrics.json").read_text())["test"]
        assert first == second


def test_cli_shows_the_leaderboard_and_refuses_a_tampered_dataset(first_run, dataset_copy, tmp_path):
    work, protocol, runs = first_run
    html = tmp_path / "board.html"
    result = subprocess.run([sys.executable, "-m", "pipeline", "leaderboard", "show", "--leaderboard",
                             str(work / "leaderboard.csv"), "--html", str(html)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "flair-baseline" in result.stdout and "|" in result.stdout and html.is_file()
    # a protocol that points at changed data is refused at submission
    changed = yaml.safe_load(Path(protocol).read_text())
    label = next((dataset_copy / "Task01_BrainTumour" / "labelsTr").glob("*.nii.gz"))
    label.write_bytes(label.read_bytes() + b"\0")
    changed["dataset"]["dir"] = str(dataset_copy)
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    result = subprocess.run([sys.executable, "-m", "pipeline", "leaderboard", "submit", str(runs[0]), "--protocol",
                             str(other), "--leaderboard", str(tmp_path / "lb.csv")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_bad_protocol_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: x\nmethods: []\ndataset: {dir: d}\n")
    with pytest.raises(InputError, match="non-empty"):
        load_protocol(path)
    path.write_text("id: x\nmethods: [{name: a}]\ndataset: {dir: d}\nsurprise: 1\n")
    with pytest.raises(InputError, match="unknown keys"):
        load_protocol(path)


def test_ensembles_overrides_and_study_protocols(tmp_path):
    """A nested t_start list is one t_L-ensemble entry; --set overrides change the hash; a
    validation-only protocol is recognised (its runs never reach the leaderboard)."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"id": "s", "dataset": {"dir": "d"}, "evaluation": {"sections": ["validation"]},
                                    "bundle": {"train_steps": 10, "t_start": 300},
                                    "methods": [{"name": "x0", "t_start": [[100, 300]], "median_3d": [1, 5]},
                                                {"name": "eps", "prediction_type": "epsilon"}]}))
    protocol = load_protocol(path)
    entries = expand_methods(protocol)
    assert [e["id"] for e in entries] == ["x0-t100+300-m3d1-s0", "x0-t100+300-m3d5-s0", "eps-s0"]
    assert validation_only(protocol)
    # scoring-only settings do not enter the model hash; training settings do
    hashes = [config_hash(entry_train_settings(protocol, e)) for e in entries]
    assert hashes[0] == hashes[1] != hashes[2]
    assert entry_score_settings(protocol, entries[0])["t_start"] == [100, 300]
    assert entry_score_settings(protocol, entries[2])["t_start"] == 300  # the protocol's bundle default
    changed = load_protocol(path, {"dataset.dir": "elsewhere", "bundle.train_steps": 20})
    assert changed["dataset"]["dir"] == "elsewhere" and changed["bundle"]["train_steps"] == 20
    assert changed["hash"] != protocol["hash"]
    with pytest.raises(InputError, match="not a section"):
        load_protocol(path, {"methods.x": 1})


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "benchmark").glob("*.yaml")))
def test_shipped_protocols_parse(name):
    protocol = load_protocol(REPO / "configs" / "benchmark" / name)
    assert expand_methods(protocol)


def test_real_data_protocol_runs_on_tiny_data_through_overrides(synth_root, tmp_path):
    """configs/benchmark/msd-task01.yaml, shrunk by --set overrides to seconds on the test data,
    goes through train, calibrated scoring, evaluation and the leaderboard."""
    overrides = {"dataset.dir": str(synth_root), "bundle.image_size": 32, "bundle.pixdim": [4.0, 4.0, 4.0],
                 "bundle.unet_channels": [32, 32, 32], "bundle.attention_levels": [False, False, False],
                 "bundle.train_steps": 2, "bundle.batch_size": 16, "bundle.num_workers": 1,
                 "bundle.lr_warmup_steps": 1, "evaluation.bootstrap_resamples": 50}
    path = REPO / "configs" / "benchmark" / "msd-task01.yaml"
    runs = run_benchmark(path, tmp_path / "results", tmp_path / "leaderboard.csv", progress=False, overrides=overrides)
    assert [r.name for r in runs] == ["flair-baseline-s0", "flair-baseline-m3d-s0", "x0-4ch-s0"]
    index = json.loads((runs[2] / "scores" / "index.json").read_text())["settings"]
    assert index["sampler"] == "x0" and index["residual_norm"] == "position" and index["preprocess"]["image_size"] == 32
    assert len(index["preprocess"]["modalities"]) == 4
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert len(board) == 3 and set(board["protocol_id"]) == {"msd-task01-v1"}


def test_methods_protocol_runs_guided_and_coarse_entries_on_tiny_data(synth_root, tmp_path):
    """configs/benchmark/methods.yaml, shrunk to seconds: the coarse-noise entry trains with coarse noise,
    the guided entry trains and scores through its own workflows into its own model folder, and the
    leaderboard marks it as weakly supervised."""
    overrides = {"dataset.dir": str(synth_root), "bundle.image_size": 32, "bundle.pixdim": [4.0, 4.0, 4.0],
                 "split.seed": 1, "bundle.unet_channels": [32, 32, 32], "bundle.norm_num_groups": 16, "bundle.train_steps": 2,
                 "bundle.batch_size": 16, "bundle.num_workers": 1, "bundle.lr_warmup_steps": 1,
                 "evaluation.bootstrap_resamples": 50}
    path = REPO / "configs" / "benchmark" / "methods.yaml"
    runs = run_benchmark(path, tmp_path / "results", tmp_path / "leaderboard.csv", progress=False, overrides=overrides)
    by_name = {r.name.rsplit("-s", 1)[0]: r for r in runs}
    assert set(by_name) == {"flair-baseline", "flair-baseline-m3d", "diffusion-x0-4ch", "coarse-x0-4ch", "guided-4ch"}
    models = {name: Path(json.loads((run / "config.json").read_text())["ckpt_dir"]) for name, run in by_name.items()}
    trained = {name: json.loads((models[name] / "train.json").read_text())
               for name in ("diffusion-x0-4ch", "coarse-x0-4ch", "guided-4ch")}
    assert trained["guided-4ch"]["workflow"] == "train_guided" and trained["diffusion-x0-4ch"]["workflow"] == "train"
    assert trained["coarse-x0-4ch"]["settings"]["noise"] == "coarse"
    assert len({models[name] for name in trained}) == 3  # three distinct models
    guided = json.loads((by_name["guided-4ch"] / "scores" / "index.json").read_text())["settings"]
    assert guided["sampler"] == "guided" and guided["prediction_type"] == "epsilon"
    coarse = json.loads((by_name["coarse-x0-4ch"] / "scores" / "index.json").read_text())["settings"]
    assert "coarse" in coarse["noise"]
    board = pd.read_csv(tmp_path / "leaderboard.csv").set_index("method")
    assert board.loc[by_name["guided-4ch"].name, "supervision"] == "weak slice labels"
    assert (board.drop(index=by_name["guided-4ch"].name)["supervision"] == "unsupervised").all()
