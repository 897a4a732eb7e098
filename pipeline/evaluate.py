"""Evaluate stage: saved anomaly maps + ground truth -> metrics.json, per-subject CSV, PNG report.

The protocol (design notes, "Evaluation protocol"): brain voxels of the original image space,
whole tumour (label > 0) as positives; the Dice threshold is chosen on validation subjects and
applied to test subjects (the honest number); the best Dice over thresholds on test is reported
too, labelled as the oracle. Binary masks at the chosen threshold are written beside the maps.
Beside the pixel numbers: subject-level detection AUROC, false-positive volume (ml) on healthy test
subjects at the validation threshold, and reconstruction quality pooled from the ``recon`` records
the score stage leaves in index.json (None for an index written before it did).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .atomic import atomic_dir, atomic_path, write_json
from .data import has_hidden_label, load_subjects
from .errors import InputError
from .layout import HIDDEN_TEST_KEY, ground_truth_label
from .metrics import (SUBJECT_SCORE_PERCENTILE, ScoreAccumulator, auroc, false_positive_ml, reconstruction_figures,
                      roc_pr_curves, slice_labels, slice_scores, subject_detection_auroc, subject_score)
from .report import write_report
from .score import read_index


def _read_volume(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj), img.affine
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raise InputError(path, f"cannot read {what} ({type(err).__name__}: {err})") from None


AFFINE_TOLERANCE_MM = 0.01
"""A map must sit on its image's grid: affines may differ by float32 storage only."""


def load_subject_maps(item: dict, score_path: Path) -> dict:
    """Map, whole-tumour label and brain mask of one subject, all on the original grid.

    The map must have the image's shape and affine (a shifted or flipped map is refused, not
    silently compared voxel by voxel) and must not be the label file itself (a hard link)."""
    if not item.get("label"):
        raise InputError(item["image"], "subject has no label; evaluation needs ground truth")
    if score_path.is_file() and Path(item["label"]).is_file() and score_path.samefile(item["label"]):
        raise InputError(score_path, f"map is the label file {item['label']} itself")
    score, affine = _read_volume(score_path, "anomaly map")
    label, _ = _read_volume(Path(item["label"]), "label")
    image, image_affine = _read_volume(Path(item["image"]), "image")
    if score.shape != label.shape:
        raise InputError(score_path, f"map shape {score.shape} does not match label shape {label.shape} "
                                     f"of {item['label']}")
    if not np.allclose(affine, image_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(affine - image_affine).max())
        raise InputError(score_path, f"map affine differs from that of {item['image']} by up to {worst:.3g} "
                                     "(shifted, flipped or resampled map)")
    if not np.isfinite(score).all():
        raise InputError(score_path, "map contains NaN or Inf")
    brain = (image != 0).any(axis=-1) if image.ndim == 4 else image != 0
    return {"score": score.astype(np.float32), "tumour": label > 0, "brain": brain, "affine": affine}


def checked_index(scores_dir: Path) -> dict:
    """``index.json`` with every subject entry checked: a known section and a map path that is
    relative, has no ``..`` and resolves (symlinks followed) inside the scores folder."""
    index_path = scores_dir / "index.json"
    index = read_index(scores_dir)
    subjects = index.get("subjects") if isinstance(index, dict) else None
    if not isinstance(subjects, dict):
        raise InputError(index_path, "needs a 'subjects' mapping")
    for name, row in subjects.items():
        if not isinstance(row, dict) or row.get("section") not in ("validation", "test"):
            raise InputError(index_path, f"subject {name!r}: entry needs 'section' 'validation' or 'test'")
        row["map_path"] = map_path(scores_dir, name, row)
    return index


def map_path(scores_dir: Path, name: str, row: dict) -> Path:
    """The resolved map file of one index entry; refuses paths that leave the scores folder."""
    index_path = scores_dir / "index.json"
    files = row.get("files")
    rel = files.get("score") if isinstance(files, dict) else None
    if not isinstance(rel, str) or not rel:
        raise InputError(index_path, f"subject {name!r}: needs files.score, a path inside the scores folder")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise InputError(index_path, f"subject {name!r}: map path {rel!r} must be relative, without '..'")
    path = (scores_dir / rel).resolve()
    if not path.is_relative_to(scores_dir.resolve()):
        raise InputError(index_path, f"subject {name!r}: map path {rel!r} leaves the scores folder (-> {path})")
    return path


def _section_names(index: dict, scores_dir: Path, section: str) -> list[str]:
    names = sorted(s for s, row in index["subjects"].items() if row["section"] == section)
    if not names:
        raise InputError(scores_dir / "index.json", f"no {section} subjects were scored")
    return names


def with_ground_truth(item: dict, ground_truth_dir: str | os.PathLike | None) -> dict:
    """``item`` with a label: its own, or for a hidden-label test subject the organiser's file."""
    if not has_hidden_label(item):
        return item
    if ground_truth_dir is None:
        raise InputError(item["image"], "test label is hidden (not in the dataset); evaluate against the organiser's "
                                        "ground truth (ground_truth_dir, or leaderboard submit --ground-truth DIR)")
    path = ground_truth_label(ground_truth_dir, item["subject"])
    if not path.is_file():
        raise InputError(path, f"hidden test label of {item['subject']} not found in the ground-truth folder")
    return {**item, "label": str(path)}


def _check_ground_truth_dir(ground_truth_dir, items: list[dict]) -> None:
    """A ground-truth folder must exist and have something to supply (a silent no-op would let an
    organiser believe the hidden labels were used)."""
    if ground_truth_dir is None:
        return
    if not Path(ground_truth_dir).is_dir():
        raise InputError(ground_truth_dir, "ground-truth folder not found")
    if not any(has_hidden_label(item) for item in items):
        raise InputError(ground_truth_dir, f"the dataset has no hidden-label test subjects (dataset.json has no "
                                           f"{HIDDEN_TEST_KEY!r}); its own labels are the ground truth")


def _accumulate(index: dict, scores_dir: Path, by_subject: dict, section: str, progress: bool,
                ground_truth_dir: str | os.PathLike | None = None):
    """Pool one section's brain voxels; also keep slice scores for slice-level AUROC."""
    acc = ScoreAccumulator()
    slice_s, slice_l, volumes = [], [], {}
    names = _section_names(index, scores_dir, section)
    for name in tqdm(names, desc=f"evaluate {section}", unit="subject", disable=not progress):
        if name not in by_subject:
            raise InputError(scores_dir / "index.json", f"subject {name} is not in the dataset")
        data = load_subject_maps(with_ground_truth(by_subject[name], ground_truth_dir),
                                 index["subjects"][name]["map_path"])
        acc.add(name, data["score"][data["brain"]], data["tumour"][data["brain"]])
        slice_s.append(slice_scores(data["score"], data["brain"]))
        slice_l.append(slice_labels(data["tumour"]))
        volumes[name] = data
    return acc, np.concatenate(slice_s), np.concatenate(slice_l), volumes


def compute_metrics(dataset_dir: str | os.PathLike, scores_dir: str | os.PathLike, method: str = "",
                    n_boot: int = 1000, seed: int = 0, progress: bool = True,
                    ground_truth_dir: str | os.PathLike | None = None) -> tuple[dict, ScoreAccumulator, dict]:
    """Recompute every number from the saved maps and the ground truth (nothing self-reported).

    Returns (metrics, test accumulator, per-subject test volumes). Used by the evaluate workflow
    and by the leaderboard, which must not trust a run's own metrics file. ``ground_truth_dir``
    holds the labels of a dataset whose test labels are hidden (``labelsTs/<subject>.nii.gz``).
    """
    scores_dir = Path(scores_dir)
    index = checked_index(scores_dir)
    items = load_subjects(dataset_dir).data
    _check_ground_truth_dir(ground_truth_dir, items)
    by_subject = {item["subject"]: item for item in items}
    val, _, _, val_volumes = _accumulate(index, scores_dir, by_subject, "validation", progress, ground_truth_dir)
    if not has_test(index):
        return validation_only_metrics(index, scores_dir, val, val_volumes, method), val, val_volumes
    test, s_scores, s_labels, volumes = _accumulate(index, scores_dir, by_subject, "test", progress, ground_truth_dir)
    threshold = val.best_dice()[1]
    summary = test.summary(threshold)
    intervals = test.bootstrap(("auroc", "auprc", "dice"), threshold=threshold, n_boot=n_boot, seed=seed)
    metrics = {
        "method": method or describe_method(index.get("settings", {})), "settings": index.get("settings", {}),
        "test": {
            "subjects": summary["subjects"], "brain_voxels": summary["voxels"], "tumour_voxels": summary["positives"],
            "auroc": summary["auroc"], "auprc": summary["auprc"],
            "dice": summary["dice"], "dice_threshold_from_validation": threshold,
            "dice_oracle": summary["best_dice"], "dice_oracle_threshold": summary["best_threshold"],
            "mean_subject_dice": summary["mean_subject_dice"],
            "per_subject_dice": test.per_subject_dice(threshold),
            "slice_auroc": _slice_auroc(s_scores, s_labels),
            "ci95": {k: list(v) for k, v in intervals.items()},
            "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "patient"},
            **_subject_level(volumes, threshold),
            "reconstruction": _reconstruction(index, scores_dir, "test"),
        },
        "validation": {"subjects": len(val), "best_dice": val.best_dice()[0], "threshold": threshold,
                       "reconstruction": _reconstruction(index, scores_dir, "validation")},
        "notes": "dice uses the threshold chosen on validation subjects; dice_oracle is the best Dice over "
                 "thresholds on test itself (an oracle, not an achievable number).",
    }
    return metrics, test, volumes


def has_test(index: dict) -> bool:
    return any(row.get("section") == "test" for row in index["subjects"].values())


def validation_only_metrics(index: dict, scores_dir: Path, val, volumes: dict, method: str) -> dict:
    """Metrics of a study run that scored validation subjects only (choosing a method must not look
    at test): pixel AUROC / AUPRC, the best Dice over thresholds (an oracle on validation, labelled
    so), subject-level figures and reconstruction quality. No ``test`` block is written."""
    dice, threshold = val.best_dice()
    summary = val.summary(threshold)
    return {
        "method": method or describe_method(index.get("settings", {})), "settings": index.get("settings", {}),
        "test": None,
        "validation": {"subjects": len(val), "auroc": summary["auroc"], "auprc": summary["auprc"],
                       "best_dice": dice, "threshold": threshold, "brain_voxels": summary["voxels"],
                       "tumour_voxels": summary["positives"], **_subject_level(volumes, threshold),
                       "reconstruction": _reconstruction(index, scores_dir, "validation")},
        "notes": "validation-only study run: best_dice is tuned on validation itself (an oracle); no test subject "
                 "was scored.",
    }


def _subject_level(volumes: dict, threshold: float) -> dict:
    """Per-patient figures pooled pixel AUROC hides: detection of tumour subjects, false alarms on healthy ones."""
    has_tumour = {name: bool(vol["tumour"].any()) for name, vol in volumes.items()}
    scores = {name: subject_score(vol["score"], vol["brain"]) for name, vol in volumes.items()}
    fp_ml = {name: false_positive_ml(vol["score"], vol["brain"], threshold, vol["affine"])
             for name, vol in volumes.items() if not has_tumour[name]}
    return {"subject_auroc": subject_detection_auroc(scores, has_tumour),
            "subject_score_percentile": SUBJECT_SCORE_PERCENTILE,
            "healthy_subjects": len(fp_ml), "tumour_subjects": len(volumes) - len(fp_ml),
            "false_positive_ml_healthy": float(np.mean(list(fp_ml.values()))) if fp_ml else None,
            "false_positive_ml_per_healthy_subject": fp_ml}


def _reconstruction(index: dict, scores_dir: Path, section: str) -> dict:
    """Pooled reconstruction quality of one section from the ``recon`` records of index.json."""
    records = [index["subjects"][name].get("recon") for name in _section_names(index, scores_dir, section)]
    return reconstruction_figures(records, source=scores_dir / "index.json")


def describe_method(settings: dict) -> str:
    """A readable method name from the scoring settings (used when none is given)."""
    if settings.get("sampler") == "flair":
        return "FLAIR-intensity baseline"
    noise = settings.get("noise", "")
    kind = "simplex" if "simplex" in noise else "gaussian" if "gaussian" in noise else "?"
    steps = f", k={settings.get('ddim_steps')}" if settings.get("sampler") == "ddim" else ""
    return f"diffusion ({kind} noise, {settings.get('sampler')} from t_L={settings.get('t_start')}{steps})"


def evaluate_scores(dataset_dir: str | os.PathLike, scores_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    method: str = "", n_boot: int = 1000, seed: int = 0, progress: bool = True,
                    ground_truth_dir: str | os.PathLike | None = None) -> dict:
    """Metrics of one scoring run; writes ``metrics.json``, ``per_subject.csv``, ``report.png``, masks.

    Everything lands in ``out_dir`` atomically (a failure leaves no partial results).
    ``ground_truth_dir``: the hidden test labels, for a dataset that has none of its own.
    """
    metrics, test, volumes = compute_metrics(dataset_dir, scores_dir, method, n_boot, seed, progress,
                                             ground_truth_dir)
    if metrics["test"] is None:  # validation-only study run: numbers only
        with atomic_dir(Path(out_dir)) as tmp:
            write_json(tmp / "metrics.json", metrics)
        return metrics
    threshold = metrics["test"]["dice_threshold_from_validation"]
    per_subject = metrics["test"]["per_subject_dice"]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        pd.DataFrame({"subject": list(per_subject), "dice": list(per_subject.values()),
                      "tumour_voxels": [int(volumes[s]["tumour"].sum()) for s in per_subject]}
                     ).to_csv(tmp / "per_subject.csv", index=False)
        _write_masks(tmp / "masks", volumes, threshold)
        write_report(tmp / "report.png", Path(scores_dir), read_index(scores_dir), volumes, test, threshold, metrics)
    return metrics


def _slice_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Slice-level AUROC, or None when all test slices share one label (it is undefined then)."""
    return auroc(scores, labels) if 0 < labels.sum() < labels.size else None


def _write_masks(folder: Path, volumes: dict, threshold: float) -> None:
    """Binary masks (``score > threshold``) in the original space, the affine of the input."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in volumes.items():
        mask = nib.Nifti1Image(((data["score"] > threshold) & data["brain"]).astype(np.uint8), data["affine"])
        with atomic_path(folder / f"{name}_mask.nii.gz", suffix=".nii.gz") as tmp:
            nib.save(mask, str(tmp))
