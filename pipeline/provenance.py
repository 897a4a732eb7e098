"""What a run records about itself: code version, hardware, package versions, and the hash of the settings that
made its maps. Shared by the benchmark runner (which writes ``run.json``) and ``leaderboard verify`` (which checks
a row's recorded settings against its config hash before re-running them)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from pipeline import __version__

PACKAGES = ("torch", "monai", "numpy", "nibabel", "scikit-learn", "pandas", "opensimplex", "numba",
            "pytorch-ignite", "brain-diffusion-anomaly")


def code_version() -> str:
    """Git commit of the checkout (``+dirty`` if changed), else the package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return f"brain-diffusion-anomaly {__version__}"


def hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} CPUs, {gpu}"


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "code_version": code_version(), "hardware": hardware()}


def config_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


RUN_PLACES = ("dataset_dir", "split_file", "cache_dir", "split_seed", "progress")
"""Bundle settings that say where a run reads and writes, not how its maps are made: outside its config hash."""


def hashed_settings(settings: dict) -> dict:
    """The settings a run's ``config_hash`` covers (what makes the maps; no places, no progress bars)."""
    return {k: v for k, v in settings.items() if k not in RUN_PLACES and not k.endswith("_dir")}


MODEL_FILE = "model.pt"
"""The trained weights in a model folder (the bundle's ``model_path``: ``$@ckpt_dir + '/model.pt'``)."""


def weights_record(model_dir) -> dict:
    """``{"model": {"file", "sha256"}}`` of the weights a run scored with (none for a model-free entry), so that
    ``leaderboard verify`` can refuse to re-run a row with weights changed since."""
    from pipeline.fingerprint import sha256_file

    path = Path(model_dir) / MODEL_FILE
    return {"model": {"file": MODEL_FILE, "sha256": sha256_file(path)}} if path.is_file() else {}
