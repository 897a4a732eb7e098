"""One command-line grammar (issue 12): both spellings of every flag, unknown flags refused with the
closest known one, ``--quiet`` prints only the final summary, and scoring builds no training cache
unless calibration needs it."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

from pipeline.cli import build_parser, canonical_arguments, main

TINY = ["--image-size", "32", "--pixdim", "[4.0,4.0,4.0]"]
"""4 mm synthetic data on a 32-pixel grid."""
NETWORK = ["--modalities", "[FLAIR]", "--unet-channels", "[32,32,32]", "--attention-levels", "[false,false,false]",
           "--norm-num-groups", "32"]


def only_summary(result, starts: str) -> None:
    """Exit 0, one stdout line starting with ``starts``, nothing on stderr."""
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [result.stdout.strip()] and result.stdout.startswith(starts), result.stdout
    assert result.stderr == "", result.stderr


def test_quiet_synth_prepare_score_evaluate_print_only_the_summary(synth_root, tmp_path):
    """Through the real command line: spellings mixed on purpose (underscores for prepare, dashes
    for score, both for evaluate)."""
    only_summary(run_cli("synth", "--out", str(tmp_path / "data"), "--healthy", "1", "--tumour", "2",
                         "--spacing", "4", "--quiet"), "wrote ")
    only_summary(run_cli("prepare", "--dataset_dir", str(synth_root), "--split_file", str(tmp_path / "prep.json"),
                         "--cache_dir", str(tmp_path / "prep_cache"), "--image_size", "32", "--spacing", "4",
                         "--modalities", "FLAIR", "--quiet"), "split ")
    out = tmp_path / "out"
    only_summary(run_cli("score", "--dataset-dir", str(synth_root), "--output-dir", str(out), *TINY,
                         "--sampler", "flair", "--quiet"), f"scored 4 subjects into {out / 'scores'}")
    assert (out / "split.json").is_file() and not (out / "cache").exists(), "scoring built the training cache"
    only_summary(run_cli("evaluate", "--dataset_dir", str(synth_root), "--output-dir", str(out),
                         "--bootstrap-resamples", "20", "--quiet"), "evaluated test: AUROC ")


@pytest.mark.parametrize("argv,flag,suggestion", [
    (["score", "--dataset-dri", "X"], "--dataset-dri", "--dataset-dir"),
    (["evaluate", "--bootstrap_resample", "5"], "--bootstrap_resample", "--bootstrap-resamples"),
    (["train", "--trian-steps", "5"], "--trian-steps", "--train-steps"),
    (["prepare", "--dataset-dir", "d", "--split-fiel", "s.json", "--cache-dir", "c"], "--split-fiel", "--split-file"),
    (["prepare", "--dataset", "d"], "--dataset", "--dataset-dir"),  # no abbreviations
    (["synth", "--out", "d", "--quite"], "--quite", "--quiet"),
    (["leaderboard", "show", "--metrik", "dice"], "--metrik", "--metric"),
    (["benchmark", "p.yaml", "--set=x=1", "--result", "r"], "--result", "--results"),
])
def test_misspelt_flag_exits_2_naming_it_with_a_suggestion(capsys, argv, flag, suggestion):
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: command line: {flag}: unknown "), err
    assert err[0].endswith(f"did you mean {suggestion}?"), err


def test_both_spellings_are_the_same_flag():
    parser = build_parser()
    assert canonical_arguments(parser, ["prepare", "--dataset_dir", "d", "--split-file=s", "--cache_dir", "c"]) == \
        ["prepare", "--dataset-dir", "d", "--split-file=s", "--cache-dir", "c"]
    assert canonical_arguments(parser, ["score", "--trust_expressions", "--dataset-dir", "d", "--t-start=5",
                                        "--median_3d", "3", "--network-def#channels", "[8,8,8]"]) == \
        ["score", "--trust-expressions", "--dataset_dir", "d", "--t_start", "5", "--median_3d", "3",
         "--network_def#channels", "[8,8,8]"]
    args, extra = parser.parse_known_args(canonical_arguments(parser, ["leaderboard", "show", "--protocol_id", "x"]))
    assert args.protocol_id == "x" and not extra


def test_score_on_a_missing_dataset_stops(capsys, tmp_path):
    assert main(["score", "--dataset-dir", "/nonexistent", "--output-dir", str(tmp_path), "--quiet"]) == 2
    assert "/nonexistent" in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()


def test_quiet_train_then_scoring_without_calibration_builds_no_cache(synth_root, tmp_path, capsys):
    """A tiny model trained through ``train --quiet`` (no per-iteration losses, no config summary);
    scoring it with ``--residual-norm none`` reads the split only, calibrated scoring builds the cache."""
    models = tmp_path / "models"
    data = ["--dataset-dir", str(synth_root), *TINY, *NETWORK]
    only_summary(run_cli("train", *data, "--output-dir", str(tmp_path / "train"), "--ckpt-dir", str(models),
                         "--train-steps", "2", "--batch-size", "8", "--num-workers", "1", "--quiet"),
                 f"trained model {models / 'model.pt'}")
    scoring = [*data, "--model-path", str(models / "model.pt"), "--t-start", "10", "--quiet"]
    for norm, cached in (("none", False), ("position", True)):
        out = tmp_path / norm
        assert main(["score", *scoring, "--output-dir", str(out), "--residual-norm", norm]) == 0
        assert capsys.readouterr().out.splitlines() == [f"scored 4 subjects into {out / 'scores'}"]
        assert (out / "cache").exists() == cached and (out / "scores" / "calibration.npz").exists() == cached
        split = json.loads((out / "split.json").read_text())
        assert split == json.loads((tmp_path / "train" / "split.json").read_text())


def test_one_list_grammar_for_bundle_settings(synth_root, tmp_path, capsys):
    """``FLAIR,T2w`` and ``[FLAIR,T2w]`` are the same list; ``--pixdim 4`` is 4 mm in every axis. A 2-channel
    model trained so has a 2-channel network (the string's length once gave 9) and a card saying so."""
    from pipeline.cli.args import parse_overrides
    from pipeline.data.dataset import PreprocessConfig
    from pipeline.model.checkpoint import load_checkpoint

    assert parse_overrides(["--modalities", "FLAIR,T2w"]) == parse_overrides(["--modalities", "[FLAIR,T2w]"])
    assert parse_overrides(["--attention_levels", "false,true"]) == {"attention_levels": [False, True]}
    assert parse_overrides(["--dataset_dir", "a,b"]) == {"dataset_dir": "a,b"}, "not a list setting: left alone"
    assert PreprocessConfig(pixdim=4).pixdim == (4.0, 4.0, 4.0) == PreprocessConfig(pixdim=[4, 4, 4]).pixdim
    models = tmp_path / "models"
    argv = ["train", "--dataset-dir", str(synth_root), "--image-size", "16", "--pixdim", "4", "--modalities", "flair,T2w",
            "--unet-channels", "8,8,8", "--norm-num-groups", "8", "--num-head-channels", "8",
            "--output-dir", str(tmp_path / "train"), "--ckpt-dir", str(models), "--train-steps", "1", "--batch-size", "4",
            "--num-workers", "1", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    weights = load_checkpoint(models / "model.pt")
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 4)
    assert first.shape[1] == 2
    card = json.loads((models / "model.card.json").read_text())
    assert card["settings"]["pixdim"] in (4, [4.0, 4.0, 4.0]) and card["settings"]["unet_channels"] == [8, 8, 8]
