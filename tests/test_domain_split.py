"""Shift protocols: a split that trains on some domains and validates / tests on the others."""

from __future__ import annotations

import json

import pytest

from pipeline.data.dataset import dataset_split
from pipeline.data.split import domain_split
from pipeline.errors import InputError


def _domains(n_source: int, n_target: int) -> dict:
    subjects = {f"S{i:02d}": "source" for i in range(n_source)}
    return {**subjects, **{f"T{i:02d}": "target" for i in range(n_target)}}


def test_training_subjects_come_from_the_training_domains_only():
    split = domain_split(_domains(6, 8), ["source"], seed=3)
    assert split["train"] == [f"S{i:02d}" for i in range(6)]
    held = split["validation"] + split["test"]
    assert sorted(held) == [f"T{i:02d}" for i in range(8)] and len(split["validation"]) == 4
    assert not set(split["validation"]) & set(split["test"]) and split["train_domains"] == ["source"]


def test_domain_split_is_seeded():
    assert domain_split(_domains(4, 10), ["source"], seed=1) == domain_split(_domains(4, 10), ["source"], seed=1)
    assert domain_split(_domains(4, 10), ["source"], seed=1) != domain_split(_domains(4, 10), ["source"], seed=2)


@pytest.mark.parametrize("domains, train, problem", [
    ({"A": "source", "B": None, "C": "target"}, ["source"], "missing for B"),
    (_domains(3, 1), ["source"], "1 held-out"),
    (_domains(3, 4), ["elsewhere"], "0 training"),
])
def test_bad_domain_splits_are_refused(domains, train, problem):
    with pytest.raises(InputError, match=problem):
        domain_split(domains, train)


def test_dataset_split_reads_the_domain_of_each_dataset_json_entry(dataset_copy):
    path = dataset_copy / "Task01_BrainTumour" / "dataset.json"
    meta = json.loads(path.read_text())
    for i, entry in enumerate(meta["training"]):
        entry["domain"] = "clinic" if i < 4 else "scanner-b"
    path.write_text(json.dumps(meta))
    split = dataset_split(dataset_copy, seed=0, train_domains=["clinic"])
    firsts = sorted(e["image"].split("/")[-1].split(".")[0] for e in meta["training"][:4])
    assert split["train"] == firsts and len(split["validation"]) + len(split["test"]) == len(meta["training"]) - 4
    assert dataset_split(dataset_copy, seed=0) != split  # without train_domains: the ordinary seeded split
