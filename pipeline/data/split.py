"""Patient-level split: every subject in exactly one of train / validation / test, from a seed.

The split file is written once and reused, so every stage (and every rerun) sees the same patients.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.atomic import write_json
from pipeline.common import SECTIONS, read_json
from pipeline.errors import InputError


def make_split(subjects: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
               test: Sequence[str] | None = None) -> dict:
    """Seeded patient-level split: each subject lands in exactly one of train/validation/test.

    ``test`` fixes the test section (a dataset's listed test images, whose labels are hidden);
    ``subjects`` (the other ones) then go to train and validation in the ratio of their fractions.
    Not MONAI's ``partition_dataset``: it cannot hold a given test section fixed, and its rounding and
    shuffle would move subjects of the splits the published protocols are bound to.
    """
    subjects = sorted(subjects)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError("split fractions", f"need three non-negative fractions summing to 1, got {list(fractions)}")
    if test is not None:
        return _split_around_test(subjects, sorted(test), fractions, seed)
    if len(subjects) < 3:
        raise InputError("dataset", f"need at least 3 subjects for a train/validation/test split, got {len(subjects)}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = max(1, round(fractions[1] * len(subjects)))
    n_test = max(1, round(fractions[2] * len(subjects)))
    n_train = len(subjects) - n_val - n_test
    if n_train < 1:
        raise InputError("split fractions", f"leave no training subject out of {len(subjects)}")
    picked = [subjects[i] for i in order]
    return {
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "train": sorted(picked[:n_train]),
        "validation": sorted(picked[n_train:n_train + n_val]),
        "test": sorted(picked[n_train + n_val:]),
    }


def _split_around_test(subjects: list[str], test: list[str], fractions: Sequence[float], seed: int) -> dict:
    """Train / validation drawn from ``subjects`` (seeded, patient-level); test is given."""
    if set(subjects) & set(test) or not test:
        raise InputError("dataset", "the listed test subjects must be non-empty and not among the training entries")
    if len(subjects) < 2 or fractions[0] <= 0 or fractions[1] <= 0:
        raise InputError("dataset", f"need at least 2 training entries and non-zero train and validation "
                                    f"fractions beside the {len(test)} listed test subjects, got {len(subjects)} "
                                    f"and {list(fractions)}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, round(fractions[1] / (fractions[0] + fractions[1]) * len(subjects))))
    n_train = len(subjects) - n_val
    picked = [subjects[i] for i in order]
    return {"seed": int(seed), "fractions": [float(f) for f in fractions], "train": sorted(picked[:n_train]),
            "validation": sorted(picked[n_train:]), "test": test}


def domain_split(domains: Mapping[str, str | None], train_domains: Sequence[str],
                 fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict:
    """Shift split: subjects of ``train_domains`` train, every other subject is validation or test.

    ``domains`` maps each subject to its domain (acquisition site, protocol, lesion mix: the dataset.json
    entry's ``domain``). Validation and test are drawn from the other domains in the ratio of their
    fractions (seeded, patient-level), so both measure transfer: what a model learnt on one kind of data
    and is chosen and tested on another.
    """
    train_domains = sorted({str(d) for d in train_domains})
    unlabelled = sorted(s for s, d in domains.items() if d is None)
    if unlabelled:
        raise InputError("split.train_domains", f"needs a 'domain' on every dataset.json entry; missing for "
                                                f"{', '.join(unlabelled[:3])}")
    train = sorted(s for s, d in domains.items() if d in train_domains)
    held_out = sorted(s for s, d in domains.items() if d not in train_domains)
    if not train or len(held_out) < 2:
        found = sorted(set(domains.values()))
        raise InputError("split.train_domains", f"{train_domains} leave {len(train)} training and {len(held_out)} "
                                                f"held-out subjects (domains in the dataset: {found})")
    share = fractions[1] / (fractions[1] + fractions[2])
    order = np.random.default_rng(seed).permutation(len(held_out))
    n_val = min(len(held_out) - 1, max(1, round(share * len(held_out))))
    picked = [held_out[i] for i in order]
    return {"seed": int(seed), "fractions": [float(f) for f in fractions], "train_domains": train_domains,
            "train": train, "validation": sorted(picked[:n_val]), "test": sorted(picked[n_val:])}


def check_split(split: dict, subjects: Sequence[str], source: str | os.PathLike) -> dict:
    """A split must name known subjects only, each once."""
    seen: dict[str, str] = {}
    for section in SECTIONS:
        names = split.get(section)
        if not isinstance(names, list):
            raise InputError(source, f"split needs a list {section!r}")
        for name in names:
            if name in seen:
                raise InputError(source, f"subject {name} is in both {seen[name]!r} and {section!r}")
            seen[name] = section
    unknown = sorted(set(seen) - set(subjects))
    if unknown:
        raise InputError(source, f"split names subjects not in the dataset: {', '.join(unknown[:5])}")
    return split


def read_or_make_split(path: str | os.PathLike, subjects: Sequence[str], fractions=(0.6, 0.2, 0.2), seed: int = 0,
                       test: Sequence[str] | None = None) -> tuple[dict, bool]:
    """(split, made now): the split file's if present (checked), else a new one that is not written yet.

    With ``test`` (listed hidden-label test subjects), a reused file must have exactly them as test.
    """
    path = Path(path)
    if not path.is_file():
        return make_split(subjects, fractions, seed, test), True
    split = read_json(path, "split file")
    check_split(split, [*subjects, *(test or [])], path)
    if test is not None and sorted(split["test"]) != sorted(test):
        raise InputError(path, f"test section differs from the {len(test)} test images listed in dataset.json "
                               "(with hidden test labels the test split is fixed)")
    return split, False


def load_or_make_split(path: str | os.PathLike, subjects: Sequence[str], fractions=(0.6, 0.2, 0.2), seed: int = 0,
                       test: Sequence[str] | None = None) -> dict:
    """Reuse the split file if present (so every stage sees the same patients); else write it."""
    split, made = read_or_make_split(path, subjects, fractions, seed, test)
    if made:
        write_json(path, split)
    return split
