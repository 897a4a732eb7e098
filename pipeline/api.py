"""The Python API: what a notebook user does, each call the same bundle workflow the command line runs.

    import pipeline
    model = pipeline.train("data/synthetic", "runs/model", train_steps=1500)
    scores = pipeline.score("data/synthetic", "runs/scores", model_path=model, median_3d=3)
    metrics = pipeline.evaluate("data/synthetic", scores, "runs/evaluation")
    print(metrics["test"]["auprc"])

Keyword settings are the bundle's config ids (``noise="coarse"``, ``modalities=["FLAIR", "T2w"]``,
``residual_sign="positive"``); scoring takes unset model settings from the model card. Bad input raises
:class:`pipeline.errors.InputError` with the one line the command line would print.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.common import read_json

PathLike = str | os.PathLike


def _folders(output_dir: PathLike | None, default: PathLike) -> dict:
    """Logs, split file and slice cache go to ``output_dir`` (default: beside the outputs, never into the bundle)."""
    return {"output_dir": str(Path(output_dir if output_dir is not None else default))}


def train(dataset_dir: PathLike, ckpt_dir: PathLike, output_dir: PathLike | None = None, **settings) -> Path:
    """Train the diffusion model on the healthy slices of ``dataset_dir`` (MSD Task01 layout); checkpoints,
    ``model.pt`` (EMA weights) and its model card go to ``ckpt_dir``. Returns the path of ``model.pt``."""
    from pipeline.bundle import run_bundle

    flow = run_bundle("train", dataset_dir=str(dataset_dir), ckpt_dir=str(ckpt_dir),
                      **{**_folders(output_dir, ckpt_dir), **settings})
    return Path(flow.parser.get_parsed_content("model_path"))


def score(dataset_dir: PathLike, scores_dir: PathLike, model_path: PathLike | None = None,
          output_dir: PathLike | None = None, **settings) -> Path:
    """Anomaly maps of the validation and test subjects into ``scores_dir`` (NIfTI on each input's grid, plus
    ``index.json``); ``model_path`` None with ``sampler="flair"`` is the FLAIR baseline. Returns ``scores_dir``."""
    from pipeline.bundle import run_bundle

    extra = {} if model_path is None else {"model_path": str(model_path)}
    run_bundle("inference", dataset_dir=str(dataset_dir), scores_dir=str(scores_dir),
               **{**_folders(output_dir, Path(scores_dir).parent), **extra, **settings})
    return Path(scores_dir)


def evaluate(dataset_dir: PathLike, scores_dir: PathLike, evaluation_dir: PathLike, **settings) -> dict:
    """Recompute every metric from the saved maps and the labels (threshold chosen on validation subjects);
    writes ``metrics.json``, the per-subject CSV and ``report.png`` to ``evaluation_dir``; returns the metrics."""
    from pipeline.bundle import run_bundle

    run_bundle("evaluate", dataset_dir=str(dataset_dir), scores_dir=str(scores_dir),
               evaluation_dir=str(evaluation_dir), **{**_folders(None, Path(evaluation_dir).parent), **settings})
    return read_json(Path(evaluation_dir) / "metrics.json", "metrics")


def benchmark(protocol: PathLike, results: PathLike = "results", leaderboard: PathLike | None = None,
              **overrides) -> list[Path]:
    """Run a benchmark protocol file (train, score, evaluate every entry; entries already done are skipped) and
    submit its runs to ``leaderboard`` (default ``<results>/leaderboard.csv``). ``overrides``: dotted protocol
    keys, as ``--set`` takes them (``{"bundle.train_steps": 100}``). Returns the run folders."""
    from pipeline.protocols import run_benchmark

    board = Path(results) / "leaderboard.csv" if leaderboard is None else leaderboard
    return run_benchmark(protocol, results, board, progress=False, overrides=overrides or None)
