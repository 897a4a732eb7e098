"""Stratified split: healthy and tumour subjects in every section; the random split the protocols are bound to unchanged."""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigParser

from pipeline.bundle import BUNDLE_DIR
from pipeline.data.dataset import dataset_split, load_subjects, task_paths, tumour_subjects
from pipeline.data.split import make_split, read_or_make_split
from pipeline.errors import InputError
from pipeline.protocols import canonical_split

SECTIONS = ("train", "validation", "test")


def _kinds(n_healthy: int, n_tumour: int) -> tuple[list[str], set[str]]:
    healthy, tumour = [f"H{i:02d}" for i in range(n_healthy)], {f"T{i:02d}" for i in range(n_tumour)}
    return healthy + sorted(tumour), tumour


def _counts(split: dict, tumour: set[str]) -> dict[str, tuple[int, int]]:
    """(healthy, tumour) subjects per section."""
    return {s: (sum(n not in tumour for n in split[s]), sum(n in tumour for n in split[s])) for s in SECTIONS}


def test_the_random_split_of_the_published_protocols_is_unchanged():
    """Pinned from the first release's make_split: every bound protocol's split depends on these bytes; a random
    split records no method (absent means random), so its file and fingerprint stay the same too."""
    names = [f"S{i:02d}" for i in range(10)]
    assert make_split(names, seed=3) == {"seed": 3, "fractions": [0.6, 0.2, 0.2],
                                         "train": ["S00", "S01", "S02", "S04", "S06", "S09"],
                                         "validation": ["S05", "S07"], "test": ["S03", "S08"]}
    assert make_split(names[:7], seed=1, test=["T1", "T2"]) == {
        "seed": 1, "fractions": [0.6, 0.2, 0.2], "train": ["S00", "S01", "S02", "S04", "S05"],
        "validation": ["S03", "S06"], "test": ["T1", "T2"]}


def test_three_healthy_and_four_tumour_subjects_give_every_section_both_kinds():
    """The issue's dataset: a random split of 7 subjects puts one subject in validation (for seed 0 a healthy
    one: evaluation then has no positive); stratified, every section holds both kinds, for every seed."""
    subjects, tumour = _kinds(3, 4)
    assert _counts(make_split(subjects, seed=0), tumour)["validation"] == (1, 0)
    for seed in range(30):
        split = make_split(subjects, seed=seed, method="stratified", tumour=tumour)
        assert split["method"] == "stratified"
        assert sorted(n for s in SECTIONS for n in split[s]) == sorted(subjects)
        assert _counts(split, tumour) == {"train": (1, 2), "validation": (1, 1), "test": (1, 1)}
    assert make_split(subjects, seed=1, method="stratified", tumour=tumour) != \
        make_split(subjects, seed=2, method="stratified", tumour=tumour)


def test_stratified_split_keeps_the_fractions_within_each_kind():
    subjects, tumour = _kinds(20, 50)
    split = make_split(subjects, seed=5, method="stratified", tumour=tumour)
    assert _counts(split, tumour) == {"train": (12, 30), "validation": (4, 10), "test": (4, 10)}
    assert split == make_split(subjects, seed=5, method="stratified", tumour=tumour)


@pytest.mark.parametrize("n_healthy,n_tumour", [(2, 4), (3, 2), (1, 9), (5, 0)])
def test_too_few_of_a_kind_is_refused_in_one_line(n_healthy, n_tumour):
    subjects, tumour = _kinds(n_healthy, n_tumour)
    with pytest.raises(InputError, match="stratified split needs at least 3 tumour") as err:
        make_split(subjects, method="stratified", tumour=tumour)
    assert "\n" not in str(err.value) and f"got {n_tumour} tumour and {n_healthy} healthy" in str(err.value)


def test_a_dataset_without_healthy_subjects_is_split_over_its_tumour_subjects():
    """MSD Task01: every BraTS subject has a tumour; each section still gets tumour subjects (and healthy slices)."""
    subjects, tumour = _kinds(0, 10)
    assert _counts(make_split(subjects, method="stratified", tumour=tumour), tumour) == {
        "train": (0, 6), "validation": (0, 2), "test": (0, 2)}


def test_hidden_label_test_subjects_stay_the_test_section():
    subjects, tumour = _kinds(4, 6)
    split = make_split(subjects, seed=2, test=["X1", "X2"], method="stratified", tumour=tumour)
    assert split["test"] == ["X1", "X2"]
    counts = _counts(split, tumour)
    assert counts["train"][0] and counts["train"][1] and counts["validation"] == (1, 2)
    with pytest.raises(InputError, match="at least 2 tumour"):
        make_split(subjects[:5], test=["X1"], method="stratified", tumour={"T00"})


def test_unknown_method_is_refused():
    with pytest.raises(InputError, match="unknown split method 'balanced'"):
        make_split(["a", "b", "c"], method="balanced")


def test_tumour_subjects_are_read_from_the_labels(synth_root):
    """A subject is a tumour subject when its label has a tumour voxel (what evaluation counts), here checked
    against the generator's own record of its healthy subjects."""
    _, task = task_paths(synth_root)
    healthy = set(json.loads((task / "dataset.json").read_text())["synthetic"]["healthy"])
    items = load_subjects(synth_root).data
    assert tumour_subjects(items) == {item["subject"] for item in items} - healthy and healthy


def test_an_existing_split_file_is_reused_whatever_its_method(tmp_path):
    subjects, tumour = _kinds(3, 4)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(make_split(subjects, seed=0)))
    asked = []
    split, made = read_or_make_split(path, subjects, method="stratified", tumour=lambda: asked.append(1) or tumour)
    assert not made and "method" not in split and asked == []  # labels not even read


def test_the_bundle_makes_a_stratified_split_where_none_is_bound(synth_root, tmp_path):
    """The bundle's default (plain `pipeline train` / `score`, the Python API): a new split is stratified."""
    parser = ConfigParser(ConfigParser.load_config_file(BUNDLE_DIR / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE_DIR), "dataset_dir": str(synth_root),
                   "split_file": str(tmp_path / "split.json")})
    split = parser.get_parsed_content("split")
    tumour = tumour_subjects(load_subjects(synth_root).data)
    assert split["method"] == "stratified" and json.loads((tmp_path / "split.json").read_text()) == split
    assert all(h and t for h, t in _counts(split, tumour).values())


def test_protocols_keep_their_random_split_unless_they_ask(synth_root):
    """A protocol binds the split its seed gives by the random method; ``split: {method: stratified}`` is a new one."""
    protocol = {"dataset": {"dir": str(synth_root)}, "split": {"seed": 3}}
    assert canonical_split(protocol) == dataset_split(synth_root, seed=3) == \
        make_split([item["subject"] for item in load_subjects(synth_root).data], seed=3)
    protocol["split"]["method"] = "stratified"
    assert canonical_split(protocol)["method"] == "stratified"
