"""Names of the dataset layout shared by the generator and the data stage (no heavy imports, so
``pipeline synth`` and its worker processes need not load torch), and where the project's shipped files are."""

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


SHARE = ("share", "brain-diffusion-anomaly")
"""Where a wheel installs the bundle and the protocol files, under the environment's data prefix."""


def project_file(relative: str | os.PathLike) -> Path:
    """A file the project ships (the bundle, protocol files): from the checkout around the package (a clone or an
    editable install), else from ``<prefix>/share/brain-diffusion-anomaly/`` where a wheel installs them
    (``[tool.setuptools.data-files]`` in pyproject.toml). A path found in neither is returned as the checkout's,
    so the error names where it was looked for."""
    import sysconfig

    checkout = Path(__file__).resolve().parent.parent / relative
    if checkout.exists():
        return checkout
    for scheme in (sysconfig.get_default_scheme(), f"{os.name}_user"):
        try:
            candidate = Path(sysconfig.get_path("data", scheme)).joinpath(*SHARE, relative)
        except KeyError:
            continue
        if candidate.exists():
            return candidate
    return checkout
