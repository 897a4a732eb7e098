"""Patient-level split: every subject in exactly one of train / validation / test, from a seed.

The split file is written once and reused, so every stage (and every rerun) sees the same patients.
Two methods: ``random`` (the first one; every published protocol is bound to its splits, so it stays
exactly as it was, and a split without a ``method`` field is one) and ``stratified`` (healthy and tumour
subjects drawn separately, so every section holds both kinds: a validation section without a tumour
subject cannot choose a threshold, one without a healthy subject cannot count false alarms).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from pipeline.atomic import write_json
from pipeline.common import SECTIONS, read_json
from pipeline.errors import InputError


RANDOM, STRATIFIED = "random", "stratified"
SPLIT_METHODS = (RANDOM, STRATIFIED)


def make_split(subjects: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
               test: Sequence[str] | None = None, method: str = RANDOM,
               tumour: Collection[str] | None = None) -> dict:
    """Seeded patient-level split: each subject lands in exactly one of train/validation/test.

    ``test`` fixes the test section (a dataset's listed test images, whose labels are hidden);
    ``subjects`` (the other ones) then go to train and validation in the ratio of their fractions.
    ``method`` ``stratified`` splits healthy and tumour subjects (``tumour``: those with a tumour) apart
    (:func:`stratified_split`). Not MONAI's ``partition_dataset``: it cannot hold a given test section fixed,
    and its rounding and shuffle would move subjects of the splits the published protocols are bound to.
    """
    subjects = sorted(subjects)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError("split fractions", f"need three non-negative fractions summing to 1, got {list(fractions)}")
    if method not in SPLIT_METHODS:
        raise InputError("split_method", f"unknown split method {method!r}; choose one of {', '.join(SPLIT_METHODS)}")
    if method == STRATIFIED:
        return stratified_split(subjects, set(tumour or ()), fractions, seed, test)
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


def stratified_split(subjects: Sequence[str], tumour: Collection[str], fractions: Sequence[float] = (0.6, 0.2, 0.2),
                     seed: int = 0, test: Sequence[str] | None = None) -> dict:
    """Healthy and tumour subjects split apart (seeded, in the ratio of ``fractions``), so every section gets
    both kinds; refused when a kind has fewer subjects than there are sections to fill.

    Tumour subjects are needed in every section (evaluation's positives); healthy ones wherever the dataset
    has any (MSD Task01 has none: every BraTS subject has a tumour, and healthy tissue comes from their other
    slices). ``test`` (hidden-label test images, kind unknown) stays the test section; the rest is split
    between train and validation.
    """
    sections = ("train", "validation") if test is not None else ("train", "validation", "test")
    kinds = {"tumour": sorted(s for s in subjects if s in tumour),
             "healthy": sorted(s for s in subjects if s not in tumour)}
    required = {"tumour": len(sections), "healthy": len(sections) if kinds["healthy"] else 0}
    if any(len(kinds[k]) < n for k, n in required.items()):
        raise InputError("dataset", f"a stratified split needs at least {len(sections)} tumour subjects (and as many "
                                    f"healthy ones, if any) for one of each per section ({', '.join(sections)}); "
                                    f"got {len(kinds['tumour'])} tumour and {len(kinds['healthy'])} healthy: add "
                                    "subjects or set split_method random")
    rng = np.random.default_rng(seed)
    split = {section: [] for section in ("train", "validation", "test")}
    for kind in ("healthy", "tumour"):
        names = [kinds[kind][i] for i in rng.permutation(len(kinds[kind]))]
        for section, part in zip(sections, _section_sizes(len(names), fractions, sections)):
            split[section] += names[:part]
            names = names[part:]
    if test is not None:
        split["test"] = list(test)
    return {"seed": int(seed), "fractions": [float(f) for f in fractions], "method": STRATIFIED,
            **{section: sorted(names) for section, names in split.items()}}


def _section_sizes(n: int, fractions: Sequence[float], sections: Sequence[str]) -> list[int]:
    """Subjects per section out of ``n`` (each but train at least one; train keeps the rest, at least one)."""
    shares = dict(zip(("train", "validation", "test"), fractions))
    total = sum(shares[s] for s in sections)
    held = [max(1, round(shares[s] / total * n)) for s in sections[1:]] if n else [0] * (len(sections) - 1)
    if n and n - sum(held) < 1:
        raise InputError("split fractions", f"{list(fractions)} leave no training subject out of {n} of one kind")
    return [n - sum(held), *held]


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
                       test: Sequence[str] | None = None, method: str = RANDOM,
                       tumour: Callable[[], Collection[str]] | None = None) -> tuple[dict, bool]:
    """(split, made now): the split file's if present (checked), else a new one that is not written yet.

    With ``test`` (listed hidden-label test subjects), a reused file must have exactly them as test. A file
    found is reused whatever its method (the models trained on it are bound to it). ``tumour`` gives the
    tumour subjects; it is called only to make a stratified split (it may read every label).
    """
    path = Path(path)
    if not path.is_file():
        found = tumour() if method == STRATIFIED and tumour is not None else None
        return make_split(subjects, fractions, seed, test, method, found), True
    split = read_json(path, "split file")
    check_split(split, [*subjects, *(test or [])], path)
    if test is not None and sorted(split["test"]) != sorted(test):
        raise InputError(path, f"test section differs from the {len(test)} test images listed in dataset.json "
                               "(with hidden test labels the test split is fixed)")
    return split, False


def load_or_make_split(path: str | os.PathLike, subjects: Sequence[str], fractions=(0.6, 0.2, 0.2), seed: int = 0,
                       test: Sequence[str] | None = None, method: str = RANDOM,
                       tumour: Callable[[], Collection[str]] | None = None) -> dict:
    """Reuse the split file if present (so every stage sees the same patients); else write it."""
    split, made = read_or_make_split(path, subjects, fractions, seed, test, method, tumour)
    if made:
        write_json(path, split)
    return split
