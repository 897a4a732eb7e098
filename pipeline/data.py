"""Data stage: MSD Task01 folder -> checked subjects -> patient-level split -> healthy-slice cache.

Real MSD Task01_BrainTumour and the synthetic default share this one loading path
(``monai.apps.DecathlonDataset`` + MONAI dictionary transforms). The slice cache is built
once as memory-mapped ``.npy`` arrays so that training never re-reads 3D NIfTI.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from filelock import FileLock
from monai.apps import DecathlonDataset
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    Resized,
    Spacingd,
)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .atomic import atomic_dir, write_json
from .errors import InputError, find_input_error
from .layout import HIDDEN_TEST_KEY

TASK = "Task01_BrainTumour"
MSD_MODALITIES = ("FLAIR", "T1w", "T1gd", "T2w")
SECTIONS = ("train", "validation", "test")
CACHE_SECTIONS = ("train", "validation")
HEALTHY_LABEL, TUMOUR_LABEL = 0, 1
"""Slice labels of the labelled cache (weak supervision for the guided method)."""
CACHE_FORMAT = 2
"""2: a cache certifies that the test subjects were read and checked too (1 checked train + validation only)."""
INTENSITY_SCALINGS = ("median", "percentile")
MEDIAN_LEVEL = 0.5
"""Where the median scaling puts a channel's robust brain median (healthy tissue sits around it)."""
MEDIAN_CLIP = 4.0
"""Upper clip of median-scaled values, in units of the scaled median's level (outliers only)."""
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
    scaling: ``median`` (lesion-robust, :class:`ScaleBrainMediand`, the default) or ``percentile``
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
        object.__setattr__(self, "pixdim", tuple(float(p) for p in self.pixdim))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if int(self.image_size) < 8:
            raise InputError("image_size", f"must be at least 8 pixels, got {self.image_size}")
        if len(self.pixdim) != 3 or min(self.pixdim) <= 0:
            raise InputError("pixdim", f"needs three positive voxel sizes in mm, got {self.pixdim}")
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
    if not path.is_file():
        raise InputError(path, "dataset.json not found (expected the MSD Task01_BrainTumour layout)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"malformed JSON ({err})") from None
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
    source = task_dir / "dataset.json"
    relative = Path(listed)
    if relative.is_absolute():
        raise InputError(source, f"{entry} {listed!r} is an absolute path; paths must be relative to the "
                                 "dataset folder")
    if ".." in relative.parts:
        raise InputError(source, f"{entry} {listed!r} contains '..'; paths must stay inside the dataset folder")
    resolved = (task_dir / relative).resolve()
    if not resolved.is_relative_to(task_dir.resolve()):
        raise InputError(source, f"{entry} {listed!r} leaves the dataset folder through a symlink (-> {resolved})")
    return resolved


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
    from .fingerprint import sha256_files

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
# checks on single files


def check_nifti(path: str | os.PathLike, ndim: int, channels: int | None = None) -> None:
    """Read one NIfTI fully and raise a one-line :class:`InputError` for whatever is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for non-NIfTI input
        raise InputError(path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    if len(img.shape) != ndim:
        raise InputError(path, f"expected a {ndim}D image, got shape {img.shape}")
    if channels is not None and img.shape[-1] != channels:
        raise InputError(path, f"expected {channels} channels (FLAIR, T1w, T1gd, T2w), got {img.shape[-1]}")
    try:
        data = np.asarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as err:
        raise InputError(path, f"truncated or corrupt NIfTI data ({err})") from None
    if not np.isfinite(data).all():
        raise InputError(path, "contains NaN or Inf voxels")


def _filename(tensor) -> str:
    meta = getattr(tensor, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<unknown file>"))


class CheckBrainMRId(MapTransform):
    """Fail fast, naming the file, on inputs that would silently poison training or scores."""

    def __init__(self, image_key: str = "image", label_key: str | None = "label", channels: int = len(MSD_MODALITIES)):
        super().__init__([k for k in (image_key, label_key) if k])
        self.image_key, self.label_key, self.channels = image_key, label_key, channels

    def __call__(self, data):
        d = dict(data)
        image = d[self.image_key]
        name = _filename(image)
        if image.ndim != 4 or image.shape[0] != self.channels:
            raise InputError(name, f"expected {self.channels} channels (FLAIR, T1w, T1gd, T2w), got image shape {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise InputError(name, "contains NaN or Inf voxels")
        if not (image != 0).any():
            raise InputError(name, "image is all zero (no brain voxels)")
        if self.label_key and self.label_key in d:
            label = d[self.label_key]
            lname = _filename(label)
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise InputError(lname, f"label shape {tuple(label.shape[1:])} does not match image shape {tuple(image.shape[1:])} of {name}")
            if label.shape[0] != 1:
                raise InputError(lname, f"label must have one channel, got shape {tuple(label.shape)}")
            values = torch.unique(label)
            if not torch.isfinite(values).all() or ((values < 0) | (values > 3) | (values != values.round())).any():
                raise InputError(lname, f"labels must be integers 0-3, found {values.tolist()[:8]}")
        return d


class SelectChannelsd(MapTransform):
    """Keep the configured modalities, in order (MSD channel order is FLAIR, T1w, T1gd, T2w)."""

    def __init__(self, keys: KeysCollection, indices: Sequence[int]):
        super().__init__(keys)
        self.indices = list(indices)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][self.indices]
        return d


class BrainAndTumourMasksd(MapTransform):
    """Add ``brain`` (any channel non-zero) and ``tumour`` (label > 0) masks as float channels.

    They travel through the same spatial transforms as the image, so masks and image stay aligned
    and slices can be judged healthy on the exact grid that is cached.
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label"):
        super().__init__([image_key])
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        d = dict(data)
        image = d[self.image_key]
        d["brain"] = (image != 0).any(dim=0, keepdim=True).to(image.dtype)
        if self.label_key and self.label_key in d:
            d["tumour"] = (d[self.label_key] > 0).to(image.dtype)
        return d


def _brain_values(channel: torch.Tensor, brain: torch.Tensor, max_values: int = 2_000_000) -> torch.Tensor:
    """Brain voxel values of one channel, evenly subsampled to at most ``max_values`` (quantiles are O(n log n))."""
    values = channel[brain].float()
    return values[:: max(1, values.numel() // max_values)]


def _lower_median(values: np.ndarray) -> np.floating:
    """The lower of the two middle values, as ``torch.median`` defines it, by O(n) selection."""
    k = (values.size - 1) // 2
    return np.partition(values, k)[k]


def robust_brain_median(values: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """Median of brain intensities, re-taken within one (normal-scaled) MAD of itself a few times.

    A plain brain median moves when a tumour (2-10 % of the brain, bright on FLAIR and T2, dark on
    T1) is added; restricting to the central mass of the histogram removes the lesion tail from
    the estimate. Measured on 8 synthetic pairs of the same brain with and without a tumour (2 mm,
    same healthy voxels compared): scaled healthy tissue agrees within 1.5 % on FLAIR and T2w,
    2.1 % on T1gd and 3.1 % on T1w (the tumour replaces bright T1 white matter); 1st-99th
    percentile scaling darkens healthy FLAIR by 20-40 %.

    NumPy selection (``np.partition``) rather than ``torch.median``: the same values, 3.2x faster
    on 2 CPU cores (7.6 vs 24.6 ms for 210k values, quiet machine); it stops once the centre no
    longer moves, which changes nothing since each step depends on the centre only.
    """
    v = values.detach().cpu().numpy().astype(np.float32, copy=False)
    centre = _lower_median(v)
    for _ in range(int(iterations)):
        deviation = np.abs(v - centre)
        mad = np.float32(1.4826) * _lower_median(deviation)
        if mad <= 0:
            break
        moved = _lower_median(v[deviation < mad])
        if moved == centre:
            break
        centre = moved
    return torch.tensor(centre, dtype=torch.float32)


class _ScaleBrainChannelsd(MapTransform):
    """Scale each channel from statistics of its brain voxels; background stays 0."""

    def __init__(self, keys: KeysCollection, brain_key: str = "brain"):
        super().__init__(keys)
        self.brain_key = brain_key

    def scale(self, channel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data):
        d = dict(data)
        brain = d[self.brain_key][0] > 0.5
        for key in self.key_iterator(d):
            image = d[key]
            out = torch.zeros_like(image)
            for c in range(image.shape[0]):
                values = _brain_values(image[c], brain)
                if values.numel():
                    out[c] = torch.where(brain, self.scale(image[c], values), torch.zeros_like(image[c]))
            d[key] = out
        return d


class ScaleBrainMediand(_ScaleBrainChannelsd):
    """Divide each channel by its robust brain median so healthy tissue lands near ``level`` (0.5).

    Lesion-robust: the anchor is the bulk of healthy tissue, not an upper percentile that a
    hyperintense tumour owns, so healthy tissue gets the same values whether or not the subject
    has a tumour, and the bright end (where tumours live) is kept up to ``clip`` x ``level``.
    Independent of intensity units (scanner, bias-corrected or not); background stays 0.
    """

    def __init__(self, keys: KeysCollection, brain_key: str = "brain", level: float = MEDIAN_LEVEL,
                 clip: float = MEDIAN_CLIP):
        super().__init__(keys, brain_key)
        self.level, self.clip = level, clip

    def scale(self, channel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        anchor = robust_brain_median(values)
        return (channel * (self.level / torch.clamp(anchor, min=1e-6))).clamp(0, self.clip * self.level)


class ScaleBrainPercentilesd(_ScaleBrainChannelsd):
    """Map each channel's [p_lower, p_upper] over brain voxels to [0, 1]; background stays 0.

    The first release's scaling, kept for old protocols. Not lesion-robust: in a tumour subject the
    upper percentile lies inside the hyperintense tumour, which darkens that subject's healthy tissue.
    """

    def __init__(self, keys: KeysCollection, brain_key: str = "brain", lower: float = 1.0, upper: float = 99.0):
        super().__init__(keys, brain_key)
        self.lower, self.upper = lower, upper

    def scale(self, channel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.quantile(values, torch.tensor([self.lower, self.upper]) / 100)
        return ((channel - lo) / torch.clamp(hi - lo, min=1e-6)).clamp(0, 1)


def intensity_transform(cfg: "PreprocessConfig") -> MapTransform:
    """The configured intensity scaling of the image (brain voxels only)."""
    if cfg.intensity == "percentile":
        return ScaleBrainPercentilesd("image", "brain", *cfg.percentiles)
    return ScaleBrainMediand("image", "brain")


class BinariseMasksd(MapTransform):
    """After interpolation: brain if at least half covered; tumour if touched at all (conservative)."""

    def __call__(self, data):
        d = dict(data)
        if "brain" in d:
            d["brain"] = (d["brain"] > 0.5).to(torch.uint8)
        if "tumour" in d:
            d["tumour"] = (d["tumour"] > 0).to(torch.uint8)
        return d


def _is_brain(x):
    return x > 0.5


def preprocess_transforms(cfg: PreprocessConfig, with_label: bool = True) -> Compose:
    """MONAI dictionary transforms from the raw 4D NIfTI to (C, H, W, D) slices-ready volumes.

    Every spatial step is invertible, so score maps can be put back into the input's space.
    """
    keys = ["image", "label"] if with_label else ["image"]
    spatial = keys + ["brain"] + (["tumour"] if with_label else [])
    modes = {"image": "bilinear", "label": "nearest", "brain": "bilinear", "tumour": "bilinear"}
    resize_modes = {"image": "bilinear", "label": "nearest", "brain": "bilinear", "tumour": "area"}
    size = int(cfg.image_size)
    return Compose([
        LoadImaged(keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys),
        CheckBrainMRId("image", "label" if with_label else None),
        BrainAndTumourMasksd("image", "label" if with_label else None),
        SelectChannelsd("image", cfg.channel_indices),
        Orientationd(spatial, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(spatial, pixdim=cfg.pixdim, mode=[modes[k] for k in spatial]),
        CropForegroundd(spatial, source_key="brain", select_fn=_is_brain, allow_smaller=True),
        ResizeWithPadOrCropd(spatial, spatial_size=(*cfg.crop_voxels, -1)),
        intensity_transform(cfg),
        Resized(spatial, spatial_size=(size, size, -1), mode=[resize_modes[k] for k in spatial],
                anti_aliasing=[k == "image" for k in spatial]),
        BinariseMasksd(spatial),
        EnsureTyped(spatial, track_meta=True),
    ])


# ----------------------------------------------------------------------------------------------
# patient-level split


def make_split(subjects: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
               test: Sequence[str] | None = None) -> dict:
    """Seeded patient-level split: each subject lands in exactly one of train/validation/test.

    ``test`` fixes the test section (a dataset's listed test images, whose labels are hidden);
    ``subjects`` (the other ones) then go to train and validation in the ratio of their fractions.
    """
    subjects = sorted(subjects)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError("split fractions", f"need three non-negative fractions summing to 1, got {list(fractions)}")
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


def dataset_split(dataset_dir: str | os.PathLike, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> dict:
    """The split a dataset gets from a seed: its listed test subjects, if hidden-label, stay the test section."""
    subjects, test = split_subjects(load_subjects(dataset_dir).data)
    return make_split(subjects, fractions, seed, test)


def split_subjects(items: Sequence[dict]) -> tuple[list[str], list[str] | None]:
    """(subjects to split, fixed test subjects or None): hidden-label test items are the fixed test."""
    test = [item["subject"] for item in items if has_hidden_label(item)]
    return [item["subject"] for item in items if not has_hidden_label(item)], test or None


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
                       test: Sequence[str] | None = None) -> tuple[dict, bool]:
    """(split, made now): the split file's if present (checked), else a new one that is not written yet.

    With ``test`` (listed hidden-label test subjects), a reused file must have exactly them as test.
    """
    path = Path(path)
    if not path.is_file():
        return make_split(subjects, fractions, seed, test), True
    try:
        split = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"malformed split JSON ({err})") from None
    check_split(split, [*subjects, *(test or [])], path)
    if test is not None and sorted(split["test"]) != sorted(test):
        raise InputError(path, f"test section differs from the {len(test)} test images listed in dataset.json "
                               "(with hidden test labels the test split is fixed)")
    return split, False


def load_or_make_split(path: str | os.PathLike, subjects: Sequence[str], fractions=(0.6, 0.2, 0.2), seed: int = 0,
                       test: Sequence[str] | None = None) -> dict:
    """Reuse the split file if present (so every stage sees the same patients); else write it."""
    split, made = read_or_make_split(path, subjects, fractions, seed, test)
    if made:
        write_json(path, split)
    return split


def dataset_split_file(dataset_dir: str | os.PathLike, split_file: str | os.PathLike, split_seed: int = 0,
                       fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> dict:
    """The split of ``split_file`` (made from the seed and written if absent), preprocessing nothing.

    What scoring needs: the same patients training saw, without building the training slice cache.
    """
    subjects, test = split_subjects(load_subjects(dataset_dir).data)
    return load_or_make_split(split_file, subjects, fractions, split_seed, test)


# ----------------------------------------------------------------------------------------------
# preprocessing + healthy-slice cache


class _Preprocessed(Dataset):
    """Runs the transforms on one subject; returns an error line instead of raising.

    Errors travel back as values so that DataLoader workers do not wrap them in tracebacks and
    the user sees one line naming the file.
    """

    def __init__(self, items: list[dict], transform, min_brain_fraction: float, labelled: bool = False):
        self.items, self.transform, self.min_brain_fraction = items, transform, min_brain_fraction
        self.labelled = labelled

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            out = self.transform(dict(item))
        except Exception as err:  # noqa: BLE001 - converted to InputError below
            return {"subject": item["subject"], "error": describe_failure(item, err)}
        if self.labelled:  # tumour slices too, each with its slice label
            z, labels = labelled_slice_indices(out["brain"], out["tumour"], self.min_brain_fraction)
        else:
            z = healthy_slice_indices(out["brain"], out["tumour"], self.min_brain_fraction)
            labels = [HEALTHY_LABEL] * len(z)
        image = out["image"].as_tensor() if hasattr(out["image"], "as_tensor") else out["image"]
        slices = image[..., z].permute(3, 0, 1, 2).contiguous().numpy().astype(np.float32)
        return {"subject": item["subject"], "slices": slices, "z": np.asarray(z, dtype=np.int32),
                "labels": np.asarray(labels, dtype=np.int64), "depth": int(image.shape[-1])}


def describe_failure(item: dict, err: Exception) -> str:
    """Turn any failure on one subject into 'file: problem', re-reading files only on this path."""
    found = find_input_error(err)
    if found is None:
        try:
            check_nifti(item["image"], ndim=4, channels=len(MSD_MODALITIES))
            if item.get("label"):
                check_nifti(item["label"], ndim=3)
        except InputError as bad:
            found = bad
    if found is None:
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        found = InputError(item["image"], f"preprocessing failed ({type(root).__name__}: {root})")
    return str(found)


def healthy_slice_indices(brain: torch.Tensor, tumour: torch.Tensor, min_brain_fraction: float) -> list[int]:
    """Axial slices with no tumour voxel and at least ``min_brain_fraction`` of the slice in brain."""
    brain_fraction = brain[0].float().mean(dim=(0, 1))
    has_tumour = tumour[0].flatten(0, 1).any(dim=0)
    keep = (brain_fraction >= min_brain_fraction) & ~has_tumour
    return torch.nonzero(keep).flatten().tolist()


def _identity_collate(batch):
    return batch[0]


def cache_key(cfg: PreprocessConfig, split: dict, fingerprint: str) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "preprocess": cfg.to_dict(), "fingerprint": fingerprint,
                       "train": split["train"], "validation": split["validation"], "test": split["test"]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_slice_cache(
    dataset_dir: str | os.PathLike,
    cache_root: str | os.PathLike,
    split: dict,
    cfg: PreprocessConfig = PreprocessConfig(),
    workers: int = 2,
    progress: bool = True,
    labelled: bool = False,
) -> Path:
    """Check the test subjects' files, preprocess train + validation subjects once; keep their healthy
    slices as .npy arrays (``labelled``: every brain slice, with a slice label from that subject's own
    ground truth, for the weakly supervised guided method; folder ``labelled-<key>`` beside the other).

    Returns the cache folder. A folder for the same data, split and settings is reused as is;
    the folder appears only once complete, so an interrupted build leaves nothing behind.
    """
    ds = load_subjects(dataset_dir)
    key = cache_key(cfg, split, dataset_fingerprint(dataset_dir))
    out = Path(cache_root) / (f"labelled-{key}" if labelled else key)
    if (out / "cache.json").is_file():
        return out
    by_subject = {item["subject"]: item for item in ds.data}
    transform = preprocess_transforms(cfg, with_label=True)
    with atomic_dir(out) as tmp:
        check_subjects([by_subject[s] for s in split["test"]], workers, progress)
        summary = {"format": CACHE_FORMAT, "preprocess": cfg.to_dict(), "key": out.name, "sections": {},
                   "checked_test_subjects": len(split["test"]), **({"labelled": True} if labelled else {})}
        for section in CACHE_SECTIONS:
            items = [by_subject[s] for s in split[section]]
            summary["sections"][section] = _cache_section(tmp, section, items, transform, cfg, workers, progress,
                                                          labelled)
        if summary["sections"]["train"]["slices"] == 0:
            kind = "brain" if labelled else "healthy"
            raise InputError("split", f"no {kind} slices in the {len(split['train'])} training subjects "
                                      f"(min_brain_fraction={cfg.min_brain_fraction}); nothing to train on")
        write_json(tmp / "cache.json", summary)
    return out


def _cache_section(folder: Path, section: str, items: list[dict], transform, cfg: PreprocessConfig,
                   workers: int, progress: bool, labelled: bool = False) -> dict:
    loader = DataLoader(_Preprocessed(items, transform, cfg.min_brain_fraction, labelled), batch_size=1,
                        num_workers=min(workers, len(items)) if workers > 1 else 0,
                        collate_fn=_identity_collate)
    chunks, labels, index = [], [], []
    desc = f"preprocess {section}" + (" (labelled)" if labelled else "")
    for result in tqdm(loader, desc=desc, unit="subject", disable=not progress):
        if "error" in result:
            raise InputError(None, result["error"])
        chunks.append(result["slices"])
        labels.append(result["labels"])
        index.extend({"subject": result["subject"], "z": int(z), "depth": result["depth"],
                      **({"label": int(y)} if labelled else {})} for z, y in zip(result["z"], result["labels"]))
    size = int(cfg.image_size)
    slices = np.concatenate(chunks) if chunks else np.zeros((0, cfg.channels, size, size), np.float32)
    np.save(folder / f"{section}_images.npy", slices)
    write_json(folder / f"{section}_index.json", index)
    summary = {"subjects": len(items), "slices": int(len(slices))}
    if labelled:
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        np.save(folder / f"{section}_labels.npy", all_labels)
        summary["tumour_slices"] = int(all_labels.sum())
    return summary


# ----------------------------------------------------------------------------------------------
# labelled-slice cache (weakly supervised guided counterfactuals: healthy and tumour slices)



def labelled_slice_indices(brain: torch.Tensor, tumour: torch.Tensor, min_brain_fraction: float) -> tuple[list[int], list[int]]:
    """(slices with at least ``min_brain_fraction`` brain, their labels: 1 if any tumour voxel, else 0)."""
    brain_fraction = brain[0].float().mean(dim=(0, 1))
    has_tumour = tumour[0].flatten(0, 1).any(dim=0)
    keep = torch.nonzero(brain_fraction >= min_brain_fraction).flatten()
    return keep.tolist(), has_tumour[keep].long().tolist()


def build_labelled_slice_cache(dataset_dir: str | os.PathLike, cache_root: str | os.PathLike, split: dict,
                               cfg: PreprocessConfig = PreprocessConfig(), workers: int = 2,
                               progress: bool = True) -> Path:
    """The labelled-slice cache: :func:`build_slice_cache` with ``labelled=True``."""
    return build_slice_cache(dataset_dir, cache_root, split, cfg, workers, progress, labelled=True)


class _Checked(Dataset):
    """Reads one subject's files and runs the preprocessing's input checks; returns an error line or None."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        keys = ["image", "label"] if item.get("label") else ["image"]
        check = Compose([LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys),
                         CheckBrainMRId("image", "label" if item.get("label") else None)])
        try:
            check(dict(item))
        except Exception as err:  # noqa: BLE001 - converted to one line naming the file
            return describe_failure(item, err)
        return None


def check_subjects(items: list[dict], workers: int = 2, progress: bool = True) -> None:
    """Read every file of ``items`` in full and check it as preprocessing would (test subjects are
    never preprocessed at prepare time, yet a bad one must stop ``pipeline prepare``, not scoring)."""
    if not items:
        return
    loader = DataLoader(_Checked(items), batch_size=1, num_workers=min(workers, len(items)) if workers > 1 else 0,
                        collate_fn=_identity_collate)
    for error in tqdm(loader, desc="check test subjects", unit="subject", disable=not progress):
        if error:
            raise InputError(None, error)


class SliceDataset(Dataset):
    """Healthy 2D slices from the cache, memory-mapped: ``{"image": (C, H, W) float32}``."""

    def __init__(self, cache_dir: str | os.PathLike, section: str = "train"):
        path = Path(cache_dir) / f"{section}_images.npy"
        if not path.is_file():
            raise InputError(path, "slice cache not found; build it with `pipeline prepare`")
        self.images = np.load(path, mmap_mode="r")
        self.index = json.loads((Path(cache_dir) / f"{section}_index.json").read_text())

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(np.array(self.images[i]))}


class LabelledSliceDataset(SliceDataset):
    """Slices of the labelled cache: ``{"image": (C, H, W) float32, "label": int64 (0 healthy, 1 tumour)}``."""

    def __init__(self, cache_dir: str | os.PathLike, section: str = "train"):
        super().__init__(cache_dir, section)
        path = Path(cache_dir) / f"{section}_labels.npy"
        if not path.is_file():
            raise InputError(path, "slice labels not found: this is not a labelled cache (prepare with labelled=True)")
        self.labels = np.load(path)

    def __getitem__(self, i):
        return {**super().__getitem__(i), "label": torch.tensor(int(self.labels[i]), dtype=torch.long)}


@dataclass
class PreparedData:
    """What ``prepare_data`` hands to training: the split and the cache folder."""

    split: dict
    cache_dir: Path
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


def prepare_data(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    cache_root: str | os.PathLike,
    preprocess: PreprocessConfig = PreprocessConfig(),
    split_seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    workers: int = 2,
    progress: bool = True,
    labelled: bool = False,
) -> PreparedData:
    """Split (reused if the file exists) and build (or reuse) the healthy-slice cache (``labelled``:
    the labelled-slice cache of :func:`build_labelled_slice_cache` instead).

    A file lock makes concurrent callers (the ranks of a multi-process run, parallel benchmark
    entries) build once and share the result. A failure leaves nothing behind: a new split file is
    written only after the cache is complete, and the lock file and folders this call created are
    removed (the lock file while still held, folders only when empty, so nothing that existed before
    or that another preparer wrote is touched).
    """
    subjects, test = split_subjects(load_subjects(dataset_dir).data)
    cache_root = Path(cache_root)
    created = _make_folders(cache_root)
    lock_path = cache_root / ".prepare.lock"
    made_lock = not lock_path.exists()
    try:
        with FileLock(str(lock_path)):
            try:
                split, made = read_or_make_split(split_file, subjects, fractions, split_seed, test)
                build = build_labelled_slice_cache if labelled else build_slice_cache
                cache_dir = build(dataset_dir, cache_root, split, preprocess, workers, progress)
                if made:
                    write_json(split_file, split)
            except BaseException:
                if made_lock:
                    lock_path.unlink(missing_ok=True)
                raise
    except BaseException:
        _remove_empty_folders(created)
        raise
    return PreparedData(split=split, cache_dir=cache_dir, preprocess=preprocess)


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty_folders(created: list[Path]) -> None:
    """Remove folders we created, innermost first, stopping at the first one that is not empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return
