"""Helpers and names several stages share, kept in one place so they cannot drift apart."""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

TASK = "Task01_BrainTumour"
"""The MSD task folder every dataset (real or synthetic) lives in."""
SECTIONS = ("train", "validation", "test")
"""The sections of a patient-level split."""
BASELINE = "flair"
"""Sampler name of the FLAIR-intensity baseline (no model; the map is the intensity)."""
GUIDED = "guided"
"""Sampler name of the weakly supervised counterfactuals (:mod:`pipeline.scoring.guided`): a class-conditional model."""
CLASSIFIER_GUIDED = "classifier_guided"
"""Sampler name of the classifier-guided counterfactuals (:mod:`pipeline.scoring.classifier_guided`): an
unconditional model guided by a noisy-slice classifier trained with slice labels."""
SUPERVISION_LEVELS = ("unsupervised", "weak slice labels")
"""What a method may have learnt from (run records, leaderboard rows, the CLI's --supervision)."""


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is one :class:`InputError` line.

    ``what`` names the file in the message; ``hint`` (optional) tells a user where it comes from.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found" + (f" ({hint})" if hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(path, f"unreadable {what} ({err.strerror or err})") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise InputError(path, f"unreadable {what}: malformed JSON ({err})") from None


def read_optional_json(path: str | os.PathLike) -> dict | None:
    """A JSON object, or None when the file is missing, unreadable or holds something else: for
    files whose loss costs only time or detail (a hash cache, a run's own records on a site page)."""
    try:
        value = read_json(path, "JSON file")
    except InputError:
        return None
    return value if isinstance(value, dict) else None


def confined_path(folder: Path, relative: str, source, what: str, folder_name: str) -> Path:
    """``folder / relative`` resolved, refused unless it stays inside ``folder``: paths read from files a
    user brings (dataset.json, a scores index) must not make the pipeline read any file on the machine.

    Absolute paths, ``..`` and symlinks that lead out are one :class:`InputError` line naming ``source``;
    ``what`` names the entry and ``folder_name`` the folder in the message.
    """
    path = Path(relative)
    if path.is_absolute():
        raise InputError(source, f"{what} {relative!r} is an absolute path; paths must be relative to the {folder_name}")
    if ".." in path.parts:
        raise InputError(source, f"{what} {relative!r} contains '..'; paths must stay inside the {folder_name}")
    try:
        resolved = (folder / path).resolve()
    except (RuntimeError, OSError) as err:  # Python raises RuntimeError on a symlink loop
        raise InputError(source, f"{what} {relative!r} cannot be resolved ({err})") from None
    if not resolved.is_relative_to(Path(folder).resolve()):
        raise InputError(source, f"{what} {relative!r} leaves the {folder_name} through a symlink (-> {resolved})")
    return resolved


def is_int(value) -> bool:
    """An integer, not a bool (``True`` would pass ``isinstance(value, int)`` as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value, finite: bool = True) -> bool:
    """A real number, not a bool; finite unless ``finite=False`` (NaN and infinities pass then)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and (not finite or math.isfinite(value)))


def save_nifti(path: str | os.PathLike, data: np.ndarray, like, description: str | None = None) -> None:
    """Write ``data`` atomically as a NIfTI on the grid of ``like``, gzipped if ``path`` ends in ``.gz``.

    ``like`` is either the input image (its header is kept, so qform / sform codes and units match
    the input; its scaling and display window are dropped, since they describe other values) or a
    4x4 affine (qform and sform code 1, mm units). nibabel gzips without name or time stamp, so the
    same data gives the same bytes.
    """
    if isinstance(like, np.ndarray):
        image = nib.Nifti1Image(data, like)
        image.header.set_xyzt_units("mm")
        image.set_qform(like, code=1)
        image.set_sform(like, code=1)
    else:
        image = type(like)(data, like.affine, header=like.header.copy())
        image.header.set_slope_inter(1.0, 0.0)
        image.header["cal_min"], image.header["cal_max"] = 0, 0
    image.header.set_data_dtype(data.dtype)
    if description is not None:
        image.header["descrip"] = description.encode()[:79]
    with atomic_path(path, suffix=".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:
        nib.save(image, str(tmp))


def lazy_exports(package: str, **modules: str):
    """``__all__``, ``__getattr__`` and ``__dir__`` for a stage package that lists its public names without
    importing them.

    ``modules`` maps a module of ``package`` to the public names it defines (space-separated); a module is
    imported on first use of one of its names, so ``import pipeline.data.synth`` does not pull in MONAI and
    torch through the package.
    """
    import importlib

    names = {name: module for module, listed in modules.items() for name in listed.split()}

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{names[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return sorted(names), __getattr__, __dir__


def check_schema(document, schema: str, source) -> None:
    """Validate ``document`` against ``configs/schemas/<schema>.schema.json`` (JSON Schema 2020-12) and report
    every violated field in one :class:`InputError` line, so a hand-written file is fixed in one round trip."""
    import jsonschema

    from pipeline.layout import project_file

    path = project_file(f"configs/schemas/{schema}.schema.json")
    validator = jsonschema.Draft202012Validator(read_json(path, "JSON schema"))
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message[:160]}")
    if problems:
        raise InputError(source, f"{len(problems)} problem(s) against {path.name}: " + "; ".join(problems))
