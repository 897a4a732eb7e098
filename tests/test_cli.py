"""The command line as the README uses it: every README command names a real subcommand, and the
main commands run end to end on tiny data through the CLI itself."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser, canonical_arguments

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO)


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [ln.strip() for block in blocks for ln in block.replace("\\\n", " ").splitlines()]
    commands = []
    for line in lines:
        for part in line.split("&&"):
            part = part.split("#")[0].strip()
            if part.startswith("pipeline "):
                commands.append(part)
    return commands


def test_readme_starts_with_the_two_setup_commands():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert first[0].startswith('pip install torch==2.13.0 -e ".[test]" && pipeline benchmark')
    assert first[1] == 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q'
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text()


def test_every_readme_pipeline_command_parses():
    """... with known flags only (a misspelt option or bundle setting in the README would fail here)."""
    parser = build_parser()
    commands = readme_commands()
    assert len(commands) >= 8
    for command in commands:
        args, extra = parser.parse_known_args(canonical_arguments(parser, shlex.split(command)[1:]))
        assert args.func is not None, command
        assert not extra or getattr(args, "bundle", False), command


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("synth", "prepare", "train", "score", "evaluate", "benchmark", "leaderboard"):
        assert name in result.stdout


def test_score_help_names_every_sampler_the_registry_has():
    """The CLI keeps torch out of its import (fast --help), so its sampler list is written out; it
    must name what ``pipeline.scoring.score`` accepts (guided and classifier-guided have their own flags)."""
    from pipeline.common import CLASSIFIER_GUIDED, GUIDED
    from pipeline.scoring.settings import SAMPLER_NAMES

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    listed = re.search(r"--sampler ([\w|]+)", subparsers.choices["score"].epilog).group(1).split("|")
    assert sorted(listed) == sorted(set(SAMPLER_NAMES) - {GUIDED, CLASSIFIER_GUIDED})


def test_wrong_arguments_give_usage_errors():
    result = run_cli("synth")
    assert result.returncode == 2 and "--out" in result.stderr
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run_cli("train", "--noise")
    assert result.returncode == 2 and "--key value" in result.stderr


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    # the dataset: a random split of 3 healthy + 4 tumour subjects leaves a section with one kind only
    result = run_cli("synth", "--out", str(root / "data"), "--healthy", "3", "--tumour", "4", "--seed", "3",
                     "--spacing", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (root / "data" / "Task01_BrainTumour" / "dataset.json").is_file()
    return root


def test_score_and_evaluate_commands(tiny_data):
    settings = ["--dataset_dir", str(tiny_data / "data"), "--output_dir", str(tiny_data / "out"), "--image_size", "32",
                "--pixdim", "[4.0,4.0,4.0]", "--sampler", "flair", "--progress", "false", "--bootstrap_resamples", "50"]
    result = run_cli("score", *settings)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("evaluate", *settings)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tiny_data / "out" / "evaluation" / "metrics.json").read_text())
    assert metrics["method"] == "FLAIR-intensity baseline"
    split = json.loads((tiny_data / "out" / "split.json").read_text())  # stratified: both kinds in every section
    assert split["method"] == "stratified" and all(len(split[s]) == 2 for s in ("validation", "test"))


def test_benchmark_command_prints_the_leaderboard(tiny_data):
    protocol = tiny_data / "protocol.yaml"
    protocol.write_text(yaml.safe_dump({
        "id": "cli-tiny", "dataset": {"dir": str(tiny_data / "data")},
        "bundle": {"image_size": 32, "pixdim": [4.0, 4.0, 4.0]},
        "evaluation": {"bootstrap_resamples": 50},
        "methods": [{"name": "flair-baseline", "sampler": "flair"}]}))
    result = run_cli("benchmark", str(protocol), "--results", str(tiny_data / "results"), "--leaderboard",
                     str(tiny_data / "lb.csv"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| 1 | flair-baseline-s0 |" in result.stdout
    assert result.stderr == "" and " INFO " not in result.stdout and "input summary" not in result.stdout  # quiet
    table = run_cli("leaderboard", "show", "--leaderboard", str(tiny_data / "lb.csv"))
    quiet = run_cli("leaderboard", "show", "--leaderboard", str(tiny_data / "lb.csv"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == table.stdout
    rows = [line for line in quiet.stdout.splitlines() if line.startswith("|")]
    assert quiet.stdout.startswith("| rank |") and len(rows) == 3  # header, rule, one run
    assert "`*` self-reported" in quiet.stdout  # the run's own reconstruction figures, marked


@pytest.mark.parametrize("command, settings", [("train", ("--noise", "--train-steps", "--modalities", "--resume")),
                                               ("score", ("--sampler", "--t-start", "--residual-sign", "--median-3d")),
                                               ("evaluate", ("--scores-dir", "--bootstrap-resamples"))])
def test_help_lists_the_bundle_settings_with_defaults(command, settings):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    lines = {ln.split()[0]: ln for ln in result.stdout.splitlines() if ln.startswith("  --")}
    for name in settings:
        assert name in lines and len(lines[name].split()) >= 2, (name, result.stdout[-3000:])
    assert "positive: only x > recon" in lines.get("--residual-sign", "positive: only x > recon")
