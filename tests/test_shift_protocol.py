"""The shipped shift protocol, shrunk to seconds: data with two domains, trained on one, validated and tested
on the other, through train, calibrated scoring, evaluation and the leaderboard."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.protocols import load_protocol, run_benchmark

REPO = Path(__file__).resolve().parent.parent
SHRINK = {"dataset.synthetic.healthy": 4, "dataset.synthetic.tumour": 6, "dataset.synthetic.spacing": 4.0,
          "bundle.image_size": 32, "bundle.pixdim": [4.0, 4.0, 4.0], "bundle.unet_channels": [32, 32, 32],
          "bundle.train_steps": 2, "bundle.batch_size": 16, "bundle.num_workers": 1, "bundle.lr_warmup_steps": 1,
          "evaluation.bootstrap_resamples": 50}


def test_shift_protocol_trains_on_the_source_domain_and_tests_on_the_target(tmp_path):
    overrides = {**SHRINK, "dataset.dir": str(tmp_path / "data")}
    path = REPO / "configs" / "benchmark" / "shift.yaml"
    protocol = load_protocol(path, overrides)
    runs = run_benchmark(path, tmp_path / "results", tmp_path / "leaderboard.csv", progress=False, overrides=overrides)
    meta = json.loads((tmp_path / "data" / "Task01_BrainTumour" / "dataset.json").read_text())
    domain = {e["image"].split("/")[-1].split(".")[0]: e["domain"] for e in meta["training"]}
    split = json.loads((tmp_path / "results" / protocol["id"] / "split.json").read_text())
    assert split["train_domains"] == ["source"] and {domain[s] for s in split["train"]} == {"source"}
    assert {domain[s] for s in split["validation"] + split["test"]} == {"target"}
    assert split["train"] == sorted(s for s, d in domain.items() if d == "source")
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert len(board) == len(runs) and set(board["protocol_id"]) == {protocol["id"]}
