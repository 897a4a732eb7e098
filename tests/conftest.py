"""Shared fixtures: one small synthetic dataset per test session (4 mm, a few subjects)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.data.synth import generate_dataset

# File-hash cache of the tests (pipeline.fingerprint): never the user's own ~/.cache.
os.environ.setdefault("PIPELINE_CACHE_DIR", tempfile.mkdtemp(prefix="pipeline-test-cache-"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Read-only synthetic dataset root (holds Task01_BrainTumour). Copy it before changing it."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, n_healthy=3, n_tumour=5, seed=7, spacing=4.0, workers=2, progress=False)
    return root


@pytest.fixture
def dataset_copy(synth_root, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may corrupt."""
    dst = tmp_path / "data"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose tests compare floating-point results exactly (thread count changes
    the order of reductions)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

