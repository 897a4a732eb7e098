"""Synthetic BraTS-like brain-tumour data in the exact MSD ``Task01_BrainTumour`` layout.

The subjects come from :mod:`pipeline.data.phantom`; this module writes them as a dataset (``dataset.json``,
``imagesTr``/``labelsTr``, the template's licence) in worker processes, optionally with a test split
whose labels are withheld for a public leaderboard. A subject depends only on ``(seed, index,
spacing, variety)``, so a dataset is byte-identical however its subjects are spread over worker processes.
Variety settings (:mod:`pipeline.data.variety`) apply to every subject, or per domain to a share of them.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.common import TASK, is_int, is_real, save_nifti
from pipeline.data.phantom import MODALITIES, make_subject, make_subject_with_record
from pipeline.data.variety import Domain, Variety
from pipeline.errors import InputError
from pipeline.layout import GROUND_TRUTH_LABELS, HIDDEN_TEST_KEY

GENERATOR = "pipeline.synth"
"""The generator's name as dataset.json records it. Data, not an import path: it kept its name when the module
moved to pipeline.data.synth, because published protocols are bound to their datasets' bytes."""
LABELS = ("background", "edema", "non-enhancing tumor", "enhancing tumour")

MNI_COPYRIGHT = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
    "Montreal Neurological Institute, McGill University"
)
MNI_NOTICE = (
    "The anatomy of these synthetic images is derived from the ICBM152 2009 nonlinear symmetric "
    "template (mni_icbm152_*_tal_nlin_sym_09a), as packaged with nilearn. The template may be used, "
    "copied, modified and distributed for any purpose without fee, on condition that the copyright "
    "notice above is kept with every copy. The authors and McGill University make no claim that it "
    "is suitable for any particular purpose and provide it as is, without any express or implied "
    "warranty; they accept no responsibility for loss or harm arising from its use or misuse."
)


def _write_subject(image_path: Path, label_path: Path, index: int, tumour: bool, seed: int, spacing: float,
                   variety: Variety | None = None) -> dict | None:
    """Worker job: generate one subject and write its image and label; with ``variety``, return what
    was drawn for it (without, nothing is recorded and the default generator runs as it always did)."""
    record = None
    if variety is None:
        image, label, affine = make_subject(index, tumour, seed, spacing)
    else:
        image, label, affine, record = make_subject_with_record(index, tumour, seed, spacing, variety)
    save_nifti(image_path, image, affine)
    save_nifti(label_path, label, affine)
    return record


def _run_jobs(jobs, workers: int, progress: bool) -> list:
    """Run the subject jobs, in worker processes unless one is enough; their records in job order."""
    with tqdm(total=len(jobs), desc="synthetic subjects", unit="subject", disable=not progress) as bar:
        if min(workers, len(jobs)) > 1:
            return _run_parallel(jobs, min(workers, len(jobs)), bar)
        records = []
        for job in jobs:
            records.append(_write_subject(*job))
            bar.update()
        return records


def _run_parallel(jobs, workers: int, bar) -> list:
    """Generate subjects in worker processes; on the first failure drop the jobs not yet started.
    Returns the subjects' records in job order."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_subject, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update()
        finally:
            for future in futures:
                future.cancel()
    return [future.result() for future in futures]


def _check_args(n_healthy, n_tumour, seed, spacing, workers, variety=None, domains=None) -> None:
    """Reject bad settings up front, before any work or any file is touched."""
    for name, value, low in (("n_healthy", n_healthy, 0), ("n_tumour", n_tumour, 0), ("seed", seed, 0),
                             ("workers", workers, 1)):
        if not is_int(value) or value < low:
            raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    if n_healthy + n_tumour < 1:
        raise InputError("n_healthy + n_tumour", "need at least one subject")
    if not is_real(spacing) or not 0.5 < spacing <= 8:
        raise InputError("spacing", f"must be in (0.5, 8] mm, got {spacing!r}")
    if variety is not None and not isinstance(variety, Variety):
        raise InputError("variety", f"must be a Variety (pipeline.data.variety), got {type(variety).__name__}")
    if domains is not None:
        if variety is not None:
            raise InputError("domains", "give either variety (every subject) or domains (a share each), not both")
        if not isinstance(domains, (list, tuple)) or not domains or not all(isinstance(d, Domain) for d in domains):
            raise InputError("domains", "must be a non-empty list of Domain (pipeline.data.variety)")
        if len({d.name for d in domains}) < len(domains):
            raise InputError("domains", f"names must be unique, got {[d.name for d in domains]}")


def _subject_varieties(tumour_flags: list[bool], variety, domains, seed: int) -> tuple[list | None, list]:
    """(domain name per subject or None, variety per subject)."""
    if domains is None:
        return None, [variety] * len(tumour_flags)
    assigned = _assign_domains(tumour_flags, domains, seed)
    return assigned, [{d.name: d.variety for d in domains}[a] for a in assigned]


def _assign_domains(tumour_flags: list[bool], domains, seed: int) -> list[str]:
    """Domain name per subject: in proportion to the shares (largest remainder, ties drawn), separately
    among healthy and among tumour subjects, so each domain gets its share of both. A stream of its
    own: health flags, anatomy and hidden test subjects stay as without domains."""
    rng = np.random.default_rng([seed, 2])
    shares = np.array([d.share for d in domains], float) / sum(d.share for d in domains)
    names = [""] * len(tumour_flags)
    for flag in (False, True):
        members = [i for i, t in enumerate(tumour_flags) if t == flag]
        quota = shares * len(members)
        counts = np.floor(quota).astype(int)
        order = np.lexsort((rng.random(len(domains)), counts - quota))  # largest remainder first, ties drawn
        counts[order[: len(members) - counts.sum()]] += 1
        drawn = rng.permutation(np.repeat(np.arange(len(domains)), counts))
        for i, d in zip(members, drawn):
            names[i] = domains[d].name
    return names


def _hidden_test_names(names: list[str], tumour_flags: list[bool], fraction: float, seed: int) -> list[str]:
    """Test subjects whose labels are withheld: ``fraction`` of the healthy and of the tumour subjects
    (at least one subject, at least two left for train and validation), drawn from the seed."""
    if not is_real(fraction) or not 0 < fraction < 1:
        raise InputError("test_fraction", f"must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: health flags and anatomy stay as without it
    picked = []
    for flag in (False, True):
        group = [n for n, t in zip(names, tumour_flags) if t == flag]
        picked += [group[i] for i in rng.permutation(len(group))[:round(fraction * len(group))]]
    if not picked:
        picked = [names[int(rng.integers(len(names)))]]
    if len(names) - len(picked) < 2:
        raise InputError("test_fraction", f"{len(picked)} hidden test subjects of {len(names)} leave fewer than 2 "
                                          "for train and validation")
    return sorted(picked)


def _tumour_flags(n_healthy: int, n_tumour: int, seed: int) -> list[bool]:
    """Health status per subject id, shuffled with the seed so ids do not reveal it."""
    return np.random.default_rng(seed).permutation([False] * n_healthy + [True] * n_tumour).tolist()


def _dataset_json(names, tumour_flags, seed, spacing, n_healthy, n_tumour) -> dict:
    """The MSD Task01 ``dataset.json``, plus a ``synthetic`` record of how it was generated."""
    return {
        "name": "BRATS",
        "description": "Synthetic BraTS-like gliomas (edema, non-enhancing and enhancing tumour) on brain MRI",
        "reference": f"{GENERATOR}: ICBM152 2009 template anatomy, Fisher-Kolmogorov tumour growth",
        "licence": "Derived from the MNI ICBM152 2009 template; keep LICENSE_MNI.txt with every copy",
        "release": "1.0 synthetic",
        "tensorImageSize": "4D",
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "labels": {str(i): name for i, name in enumerate(LABELS)},
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
        "synthetic": {
            "generator": GENERATOR,
            "seed": seed,
            "spacing": spacing,
            "n_healthy": n_healthy,
            "n_tumour": n_tumour,
            "healthy": [n.split(".")[0] for n, t in zip(names, tumour_flags) if not t],
            "template": "MNI ICBM152 2009 nonlinear symmetric, mni_icbm152_*_tal_nlin_sym_09a (nilearn)",
            "copyright": MNI_COPYRIGHT,
            "notice": MNI_NOTICE,
        },
    }


@dataclass(frozen=True)
class HiddenTest:
    """A public leaderboard's dataset: ``fraction`` of the subjects become unlabelled test images and
    their labels go to ``labels_dir`` (a folder outside the dataset, kept by the organiser)."""

    labels_dir: str | os.PathLike
    fraction: float = 0.2


def generate_dataset(out_root, n_healthy: int, n_tumour: int, seed: int = 0, spacing: float = 2.0,
                     workers: int = 2, progress: bool = True, hidden_test: HiddenTest | None = None,
                     variety: Variety | None = None, domains: list[Domain] | None = None) -> Path:
    """Write out_root/Task01_BrainTumour/ in the exact MSD Task01_BrainTumour layout; return that Task folder.

    With ``hidden_test`` the dataset is a public leaderboard's: ``hidden_test.fraction`` of the
    subjects are listed as ``test`` images (``imagesTs/``, no labels) and their labels go to
    ``hidden_test.labels_dir/labelsTs/``, with the generator record (seed included: whoever knows it
    can regenerate the labels) in ``hidden_test.labels_dir/synthetic.json``.

    ``variety`` applies to every subject; ``domains`` give each domain its share of the healthy and of
    the tumour subjects (``training`` entries name their ``domain``). Either way the ``synthetic`` record
    lists the settings and what was drawn per training subject. ``Variety()`` is the default dataset.
    """
    hidden_test_labels = None if hidden_test is None else hidden_test.labels_dir
    test_fraction = 0.2 if hidden_test is None else hidden_test.fraction
    _check_args(n_healthy, n_tumour, seed, spacing, workers, variety, domains)
    variety = None if variety == Variety() else variety
    n_healthy, n_tumour, seed, spacing = int(n_healthy), int(n_tumour), int(seed), float(spacing)
    total = n_healthy + n_tumour
    tumour_flags = _tumour_flags(n_healthy, n_tumour, seed)
    width = max(3, len(str(total)))
    names = [f"BRATS_{i:0{width}d}.nii.gz" for i in range(1, total + 1)]
    task_dir = Path(out_root) / TASK
    hidden = [] if hidden_test_labels is None else _hidden_test_names(names, tumour_flags, test_fraction, seed)
    if hidden_test_labels is not None and Path(hidden_test_labels).resolve().is_relative_to(task_dir.resolve()):
        raise InputError(hidden_test_labels, f"the hidden test labels must be outside the dataset folder {task_dir}")
    meta = _dataset_json(names, tumour_flags, seed, spacing, n_healthy, n_tumour)
    assigned, varieties = _subject_varieties(tumour_flags, variety, domains, seed)
    with atomic_dir(task_dir) as tmp, _ground_truth_folder(hidden_test_labels) as truth:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        jobs = [(tmp / "imagesTs" / n, truth / n, i, t, seed, spacing, v) if n in hidden else
                (tmp / "imagesTr" / n, tmp / "labelsTr" / n, i, t, seed, spacing, v)
                for i, (n, t, v) in enumerate(zip(names, tumour_flags, varieties), start=1)]
        records = _run_jobs(jobs, workers, progress)
        if variety is not None or domains is not None:
            _record_variety(meta, records, variety, domains, assigned)
        (tmp / "LICENSE_MNI.txt").write_text(f"{MNI_COPYRIGHT}\n\n{MNI_NOTICE}\n")
        if hidden:
            write_json(Path(hidden_test_labels) / "synthetic.json", meta["synthetic"])
            meta = _withhold_test(meta, hidden)
        write_json(tmp / "dataset.json", meta)
    return task_dir


def _record_variety(meta: dict, records: list, variety, domains, assigned) -> None:
    """Add the variety settings (or domains) and each subject's draws to ``meta``; training entries get
    their ``domain``. Hidden test subjects are dropped from both later, by :func:`_withhold_test`."""
    info = meta["synthetic"]
    if domains is None:
        info["variety"] = variety.to_dict()
    else:
        info["domains"] = [d.to_dict() for d in domains]
        for entry, name in zip(meta["training"], assigned):
            entry["domain"] = name
        records = [{"domain": name, **record} for name, record in zip(assigned, records)]
    info["subjects"] = {entry["image"].split("/")[-1].split(".")[0]: record
                        for entry, record in zip(meta["training"], records)}


@contextlib.contextmanager
def _ground_truth_folder(root):
    """A temporary folder that becomes ``root/labelsTs`` with the dataset (nothing if ``root`` is None).

    Only that one folder is replaced: ``root`` may hold other things."""
    if root is None:
        yield None
        return
    with atomic_dir(Path(root) / GROUND_TRUTH_LABELS) as tmp:
        yield tmp


def _withhold_test(meta: dict, hidden: list[str]) -> dict:
    """dataset.json of a hidden-label dataset: the ``hidden`` subjects listed as test images only, and
    nothing in the generator record that gives their labels away (their health, the seed)."""
    record = {k: v for k, v in meta["synthetic"].items() if k not in ("seed", "n_healthy", "n_tumour")}
    record["healthy"] = [h for h in record["healthy"] if f"{h}.nii.gz" not in hidden]
    if "subjects" in record:
        record["subjects"] = {k: v for k, v in record["subjects"].items() if f"{k}.nii.gz" not in hidden}
    record["hidden_test"] = "seed and test labels are kept by the organiser (ground-truth folder)"
    training = [e for e in meta["training"] if e["image"].split("/")[-1] not in hidden]
    return {**meta, "numTraining": len(training), "numTest": len(hidden), "training": training,
            "test": [f"./imagesTs/{n}" for n in hidden], HIDDEN_TEST_KEY: True, "synthetic": record}
