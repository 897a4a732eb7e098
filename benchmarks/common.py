"""Helpers shared by the benchmark scripts (timing, a scratch synthetic dataset)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def timer(out: dict, key: str):
    """Add the wall time of the block to ``out[key]`` (seconds)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out[key] = out.get(key, 0.0) + time.perf_counter() - start


def machine() -> str:
    import os
    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {gpu}"


def scratch_dataset(root: Path, n_healthy: int, n_tumour: int, spacing: float, seed: int = 0) -> Path:
    from pipeline.common import TASK
    from pipeline.data.synth import generate_dataset

    if not (root / TASK / "dataset.json").is_file():
        generate_dataset(root, n_healthy=n_healthy, n_tumour=n_tumour, seed=seed, spacing=spacing, progress=False)
    return root


def run_worker(script: str, args: list[str], what: str = "worker") -> dict:
    """Run ``script`` again in a fresh process (so its peak memory is its own) and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=Path(script).resolve().parent.parent)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
