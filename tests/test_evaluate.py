"""Evaluate stage and the FLAIR baseline, through the bundle's inference + evaluate workflows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.atomic import write_json
from pipeline.bundle import run_bundle
from pipeline.errors import InputError
from pipeline.evaluation.evaluate import compute_metrics, evaluate_scores
from pipeline.evaluation.metrics import auprc, auroc
from pipeline.evaluation.report import _summary_text


def baseline_settings(dataset: Path, out: Path) -> dict:
    return dict(dataset_dir=str(dataset), output_dir=str(out), image_size=32, pixdim=[4.0, 4.0, 4.0],
                sampler="flair", progress=False, num_workers=1, bootstrap_resamples=200)


def mixed_split(dataset: Path) -> dict:
    """Validation and test each hold healthy and tumour subjects, so subject-level figures are defined."""
    from pipeline.data.dataset import load_subjects

    items = load_subjects(dataset).data
    tumour = sorted(it["subject"] for it in items if np.asarray(nib.load(it["label"]).dataobj).any())
    healthy = sorted(it["subject"] for it in items if it["subject"] not in tumour)
    assert len(healthy) >= 3 and len(tumour) >= 4
    return {"train": healthy[2:] + tumour[3:], "validation": [healthy[0], tumour[0]],
            "test": [healthy[1], tumour[1], tumour[2]]}


@pytest.fixture(scope="module")
def baseline_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    write_json(out / "split.json", mixed_split(synth_root))  # the bundle's split_file: reused, not remade
    settings = baseline_settings(synth_root, out)
    run_bundle("inference", **settings)
    run_bundle("evaluate", **settings)
    return out


def test_baseline_runs_and_writes_metrics_report_and_masks(baseline_run, synth_root):
    evaluation = baseline_run / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())["test"]
    for key in ("auroc", "auprc", "dice", "dice_oracle", "mean_subject_dice", "slice_auroc", "subject_auroc",
                "subject_score_percentile", "healthy_subjects", "tumour_subjects", "false_positive_ml_healthy",
                "false_positive_ml_per_healthy_subject", "reconstruction"):
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


def read_test_subject(run: Path, data: Path, subject: str) -> dict:
    """A test subject's map, affine, brain mask and tumour mask read straight from disk."""
    score = nib.load(str(run / "scores" / "test" / f"{subject}_score.nii.gz"))
    image = np.asarray(nib.load(str(data / "Task01_BrainTumour" / "imagesTr" / f"{subject}.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(data / "Task01_BrainTumour" / "labelsTr" / f"{subject}.nii.gz")).dataobj)
    return {"score": np.asarray(score.dataobj), "affine": score.affine, "brain": (image != 0).any(axis=-1),
            "tumour": label > 0}


def test_subject_level_figures_match_a_direct_computation(baseline_run, synth_root):
    """Subject AUROC (99th-percentile subject scores) and false-positive ml, recomputed independently."""
    metrics = json.loads((baseline_run / "evaluation" / "metrics.json").read_text())["test"]
    split = json.loads((baseline_run / "split.json").read_text())
    subjects = {s: read_test_subject(baseline_run, synth_root, s) for s in split["test"]}
    tumour = {s: bool(v["tumour"].any()) for s, v in subjects.items()}
    healthy = sorted(s for s in subjects if not tumour[s])
    assert healthy and len(healthy) < len(subjects)  # mixed_split: both classes, so nothing is None here
    assert (metrics["healthy_subjects"], metrics["tumour_subjects"]) == (len(healthy), len(subjects) - len(healthy))
    assert metrics["subject_score_percentile"] == 99.0
    peak = [np.percentile(v["score"][v["brain"]].astype(np.float64), 99) for v in subjects.values()]
    assert metrics["subject_auroc"] == pytest.approx(roc_auc_score(list(tumour.values()), peak), abs=1e-12)
    threshold = metrics["dice_threshold_from_validation"]
    expected = {s: np.count_nonzero(subjects[s]["score"][subjects[s]["brain"]] > threshold)
                * abs(np.linalg.det(subjects[s]["affine"][:3, :3])) / 1000 for s in healthy}
    assert sorted(metrics["false_positive_ml_per_healthy_subject"]) == healthy
    for s in healthy:
        assert metrics["false_positive_ml_per_healthy_subject"][s] == pytest.approx(expected[s])
    assert metrics["false_positive_ml_healthy"] == pytest.approx(np.mean(list(expected.values())))


def test_test_subjects_stream_one_at_a_time_through_the_visitor(baseline_run, synth_root):
    """Each test subject reaches the visitor once, in name order, with the validation threshold; what
    the result keeps per subject matches its volumes."""
    seen = []

    def visit(name, data, threshold):
        seen.append((name, threshold, int(data["tumour"].sum()), int(data["brain"].sum())))

    result = compute_metrics(synth_root, baseline_run / "scores", n_boot=10, progress=False, on_test_subject=visit)
    split = json.loads((baseline_run / "split.json").read_text())
    threshold = result.metrics["test"]["dice_threshold_from_validation"]
    assert [s[0] for s in seen] == sorted(split["test"]) == list(result.subjects) == list(result.voxels.subjects)
    for name, t, tumour, brain in seen:
        assert t == threshold and result.subjects[name].tumour_voxels == tumour
        assert result.voxels.subject(name)[0].size == brain
    direct = read_test_subject(baseline_run, synth_root, seen[0][0])
    assert result.subjects[seen[0][0]].score == np.percentile(direct["score"][direct["brain"]].astype(np.float64), 99)


RECON = {"healthy_residual_sum": 2.0, "healthy_voxels": 20, "tumour_residual_sum": 3.0, "tumour_voxels": 10,
         "psnr_sum": 90.0, "ssim_sum": 2.4, "healthy_slices": 3}


def test_reconstruction_figures_come_from_the_index_and_reach_the_summary(baseline_run, synth_root, tmp_path):
    """Every validation subject records RECON (residual 0.1 healthy, 0.3 tumour, PSNR 30, SSIM 0.8);
    one test subject has no record, as in an old index: the test figures are None, not an error."""
    scores = tmp_path / "scores"
    shutil.copytree(baseline_run / "scores", scores)
    index = json.loads((scores / "index.json").read_text())
    for row in index["subjects"].values():
        row["recon"] = dict(RECON)
    del index["subjects"][sorted(s for s, r in index["subjects"].items() if r["section"] == "test")[0]]["recon"]
    write_json(scores / "index.json", index)
    metrics = compute_metrics(synth_root, scores, n_boot=10, progress=False).metrics
    val = metrics["validation"]["reconstruction"]
    n = metrics["validation"]["subjects"]
    assert val["healthy_residual"] == pytest.approx(0.1) and val["tumour_residual"] == pytest.approx(0.3)
    assert val["residual_ratio"] == pytest.approx(3.0)
    assert val["psnr"] == pytest.approx(30.0) and val["ssim"] == pytest.approx(0.8)
    assert (val["healthy_voxels"], val["tumour_voxels"], val["healthy_slices"]) == (20 * n, 10 * n, 3 * n)
    assert set(metrics["test"]["reconstruction"].values()) == {None}
    text = _summary_text(metrics)
    assert "healthy residual 0.1000" in text and "tumour/healthy 3.00" in text and "PSNR 30.0 SSIM 0.800" in text
    assert "subject AUROC" in text and "FP healthy" in text


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
    from pipeline.data.dataset import load_subjects

    subjects = sorted(item["subject"] for item in load_subjects(synth_root).data)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": subjects[:6], "validation": subjects[6:], "test": []}))
    with pytest.raises(Exception) as info:
        run_bundle("inference", split_file=str(split), **baseline_settings(synth_root, tmp_path))
    from pipeline.errors import find_input_error

    assert "no test subjects" in str(find_input_error(info.value))
