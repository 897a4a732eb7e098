"""Run the bundle's configs from Python: the one path the CLI, tests and benchmark share."""

from __future__ import annotations

import warnings
from pathlib import Path

BUNDLE_NAME = "brats_diffusion_anomaly"
BUNDLE_DIR = Path(__file__).resolve().parent.parent / "bundles" / BUNDLE_NAME
CONFIGS = {
    "train": ["common.yaml", "train.yaml"],
    "multi_gpu_train": ["common.yaml", "train.yaml", "multi_gpu_train.yaml"],
    "inference": ["common.yaml", "inference.yaml"],
    "multi_gpu_inference": ["common.yaml", "inference.yaml", "multi_gpu_inference.yaml"],
    "evaluate": ["common.yaml", "evaluate.yaml"],
}


def config_files(workflow: str, bundle_dir: str | Path = BUNDLE_DIR) -> list[str]:
    """Config files (common first) that make up one workflow of the bundle."""
    if workflow not in CONFIGS:
        raise KeyError(f"unknown workflow {workflow!r}; choose one of {', '.join(CONFIGS)}")
    return [str(Path(bundle_dir) / "configs" / name) for name in CONFIGS[workflow]]


def make_workflow(workflow: str, bundle_dir: str | Path = BUNDLE_DIR, tracking: str | None = None, **overrides):
    """An initialised ``ConfigWorkflow``, exactly what ``python -m monai.bundle run`` builds."""
    from monai.bundle import create_workflow

    bundle_dir = Path(bundle_dir)
    overrides.setdefault("bundle_root", str(bundle_dir))
    with warnings.catch_warnings():  # MONAI warns that configs run code: these are the project's own
        warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)
        return create_workflow(config_file=config_files(workflow, bundle_dir),
                               meta_file=str(bundle_dir / "configs" / "metadata.json"),
                               logging_file=str(bundle_dir / "configs" / "logging.conf"),
                               tracking=tracking, **overrides)


def run_bundle(workflow: str, bundle_dir: str | Path = BUNDLE_DIR, tracking: str | None = None, **overrides):
    """Run one workflow to the end; returns the finished workflow for inspection."""
    flow = make_workflow(workflow, bundle_dir, tracking=tracking, **overrides)
    flow.run()
    flow.finalize()
    return flow
