"""Data stage: MSD Task01 folder -> checked subjects -> patient-level split -> healthy-slice cache.

Real MSD Task01_BrainTumour and the synthetic default share this one loading path
(``monai.apps.DecathlonDataset`` + MONAI dictionary transforms). This module opens and checks the
dataset and wires the stage together; the split rules live in :mod:`pipeline.data.split`, the
transforms in :mod:`pipeline.data.transforms` and the slice cache in :mod:`pipeline.data.slice_cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from monai.apps import DecathlonDataset

from pipeline.common import TASK, confined_path, read_json
from pipeline.data.split import RANDOM, STRATIFIED, domain_split, load_or_make_split, make_split
from pipeline.errors import InputError
from pipeline.layout import HIDDEN_TEST_KEY

MSD_MODALITIES = ("FLAIR", "T1w", "T1gd", "T2w")
INTENSITY_SCALINGS = ("median", "percentile")
# keys DecathlonDataset reads from dataset.json, plus the subject list
DATASET_JSON_KEYS = ("name", "description", "reference", "licence", "tensorImageSize", "modality", "labels",
                     "numTraining", "numTest", "training")


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides what a preprocessed slice looks like (hashed into the cache key).

    ``fov_mm`` is the square in-plane field of view kept around the brain before resizing to
    ``image_size`` pixels; depth keeps every axial slice at ``pixdim[2]``. ``intensity`` picks the
    scaling: ``median`` (lesion-robust, :class:`pipeline.data.transforms.ScaleBrainMediand`, the default) or ``percentile``
    (the first release's 1st-99th percentile to [0, 1], kept so old protocols reproduce).
    """

    modalities: tuple[str, ...] = ("FLAIR",)
    image_size: int = 64
    pixdim: tuple[float, float, float] = (2.0, 2.0, 2.0)
    fov_mm: float = 200.0
    intensity: str = "median"
    percentiles: tuple[float, float] = (1.0, 99.0)
    min_brain_fraction: float = 0.15

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(normalise_modalities(self.modalities)))
        pixdim = self.pixdim
        if isinstance(pixdim, (int, float)) and not isinstance(pixdim, bool):
            pixdim = (pixdim,) * 3  # one number: that many mm in every axis
        try:
            object.__setattr__(self, "pixdim", tuple(float(p) for p in pixdim))
        except (TypeError, ValueError):
            raise InputError("pixdim", f"needs one or three positive voxel sizes in mm, got {self.pixdim!r}") from None
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if int(self.image_size) < 8:
            raise InputError("image_size", f"must be at least 8 pixels, got {self.image_size}")
        if len(self.pixdim) != 3 or min(self.pixdim) <= 0:
            raise InputError("pixdim", f"needs one or three positive voxel sizes in mm, got {self.pixdim}")
        if self.intensity not in INTENSITY_SCALINGS:
            raise InputError("intensity", f"unknown scaling {self.intensity!r}; choose one of {', '.join(INTENSITY_SCALINGS)}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError("percentiles", f"need 0 <= lower < upper <= 100, got {self.percentiles}")
        if not 0 <= self.min_brain_fraction < 1:
            raise InputError("min_brain_fraction", f"must be in [0, 1), got {self.min_brain_fraction}")

    @property
    def channels(self) -> int:
        return len(self.modalities)

    @property
    def channel_indices(self) -> list[int]:
        return [MSD_MODALITIES.index(m) for m in self.modalities]

    @property
    def crop_voxels(self) -> tuple[int, int]:
        return (round(self.fov_mm / self.pixdim[0]), round(self.fov_mm / self.pixdim[1]))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def normalise_modalities(modalities: Sequence[str] | str) -> list[str]:
    """Accept 'FLAIR', 'flair,t2w' or a list; return canonical MSD names in the given order."""
    if isinstance(modalities, str):
        modalities = [m for m in modalities.replace(" ", "").split(",") if m]
    lookup = {m.lower(): m for m in MSD_MODALITIES}
    out = []
    for m in modalities:
        if str(m).lower() not in lookup:
            raise InputError("modalities", f"unknown modality {m!r}; choose from {', '.join(MSD_MODALITIES)}")
        out.append(lookup[str(m).lower()])
    if not out or len(set(out)) != len(out):
        raise InputError("modalities", f"need one or more distinct modalities, got {list(modalities)}")
    return out


# ----------------------------------------------------------------------------------------------
# dataset folder and subjects


def task_paths(dataset_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Return (root_dir, task_dir) whether the user named the root or the Task01 folder itself."""
    path = Path(dataset_dir).expanduser()
    if path.name == TASK:
        return path.parent, path
    return path, path / TASK


def read_dataset_json(task_dir: Path) -> dict:
    """Load and check the keys of MSD ``dataset.json`` the pipeline relies on."""
    path = task_dir / "dataset.json"
    meta = read_json(path, "dataset.json", hint=f"expected the MSD {TASK} layout")
    if not isinstance(meta, dict):
        raise InputError(path, "top level must be a JSON object")
    missing = [key for key in DATASET_JSON_KEYS if key not in meta]
    if missing:
        raise InputError(path, f"missing key(s) {', '.join(missing)} (MSD dataset.json needs {', '.join(DATASET_JSON_KEYS)})")
    training = meta["training"]
    if not isinstance(training, list) or not training:
        raise InputError(path, "'training' must be a non-empty list")
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(entry.get("label"), str):
            raise InputError(path, f"every 'training' entry needs 'image' and 'label' paths, got {entry!r}")
        for key in ("image", "label"):
            check_listed_path(task_dir, entry[key], f"training[{i}].{key}")
    for i, image in enumerate(listed_test_images(meta, path)):
        check_listed_path(task_dir, image, f"test[{i}]")
    if not isinstance(meta["modality"], dict) or len(meta["modality"]) != len(MSD_MODALITIES):
        raise InputError(path, f"'modality' must list {len(MSD_MODALITIES)} channels, got {meta['modality']!r}")
    return meta


def listed_test_images(meta: dict, source: Path) -> list[str]:
    """The image paths of dataset.json's ``test`` list (MSD: plain paths; MONAI also takes ``{"image": ...}``).

    With ``"hiddenTestLabels": true`` the list must be non-empty and carry no labels: those images
    are the test split and their labels live with the organiser (:data:`HIDDEN_TEST_KEY`)."""
    entries = meta.get("test") or []
    hidden = meta.get(HIDDEN_TEST_KEY, False)
    if not isinstance(entries, list) or not isinstance(hidden, bool):
        raise InputError(source, f"'test' must be a list and {HIDDEN_TEST_KEY!r} true or false")
    if hidden and not entries:
        raise InputError(source, f"{HIDDEN_TEST_KEY!r} is true but the 'test' list is empty")
    images = []
    for i, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str) or (hidden and isinstance(entry, dict) and set(entry) != {"image"}):
            raise InputError(source, f"test[{i}] must be an image path (its label stays outside the dataset), "
                                     f"got {entry!r}")
        images.append(image)
    return images


def check_listed_path(task_dir: Path, listed: str, entry: str) -> Path:
    """A path from dataset.json, refused unless it stays inside the dataset folder.

    Absolute paths, ``..`` and symlinks whose target lies outside would let a dataset.json make the
    pipeline read (and report on) any file on the machine, e.g. ``/etc/passwd`` as a test image."""
    return confined_path(task_dir, listed, task_dir / "dataset.json", entry, "dataset folder")


def subject_id(path: str | os.PathLike) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def load_subjects(dataset_dir: str | os.PathLike, transform=None, download: bool = False) -> DecathlonDataset:
    """Open the folder with ``monai.apps.DecathlonDataset`` (all subjects, no internal split).

    ``download=True`` fetches real MSD Task01 (about 7 GB) for users with internet access.
    Each item gets a ``subject`` key (file stem); items are sorted by subject for stable order.
    A dataset with hidden test labels (:data:`HIDDEN_TEST_KEY`) adds its test images as items
    without a ``label``.
    """
    root, task_dir = task_paths(dataset_dir)
    if not download:
        if not task_dir.is_dir():
            raise InputError(task_dir, "dataset folder not found (run `pipeline synth` or pass download=True)")
        meta = read_dataset_json(task_dir)
    else:
        root.mkdir(parents=True, exist_ok=True)
    try:
        ds = DecathlonDataset(
            root_dir=str(root), task=TASK, section="training", transform=transform or (lambda x: x),
            download=download, val_frac=0.0, cache_rate=0.0, progress=False, seed=0,
        )
    except (KeyError, ValueError, json.JSONDecodeError) as err:
        raise InputError(task_dir / "dataset.json", f"cannot be read by DecathlonDataset ({err})") from None
    if download:
        meta = read_dataset_json(task_dir)
    ds.data.extend(hidden_test_items(meta, task_dir))
    for item in ds.data:
        item["subject"] = subject_id(item["image"])
        for key in ("image", "label"):
            if key in item and not Path(item[key]).is_file():
                raise InputError(item[key], f"listed in dataset.json as {key} but the file does not exist")
    ds.data.sort(key=lambda item: item["subject"])
    ids = [item["subject"] for item in ds.data]
    if len(set(ids)) != len(ids):
        raise InputError(task_dir / "dataset.json", "subject file names are not unique")
    return ds


def hidden_test_items(meta: dict, task_dir: Path) -> list[dict]:
    """Items (image only) of the ``test`` list when dataset.json marks it as the hidden-label test split."""
    if not meta.get(HIDDEN_TEST_KEY):
        return []
    return [{"image": str(task_dir / image)} for image in listed_test_images(meta, task_dir / "dataset.json")]


def has_hidden_label(item: dict) -> bool:
    """A test subject of a hidden-label dataset: its label is not in the dataset."""
    return not item.get("label")


def dataset_fingerprint(dataset_dir: str | os.PathLike) -> str:
    """Hash of dataset.json and of the *contents* of every file it lists (training images and labels,
    test images): an edited label changes it even at the same size (:mod:`pipeline.fingerprint`
    caches per-file hashes, so a re-check is cheap). A listed file that is missing hashes as such."""
    from pipeline.fingerprint import sha256_files

    _, task_dir = task_paths(dataset_dir)
    meta = read_dataset_json(task_dir)
    listed = [(e[key], task_dir / e[key]) for e in meta["training"] for key in ("image", "label")]
    listed += [(e if isinstance(e, str) else e.get("image", ""), task_dir / (e if isinstance(e, str) else e.get("image", "")))
               for e in meta.get("test") or [] if isinstance(e, (str, dict))]
    hashes = sha256_files(path for _, path in listed)
    digest = hashlib.sha256(hashlib.sha256((task_dir / "dataset.json").read_bytes()).digest())
    for name, path in sorted(listed):
        digest.update(f"{name}:{hashes.get(str(path.resolve()), 'missing')};".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# the dataset's split


def dataset_split(dataset_dir: str | os.PathLike, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                  train_domains: Sequence[str] | None = None, method: str = RANDOM) -> dict:
    """The split a dataset gets from a seed: its listed test subjects, if hidden-label, stay the test section.

    ``train_domains`` makes it a shift split (:func:`pipeline.data.split.domain_split`): only subjects whose
    dataset.json entry names one of these domains train; validation and test come from the others.
    ``method``: ``random`` or ``stratified`` (:mod:`pipeline.data.split`).
    """
    items = load_subjects(dataset_dir).data
    if train_domains:
        if any(has_hidden_label(item) for item in items):
            raise InputError("split.train_domains", "a hidden-label dataset fixes its own test section; "
                                                    "a domain split cannot be combined with it")
        return domain_split({item["subject"]: item.get("domain") for item in items}, train_domains, fractions, seed)
    subjects, test = split_subjects(items)
    return make_split(subjects, fractions, seed, test, method, tumour_subjects(items) if method == STRATIFIED else None)


def tumour_subjects(items: Sequence[dict]) -> set[str]:
    """Subjects whose label has a tumour voxel (what evaluation counts as a tumour subject); hidden-label
    test items have no label and are left out. Reads every label once: only a new stratified split needs it."""
    import nibabel as nib
    import numpy as np

    return {item["subject"] for item in items
            if not has_hidden_label(item) and np.asanyarray(nib.load(item["label"]).dataobj).any()}


def split_subjects(items: Sequence[dict]) -> tuple[list[str], list[str] | None]:
    """(subjects to split, fixed test subjects or None): hidden-label test items are the fixed test."""
    test = [item["subject"] for item in items if has_hidden_label(item)]
    return [item["subject"] for item in items if not has_hidden_label(item)], test or None


def dataset_split_file(dataset_dir: str | os.PathLike, split_file: str | os.PathLike, split_seed: int = 0,
                       fractions: Sequence[float] = (0.6, 0.2, 0.2), split_method: str = RANDOM) -> dict:
    """The split of ``split_file`` (made from the seed with ``split_method`` and written if absent),
    preprocessing nothing.

    What scoring needs: the same patients training saw, without building the training slice cache.
    """
    items = load_subjects(dataset_dir).data
    subjects, test = split_subjects(items)
    return load_or_make_split(split_file, subjects, fractions, split_seed, test, split_method,
                              lambda: tumour_subjects(items))
