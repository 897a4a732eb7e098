"""Evaluate stage and the FLAIR baseline, through the bundle's inference + evaluate workflows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.bundle import run_bundle
from pipeline.errors import InputError
from pipeline.evaluate import evaluate_scores
from pipeline.metrics import auprc, auroc


def baseline_settings(dataset: Path, out: Path) -> dict:
    return dict(dataset_dir=str(dataset), output_dir=str(out), image_size=32, pixdim=[4.0, 4.0, 4.0],
                sampler="flair", progress=False, num_workers=1, bootstrap_resamples=200)


@pytest.fixture(scope="module")
def baseline_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    settings = baseline_settings(synth_root, out)
    run_bundle("inference", **settings)
    run_bundle("evaluate", **settings)
    return out


def test_baseline_runs_and_writes_metrics_report_and_masks(baseline_run, synth_root):
    evaluation = baseline_run / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())["test"]
    for key in ("auroc", "auprc", "dice", "dice_oracle", "mean_subject_dice", "slice_auroc"):
        assert key in metrics
    assert 0.5 < metrics["auroc"] <= 1.0  # FLAIR edema is bright on the synthetic data
    assert metrics["dice_oracle"] >= metrics["dice"] - 1e-12
    for name in ("auroc", "auprc", "dice"):
        low, high = metrics["ci95"][name]
        assert 0 <= low <= high <= 1
        assert low - 0.01 <= metrics[name] <= high + 0.01  # percentile CI over binned resamples
    table = pd.read_csv(evaluation / "per_subject.csv")
    assert len(table) == metrics["subjects"]
    assert (evaluation / "report.png").stat().st_size > 10_000
    split = json.loads((baseline_run / "split.json").read_text())
    for subject in split["test"]:
        mask = nib.load(str(evaluation / "masks" / f"{subject}_mask.nii.gz"))
        label = nib.load(str(synth_root / "Task01_BrainTumour" / "labelsTr" / f"{subject}.nii.gz"))
        assert mask.shape == label.shape
        np.testing.assert_allclose(mask.affine, label.affine, atol=1e-5)


def test_metrics_match_a_direct_computation(baseline_run, synth_root):
    """Pooled test AUROC/AUPRC equal the plain functions over the maps read back from disk."""
    split = json.loads((baseline_run / "split.json").read_text())
    scores, labels = [], []
    for subject in split["test"]:
        score = np.asarray(nib.load(str(baseline_run / "scores" / "test" / f"{subject}_score.nii.gz")).dataobj)
        image = np.asarray(nib.load(str(synth_root / "Task01_BrainTumour" / "imagesTr" / f"{subject}.nii.gz")).dataobj)
        label = np.asarray(nib.load(str(synth_root / "Task01_BrainTumour" / "labelsTr" / f"{subject}.nii.gz")).dataobj)
        brain = (image != 0).any(axis=-1)
        scores.append(score[brain])
        labels.append(label[brain] > 0)
    metrics = json.loads((baseline_run / "evaluation" / "metrics.json").read_text())["test"]
    assert metrics["auroc"] == pytest.approx(auroc(np.concatenate(scores), np.concatenate(labels)), abs=1e-12)
    assert metrics["auprc"] == pytest.approx(auprc(np.concatenate(scores), np.concatenate(labels)), abs=1e-12)


def test_map_of_wrong_shape_is_refused(baseline_run, synth_root, tmp_path):
    scores = tmp_path / "scores"
    shutil.copytree(baseline_run / "scores", scores)
    victim = next((scores / "test").glob("*_score.nii.gz"))
    img = nib.load(str(victim))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), str(victim))
    with pytest.raises(InputError, match="does not match label shape"):
        evaluate_scores(synth_root, scores, tmp_path / "evaluation", n_boot=10, progress=False)
    assert not (tmp_path / "evaluation").exists()


def test_subject_without_label_is_refused(baseline_run, dataset_copy, tmp_path):
    meta_path = dataset_copy / "Task01_BrainTumour" / "dataset.json"
    meta = json.loads(meta_path.read_text())
    split = json.loads((baseline_run / "split.json").read_text())
    victim = split["test"][0]
    for entry in meta["training"]:
        if victim in entry["image"]:
            (dataset_copy / "Task01_BrainTumour" / entry["label"]).unlink()
    with pytest.raises(InputError, match="label"):
        evaluate_scores(dataset_copy, baseline_run / "scores", tmp_path / "evaluation", n_boot=10, progress=False)


def test_empty_test_split_is_refused(synth_root, tmp_path):
    from pipeline.data import load_subjects

    subjects = sorted(item["subject"] for item in load_subjects(synth_root).data)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": subjects[:6], "validation": subjects[6:], "test": []}))
    with pytest.raises(Exception) as info:
        run_bundle("inference", split_file=str(split), **baseline_settings(synth_root, tmp_path))
    from pipeline.errors import find_input_error

    assert "no test subjects" in str(find_input_error(info.value))
