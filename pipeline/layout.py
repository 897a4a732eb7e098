"""Names of the dataset layout shared by the generator and the data stage (no heavy imports, so
``pipeline synth`` and its worker processes need not load torch)."""

from __future__ import annotations

import os
from pathlib import Path

HIDDEN_TEST_KEY = "hiddenTestLabels"
"""dataset.json flag: the ``test`` images are the test split and their labels are kept elsewhere
(a leaderboard's hidden ground truth). Without it the ``test`` list is ignored, as for real MSD
Task01, whose 266 listed test images have no public labels."""

GROUND_TRUTH_LABELS = "labelsTs"
"""Folder of a ground-truth directory that holds the hidden test labels, ``<subject>.nii.gz``."""


def ground_truth_label(ground_truth_dir: str | os.PathLike, subject: str) -> Path:
    """Where the hidden label of ``subject`` lives in the organiser's ground-truth folder."""
    return Path(ground_truth_dir) / GROUND_TRUTH_LABELS / f"{subject}.nii.gz"
