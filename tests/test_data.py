"""Data stage: loading through DecathlonDataset, split, healthy-slice cache, and bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.data.dataset import PreprocessConfig, load_subjects
from pipeline.data.prepare import prepare_data
from pipeline.data.slice_cache import SliceDataset
from pipeline.data.split import make_split
from pipeline.data.transforms import preprocess_transforms
from pipeline.errors import InputError

CFG = PreprocessConfig(image_size=32, pixdim=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def prepared(synth_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("prepared")
    return prepare_data(synth_root, work / "split.json", work / "cache", CFG, split_seed=3, workers=2, progress=False)


def test_split_is_patient_level_and_written(prepared, synth_root):
    split = prepared.split
    sections = [set(split[s]) for s in ("train", "validation", "test")]
    assert all(sections)
    assert not (sections[0] & sections[1]) and not (sections[0] & sections[2]) and not (sections[1] & sections[2])
    subjects = {item["subject"] for item in load_subjects(synth_root).data}
    assert set().union(*sections) == subjects


def test_split_is_seeded():
    names = [f"S{i:02d}" for i in range(20)]
    assert make_split(names, seed=1) == make_split(names, seed=1)
    assert make_split(names, seed=1)["test"] != make_split(names, seed=2)["test"]


def test_cache_holds_only_healthy_slices_of_training_subjects(prepared, synth_root):
    ds = SliceDataset(prepared.cache_dir, "train")
    assert len(ds) > 0
    assert {row["subject"] for row in ds.index} <= set(prepared.split["train"])
    item = ds[0]["image"]
    assert item.shape == (1, 32, 32) and item.dtype == torch.float32
    assert 0.0 <= float(item.min()) and float(item.max()) <= 1.0
    # re-run the same transforms and check every cached slice against the label on that grid
    by_subject = {it["subject"]: it for it in load_subjects(synth_root).data}
    transform = preprocess_transforms(CFG)
    volumes = {}
    for k, row in enumerate(ds.index):
        if row["subject"] not in volumes:
            volumes[row["subject"]] = transform(dict(by_subject[row["subject"]]))
        out = volumes[row["subject"]]
        assert int((out["label"][..., row["z"]] > 0).sum()) == 0
        np.testing.assert_array_equal(ds.images[k], out["image"][..., row["z"]].numpy())
    # tumour subjects in training contribute some slices, but not their tumour slices
    tumour_subjects = [s for s, out in volumes.items() if int((out["label"] > 0).sum()) > 0]
    assert tumour_subjects, "expected at least one tumour subject in the training split"


def test_cache_is_reused(prepared, synth_root):
    again = prepare_data(synth_root, prepared.cache_dir.parent.parent / "split.json", prepared.cache_dir.parent,
                         CFG, split_seed=3, workers=1, progress=False)
    assert again.cache_dir == prepared.cache_dir


@pytest.mark.parametrize("channels,size", [(("FLAIR", "T1w", "T1gd", "T2w"), 48), (("FLAIR",), 128)])
def test_four_channels_and_other_sizes(synth_root, tmp_path, channels, size):
    cfg = PreprocessConfig(modalities=channels, image_size=size, pixdim=(4.0, 4.0, 4.0))
    prepared = prepare_data(synth_root, tmp_path / "split.json", tmp_path / "cache", cfg, workers=1, progress=False)
    assert SliceDataset(prepared.cache_dir)[0]["image"].shape == (len(channels), size, size)


# ------------------------------------------------------------------------------------------------
# bad input: one clear error naming the file, nothing half-written


def _first_image(root: Path) -> Path:
    return sorted((root / "Task01_BrainTumour" / "imagesTr").glob("*.nii.gz"))[0]


def _first_label(root: Path) -> Path:
    return sorted((root / "Task01_BrainTumour" / "labelsTr").glob("*.nii.gz"))[0]


def _rewrite_image(path: Path, fn) -> None:
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _missing_json(root):
    (root / "Task01_BrainTumour" / "dataset.json").unlink()


def _malformed_json(root):
    (root / "Task01_BrainTumour" / "dataset.json").write_text("{not json")


def _missing_key(root):
    path = root / "Task01_BrainTumour" / "dataset.json"
    meta = json.loads(path.read_text())
    del meta["training"]
    path.write_text(json.dumps(meta))


def _missing_file(root):
    _first_label(root).unlink()


def _truncated(root):
    path = _first_image(root)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_nifti(root):
    path = _first_image(root)
    path.write_bytes(gzip.compress(b"this is not a NIfTI file" * 50))


def _three_channels(root):
    _rewrite_image(_first_image(root), lambda a: a[..., :3])


def _shape_mismatch(root):
    path = _first_label(root)
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(path))


def _nan(root):
    def poison(a):
        a[a.shape[0] // 2, a.shape[1] // 2, a.shape[2] // 2, 0] = np.nan
        return a
    _rewrite_image(_first_image(root), poison)


def _all_zero(root):
    _rewrite_image(_first_image(root), np.zeros_like)


BAD_INPUTS = {
    "missing dataset.json": (_missing_json, "dataset.json", "not found"),
    "malformed dataset.json": (_malformed_json, "dataset.json", "malformed JSON"),
    "dataset.json without training": (_missing_key, "dataset.json", "missing key"),
    "listed file missing": (_missing_file, "labelsTr", "does not exist"),
    "truncated nii.gz": (_truncated, "imagesTr", "truncated or corrupt"),
    "not a NIfTI": (_not_nifti, "imagesTr", "NIfTI"),
    "wrong channel count": (_three_channels, "imagesTr", "expected 4 channels"),
    "image/label shape mismatch": (_shape_mismatch, "labelsTr", "does not match image shape"),
    "NaN voxels": (_nan, "imagesTr", "NaN or Inf"),
    "all-zero image": (_all_zero, "imagesTr", "all zero"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_writes_nothing(dataset_copy, tmp_path, case):
    corrupt, where, problem = BAD_INPUTS[case]
    corrupt(dataset_copy)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "prepare", "--dataset-dir", str(dataset_copy), "--split-file",
           str(out / "split.json"), "--cache-dir", str(out / "cache"), "--image-size", "32", "--spacing", "4",
           "--workers", "1", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert where in lines[0] and problem in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    cache = out / "cache"
    if cache.exists():
        assert not [p for p in cache.iterdir() if p.is_dir()], "no cache folder, finished or temporary"


def test_split_without_healthy_slices_is_refused(synth_root, tmp_path):
    cfg = PreprocessConfig(image_size=32, pixdim=(4.0, 4.0, 4.0), min_brain_fraction=0.99)
    with pytest.raises(InputError, match="no healthy slices"):
        prepare_data(synth_root, tmp_path / "split.json", tmp_path / "cache", cfg, workers=1, progress=False)
    assert not list((tmp_path / "cache").glob("*/cache.json"))


def test_split_file_naming_a_subject_twice_is_refused(synth_root, tmp_path):
    subjects = sorted(item["subject"] for item in load_subjects(synth_root).data)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": subjects[:4], "validation": subjects[3:5], "test": subjects[5:]}))
    with pytest.raises(InputError, match="in both"):
        prepare_data(synth_root, path, tmp_path / "cache", CFG, workers=1, progress=False)


def test_bad_config_values_are_refused():
    with pytest.raises(InputError, match="modality"):
        PreprocessConfig(modalities=("FLAIR", "PD"))
    with pytest.raises(InputError, match="image_size"):
        PreprocessConfig(image_size=4)


def test_validation_loader_is_shared_out_across_ranks_without_repeats(prepared, monkeypatch):
    """Under DDP each rank validates a disjoint share of the slices and together they cover each once
    (MONAI's metric handlers gather the shares); a single process goes over all of them in order."""
    from pipeline.model import train

    dataset = SliceDataset(prepared.cache_dir, "validation")
    n = len(dataset)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(train, "rank_and_world", lambda rank=rank: (rank, 2))
        shares.append(list(train.slice_loader(dataset, batch_size=4, shuffle=False).sampler))
    assert n >= 3 and shares[0] and shares[1] and sorted(shares[0] + shares[1]) == list(range(n))
    monkeypatch.setattr(train, "rank_and_world", lambda: (0, 1))
    assert list(train.slice_loader(dataset, shuffle=False).sampler) == list(range(n))


def test_section_dataset_holds_its_subjects_data(prepared):
    """``train#dataset#data`` (model-zoo's key): the section's subject items; a cache cut from other subjects
    is refused."""
    data = prepared.datalist("train")
    assert sorted(item["subject"] for item in data) == sorted(prepared.split["train"])
    assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in data)
    assert SliceDataset(prepared.cache_dir, "train", data).data == data
    with pytest.raises(InputError, match="not in the dataset's data"):
        SliceDataset(prepared.cache_dir, "train", prepared.datalist("validation"))
