"""Evaluate stage: saved anomaly maps + ground truth -> metrics.json, per-subject CSV, PNG report.

The protocol (docs/design.md, "Evaluation protocol"): brain voxels of the original image space,
whole tumour (label > 0) as positives; the Dice threshold is chosen on validation subjects and
applied to test subjects (the honest number); the best Dice over thresholds on test is reported
too, labelled as the oracle. Binary masks at the chosen threshold are written beside the maps.
Beside the pixel numbers: subject-level detection AUROC, false-positive volume (ml) on healthy test
subjects at the validation threshold, per-lesion figures at that threshold (detection rate by lesion
size, false-positive lesions per subject: :mod:`pipeline.evaluation.lesions`), and reconstruction
quality pooled from the ``recon`` records the score stage leaves in index.json (None for an index
written before it did).

Memory. 484 BraTS subjects at 1 mm do not fit as volumes, so subjects are read one at a time:
validation first (it fixes the threshold), then test. What stays of a subject is its brain voxels
in a :class:`~pipeline.evaluation.pooled.ScoreAccumulator` (5 B/voxel) and a :class:`SubjectSummary`;
per-volume outputs (masks here, the leaderboard's maps hash) and test lesion counts are made
while the subject is in memory. Peak: one subject's volumes plus the pooled brain voxels of one
section (benchmarks/bench_evaluate.py); validation also keeps a 1-bit brain mask per subject, to
count lesions once its threshold is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.common import BASELINE, check_schema, confined_path, save_nifti
from pipeline.data.dataset import has_hidden_label, load_subjects
from pipeline.data.transforms import AFFINE_TOLERANCE_MM, check_header  # a map sits on its image's grid too
from pipeline.errors import InputError
from pipeline.evaluation.lesions import LesionCounter, csv_columns
from pipeline.evaluation.metrics import auroc
from pipeline.evaluation.pooled import ScoreAccumulator
from pipeline.evaluation.report import example_from_volume, write_report
from pipeline.evaluation.subject_metrics import (SUBJECT_SCORE_PERCENTILE, reconstruction_figures, slice_labels,
                                                 slice_scores, subject_detection_auroc, subject_score, voxel_volume_ml)
from pipeline.layout import HIDDEN_TEST_KEY, ground_truth_label
from pipeline.scoring.maps import read_index


def _read(path: Path, what: str, read: Callable[[nib.Nifti1Image], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``read(image)`` and the affine of a NIfTI file; a missing or broken file names itself."""
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    # a claimed size the file cannot hold, a degenerate affine: refused before any voxel is read
    img = check_header(path, what, keep_file_open=True)  # one pass through a .gz read in parts
    try:
        return read(img), img.affine
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raise InputError(path, f"cannot read {what} ({type(err).__name__}: {err})") from None


def _voxels(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


def _brain(img: nib.Nifti1Image) -> np.ndarray:
    """Brain = any channel non-zero, read one channel at a time (a 4D image is 4 volumes' worth)."""
    if len(img.shape) != 4:
        return np.asarray(img.dataobj) != 0
    brain = np.zeros(img.shape[:3], dtype=bool)
    for c in range(img.shape[3]):
        brain |= np.asarray(img.dataobj[..., c]) != 0
    return brain




def load_subject_maps(item: dict, score_path: Path) -> dict:
    """Map, whole-tumour label and brain mask of one subject, all on the original grid.

    The map must have the image's shape and affine (a shifted or flipped map is refused, not
    silently compared voxel by voxel) and must not be the label file itself (a hard link). The
    brain mask comes from the image, not from the scores folder: on a leaderboard that folder is
    the participant's, and a mask from there could choose which voxels count.
    """
    if not item.get("label"):
        raise InputError(item["image"], "subject has no label; evaluation needs ground truth")
    if score_path.is_file() and Path(item["label"]).is_file() and score_path.samefile(item["label"]):
        raise InputError(score_path, f"map is the label file {item['label']} itself")
    score, affine = _read(score_path, "anomaly map", _voxels)
    label, _ = _read(Path(item["label"]), "label", _voxels)
    brain, image_affine = _read(Path(item["image"]), "image", _brain)
    if score.shape != label.shape:
        raise InputError(score_path, f"map shape {score.shape} does not match label shape {label.shape} "
                                     f"of {item['label']}")
    if brain.shape != score.shape:
        raise InputError(score_path, f"map shape {score.shape} does not match image shape {brain.shape} "
                                     f"of {item['image']}")
    if not np.allclose(affine, image_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(affine - image_affine).max())
        raise InputError(score_path, f"map affine differs from that of {item['image']} by up to {worst:.3g} "
                                     "(shifted, flipped or resampled map)")
    if not np.isfinite(score).all():
        raise InputError(score_path, "map contains NaN or Inf")
    return {"score": np.asarray(score, dtype=np.float32), "tumour": label > 0, "brain": brain, "affine": affine}


def checked_index(scores_dir: Path) -> dict:
    """``index.json`` with every subject entry checked: a known section and a map path that is
    relative, has no ``..`` and resolves (symlinks followed) inside the scores folder."""
    index_path = scores_dir / "index.json"
    index = read_index(scores_dir)
    check_schema(index, "scores_index", index_path)  # every malformed entry at once
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
    return confined_path(scores_dir, rel, index_path, f"subject {name!r}: map path", "scores folder")


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


@dataclass(frozen=True)
class SubjectSummary:
    """What evaluation keeps of one subject once its volumes are released."""

    tumour_voxels: int  # label > 0 anywhere in the volume
    score: float  # subject score: the SUBJECT_SCORE_PERCENTILE of the in-brain map
    voxel_ml: float  # volume of one voxel, for false-positive ml


@dataclass(frozen=True)
class Evaluation:
    """What :func:`compute_metrics` returns: the numbers and the small state behind them."""

    metrics: dict
    voxels: ScoreAccumulator  # brain voxels of the test subjects (of validation in a validation-only run)
    subjects: dict[str, SubjectSummary]  # the same subjects, by name in sorted order


SubjectVisitor = Callable[[str, dict, float], None]
"""Called as ``visit(name, volumes, threshold)`` with each test subject's :func:`load_subject_maps`
result while it is in memory (the only time it is): the place for per-volume outputs."""


@dataclass(frozen=True)
class _Sources:
    """Where a run's maps and the ground truth are read from."""

    index: dict
    scores_dir: Path
    by_subject: dict
    ground_truth_dir: str | os.PathLike | None
    progress: bool


@dataclass
class _Section:
    """One section's evaluation state: pooled brain voxels, per-subject summaries, slice scores, lesions."""

    lesions: LesionCounter = field(default_factory=LesionCounter)
    voxels: ScoreAccumulator = field(default_factory=ScoreAccumulator)
    subjects: dict[str, SubjectSummary] = field(default_factory=dict)
    slice_scores: list[np.ndarray] = field(default_factory=list)
    slice_labels: list[np.ndarray] = field(default_factory=list)

    def add(self, name: str, data: dict, with_slices: bool) -> None:
        """Keep the brain voxels and a few numbers of one subject; the volumes can then go."""
        self.voxels.add(name, data["score"][data["brain"]], data["tumour"][data["brain"]])
        self.subjects[name] = SubjectSummary(tumour_voxels=int(data["tumour"].sum()),
                                             score=subject_score(data["score"], data["brain"]),
                                             voxel_ml=voxel_volume_ml(data["affine"]))
        self.lesions.add(name, data, self.subjects[name].voxel_ml)
        if with_slices:
            self.slice_scores.append(slice_scores(data["score"], data["brain"]))
            self.slice_labels.append(slice_labels(data["tumour"]))


def _stream(src: _Sources, section: str, visit: Callable[[str, dict], None] | None = None,
            threshold: float | None = None) -> _Section:
    """Read one section a subject at a time: peak memory is one subject's volumes plus the pooled voxels.
    With ``threshold`` (test) lesions are counted as each subject is read."""
    out = _Section(LesionCounter(threshold))
    names = _section_names(src.index, src.scores_dir, section)
    for name in tqdm(names, desc=f"evaluate {section}", unit="subject", disable=not src.progress):
        if name not in src.by_subject:
            raise InputError(src.scores_dir / "index.json", f"subject {name} is not in the dataset")
        data = load_subject_maps(with_ground_truth(src.by_subject[name], src.ground_truth_dir),
                                 src.index["subjects"][name]["map_path"])
        out.add(name, data, with_slices=section == "test")
        if visit is not None:
            visit(name, data)
        del data  # so the next subject is read without this one still in memory
    return out


def _sources(dataset_dir, scores_dir, ground_truth_dir, progress: bool) -> _Sources:
    """The checked index and dataset of a run (no volume is read yet)."""
    scores_dir = Path(scores_dir)
    index = checked_index(scores_dir)
    items = load_subjects(dataset_dir).data
    _check_ground_truth_dir(ground_truth_dir, items)
    return _Sources(index, scores_dir, {item["subject"]: item for item in items}, ground_truth_dir, progress)


def compute_metrics(dataset_dir: str | os.PathLike, scores_dir: str | os.PathLike, method: str = "",
                    n_boot: int = 1000, seed: int = 0, progress: bool = True,
                    ground_truth_dir: str | os.PathLike | None = None,
                    on_test_subject: SubjectVisitor | None = None) -> Evaluation:
    """Recompute every number from the saved maps and the ground truth (nothing self-reported).

    Used by the evaluate workflow and by the leaderboard, which must not trust a run's own metrics
    file. Validation subjects are read first (they fix the Dice threshold), then test subjects one
    at a time; ``on_test_subject`` sees each test subject's volumes with that threshold.
    ``ground_truth_dir`` holds the labels of a dataset whose test labels are hidden
    (``labelsTs/<subject>.nii.gz``).
    """
    src = _sources(dataset_dir, scores_dir, ground_truth_dir, progress)
    name = method or describe_method(src.index.get("settings", {}))
    val = _stream(src, "validation")
    if not has_test(src.index):
        return Evaluation(_validation_only_metrics(src, val, name), val.voxels, val.subjects)
    best, threshold = val.voxels.best_dice()
    validation = {"subjects": len(val.voxels), "best_dice": best, "threshold": threshold,
                  "lesions": val.lesions.pooled(threshold, val.voxels, _healthy(val)),
                  "reconstruction": _reconstruction(src.index, src.scores_dir, "validation")}
    del val  # validation voxels are done with: test streams alone
    visit = None if on_test_subject is None else (lambda subject, data: on_test_subject(subject, data, threshold))
    test = _stream(src, "test", visit, threshold)
    metrics = {
        "method": name, "settings": src.index.get("settings", {}),
        "test": _test_metrics(src, test, threshold, n_boot, seed), "validation": validation,
        "notes": "dice uses the threshold chosen on validation subjects; dice_oracle is the best Dice over "
                 "thresholds on test itself (an oracle, not an achievable number).",
    }
    return Evaluation(metrics, test.voxels, test.subjects)


def _test_metrics(src: _Sources, test: _Section, threshold: float, n_boot: int, seed: int) -> dict:
    """The ``test`` block of metrics.json: pooled, per-subject, slice- and subject-level figures."""
    summary = test.voxels.summary(threshold)
    intervals = test.voxels.bootstrap(("auroc", "auprc", "dice"), threshold=threshold, n_boot=n_boot, seed=seed)
    return {
        "subjects": summary["subjects"], "brain_voxels": summary["voxels"], "tumour_voxels": summary["positives"],
        "auroc": summary["auroc"], "auprc": summary["auprc"],
        "dice": summary["dice"], "dice_threshold_from_validation": threshold,
        "dice_oracle": summary["best_dice"], "dice_oracle_threshold": summary["best_threshold"],
        "mean_subject_dice": summary["mean_subject_dice"],
        "per_subject_dice": test.voxels.per_subject_dice(threshold),
        "slice_auroc": _slice_auroc(np.concatenate(test.slice_scores), np.concatenate(test.slice_labels)),
        "ci95": {k: list(v) for k, v in intervals.items()},
        "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "patient"},
        **_subject_level(test, threshold),
        "reconstruction": _reconstruction(src.index, src.scores_dir, "test"),
    }


def has_test(index: dict) -> bool:
    return any(row.get("section") == "test" for row in index["subjects"].values())


def _validation_only_metrics(src: _Sources, val: _Section, method: str) -> dict:
    """Metrics of a study run that scored validation subjects only (choosing a method must not look
    at test): pixel AUROC / AUPRC, the best Dice over thresholds (an oracle on validation, labelled
    so), subject-level figures and reconstruction quality. No ``test`` block is written."""
    dice, threshold = val.voxels.best_dice()
    summary = val.voxels.summary(threshold)
    return {
        "method": method, "settings": src.index.get("settings", {}),
        "test": None,
        "validation": {"subjects": len(val.voxels), "auroc": summary["auroc"], "auprc": summary["auprc"],
                       "best_dice": dice, "threshold": threshold, "brain_voxels": summary["voxels"],
                       "tumour_voxels": summary["positives"], **_subject_level(val, threshold),
                       "reconstruction": _reconstruction(src.index, src.scores_dir, "validation")},
        "notes": "validation-only study run: best_dice is tuned on validation itself (an oracle); no test subject "
                 "was scored.",
    }


def _healthy(section: _Section) -> list[str]:
    return [name for name, s in section.subjects.items() if s.tumour_voxels == 0]


def _subject_level(section: _Section, threshold: float) -> dict:
    """Per-patient figures pooled pixel AUROC hides: detection of tumour subjects, false alarms on healthy
    ones, and per lesion: detection by size, false-positive lesions."""
    has_tumour = {name: s.tumour_voxels > 0 for name, s in section.subjects.items()}
    flagged = section.voxels.flagged_voxels(threshold)
    fp_ml = {name: flagged[name] * section.subjects[name].voxel_ml for name in _healthy(section)}
    return {"subject_auroc": subject_detection_auroc({n: s.score for n, s in section.subjects.items()}, has_tumour),
            "subject_score_percentile": SUBJECT_SCORE_PERCENTILE,
            "healthy_subjects": len(fp_ml), "tumour_subjects": len(section.subjects) - len(fp_ml),
            "false_positive_ml_healthy": float(np.mean(list(fp_ml.values()))) if fp_ml else None,
            "false_positive_ml_per_healthy_subject": fp_ml,
            "lesions": section.lesions.pooled(threshold, section.voxels, list(fp_ml))}


def _reconstruction(index: dict, scores_dir: Path, section: str) -> dict:
    """Pooled reconstruction quality of one section from the ``recon`` records of index.json."""
    records = [index["subjects"][name].get("recon") for name in _section_names(index, scores_dir, section)]
    return reconstruction_figures(records, source=scores_dir / "index.json")


def describe_method(settings: dict) -> str:
    """A readable method name from the scoring settings (used when none is given)."""
    if settings.get("sampler") == BASELINE:
        return "FLAIR-intensity baseline"
    noise = settings.get("noise", "")
    kind = "simplex" if "simplex" in noise else "gaussian" if "gaussian" in noise else "?"
    steps = f", k={settings.get('ddim_steps')}" if settings.get("sampler") == "ddim" else ""
    return f"diffusion ({kind} noise, {settings.get('sampler')} from t_L={settings.get('t_start')}{steps})"


def evaluate_scores(dataset_dir: str | os.PathLike, scores_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    method: str = "", n_boot: int = 1000, seed: int = 0, progress: bool = True,
                    ground_truth_dir: str | os.PathLike | None = None) -> dict:
    """Metrics of one scoring run; writes ``metrics.json``, ``per_subject.csv``, ``report.png``, masks.

    Everything lands in ``out_dir`` atomically (a failure leaves no partial results); the masks
    are written while each test subject is in memory. ``ground_truth_dir``: the hidden test
    labels, for a dataset that has none of its own.
    """
    examples: dict[str, dict] = {}  # one slice per test subject, for a run that saved none of its own

    def on_test_subject(name: str, data: dict, threshold: float) -> None:
        write_mask(tmp / "masks", name, data, threshold)
        examples[name] = example_from_volume(name, data)

    with atomic_dir(Path(out_dir)) as tmp:
        result = compute_metrics(dataset_dir, scores_dir, method, n_boot, seed, progress, ground_truth_dir,
                                 on_test_subject=on_test_subject)
        write_json(tmp / "metrics.json", result.metrics)
        if result.metrics["test"] is not None:  # a validation-only study run gets numbers only
            _write_tables(tmp, result, Path(scores_dir), examples)
    return result.metrics


def _write_tables(folder: Path, result: Evaluation, scores_dir: Path, examples: dict[str, dict]) -> None:
    """``per_subject.csv`` and ``report.png`` of a run with test subjects."""
    test = result.metrics["test"]
    tumour_voxels = {name: s.tumour_voxels for name, s in result.subjects.items()}
    lesions = test["lesions"]["per_subject"]
    pd.DataFrame([{"subject": s, "dice": dice, "tumour_voxels": tumour_voxels[s], **csv_columns(lesions[s])}
                  for s, dice in test["per_subject_dice"].items()]).to_csv(folder / "per_subject.csv", index=False)
    write_report(folder / "report.png", scores_dir, read_index(scores_dir), tumour_voxels, result.voxels,
                 test["dice_threshold_from_validation"], result.metrics, examples)


def _slice_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Slice-level AUROC, or None when all test slices share one label (it is undefined then)."""
    return auroc(scores, labels) if 0 < labels.sum() < labels.size else None


def write_mask(folder: Path, name: str, data: dict, threshold: float) -> None:
    """Binary mask (``score > threshold`` in the brain) in the original space, with the map's affine."""
    save_nifti(folder / f"{name}_mask.nii.gz", ((data["score"] > threshold) & data["brain"]).astype(np.uint8),
               data["affine"])
