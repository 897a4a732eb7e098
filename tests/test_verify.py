"""``leaderboard verify`` on a trained entry (issue 27): a benchmark row re-run from its recorded settings and
weights is marked reproduced; weights changed since the run are refused in one line, the row left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from pipeline.cli import main
from pipeline.protocols import run_benchmark

REPO = Path(__file__).resolve().parent.parent
TINY = {"bundle.image_size": 32, "bundle.pixdim": [4.0, 4.0, 4.0], "bundle.unet_channels": [32, 32, 32],
        "bundle.attention_levels": [False, False, False], "bundle.train_steps": 2, "bundle.batch_size": 16,
        "bundle.num_workers": 1, "bundle.lr_warmup_steps": 1, "evaluation.bootstrap_resamples": 50}


def test_a_trained_row_is_reproduced_and_altered_weights_are_refused(synth_root, tmp_path, capsys):
    board = tmp_path / "leaderboard.csv"
    runs = run_benchmark(REPO / "configs" / "benchmark" / "msd-task01.yaml", tmp_path / "results", board,
                         progress=False, overrides={"dataset.dir": str(synth_root), **TINY})
    diffusion = next(r for r in runs if r.name == "x0-4ch-s0")
    record = json.loads((diffusion / "run.json").read_text())
    assert len(record["model"]["sha256"]) == 64
    row_id = pd.read_csv(board).set_index("method").loc["x0-4ch-s0", "row_id"]
    capsys.readouterr()
    assert main(["leaderboard", "verify", row_id, "--leaderboard", str(board), "--quiet"]) == 0
    assert f"row {row_id}: reproduced" in capsys.readouterr().out
    assert pd.read_csv(board, keep_default_na=False).set_index("row_id").loc[row_id, "reproduced"] == "reproduced"

    weights = Path(json.loads((diffusion / "config.json").read_text())["ckpt_dir"]) / "model.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    first = next(k for k, v in state.items() if torch.is_floating_point(v))
    state[first] = state[first] + 0.01
    torch.save(state, weights)
    before = board.read_bytes()
    capsys.readouterr()
    assert main(["leaderboard", "verify", row_id, "--leaderboard", str(board), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "weights changed since the run" in lines[0] and "model.pt" in lines[0]
    assert board.read_bytes() == before
