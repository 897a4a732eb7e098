"""Healthy-slice cache: the preprocessed 2D slices training reads, built once as ``.npy`` arrays.

Training never re-reads 3D NIfTI: :func:`build_slice_cache` runs the preprocessing once per
subject and keeps the slices it wants; :class:`SliceDataset` memory-maps them. The labelled cache
(every brain slice with a healthy / tumour label) serves the weakly supervised guided method.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.common import read_json
from pipeline.data.dataset import PreprocessConfig, dataset_fingerprint, load_subjects
from pipeline.data.transforms import CheckBrainMRId, CheckHeadersd, describe_failure, preprocess_transforms
from pipeline.errors import InputError

CACHE_SECTIONS = ("train", "validation")
HEALTHY_LABEL, TUMOUR_LABEL = 0, 1
"""Slice labels of the labelled cache (weak supervision for the guided method)."""
CACHE_FORMAT = 2
"""2: a cache certifies that the test subjects were read and checked too (1 checked train + validation only)."""


class _Subjects(Dataset):
    """A dataset over subject items (what the two per-subject passes below share)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)


class _Preprocessed(_Subjects):
    """Runs the transforms on one subject; returns an error line instead of raising.

    Errors travel back as values so that DataLoader workers do not wrap them in tracebacks and
    the user sees one line naming the file.
    """

    def __init__(self, items: list[dict], transform, min_brain_fraction: float, labelled: bool = False):
        super().__init__(items)
        self.transform, self.min_brain_fraction, self.labelled = transform, min_brain_fraction, labelled

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


class _Checked(_Subjects):
    """Reads one subject's files and runs the preprocessing's input checks; returns an error line or None."""

    def __getitem__(self, i):
        item = self.items[i]
        keys = ["image", "label"] if item.get("label") else ["image"]
        check = Compose([CheckHeadersd("image", "label" if item.get("label") else None),
                         LoadImaged(keys, reader="NibabelReader", image_only=True), EnsureChannelFirstd(keys),
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
    """Healthy 2D slices from the cache, memory-mapped: ``{"image": (C, H, W) float32}``.

    ``data``: the subject items (``subject``, ``image``, ``label``) the section was cut from, as a MONAI
    dataset's ``data`` (model-zoo's ``train#dataset#data``); given, every cached slice must come from one
    of them, so a cache of other subjects is refused rather than trained on.
    """

    def __init__(self, cache_dir: str | os.PathLike, section: str = "train", data: list[dict] | None = None):
        path = Path(cache_dir) / f"{section}_images.npy"
        if not path.is_file():
            raise InputError(path, "slice cache not found; build it with `pipeline prepare`")
        self.images = np.load(path, mmap_mode="r")
        self.index = read_json(Path(cache_dir) / f"{section}_index.json", "slice cache index")
        self.data = data
        if data is not None:
            _check_cached_subjects(self.index, data, path)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(np.array(self.images[i]))}


def _check_cached_subjects(index: list[dict], data: list[dict], source: Path) -> None:
    """Every cached slice belongs to a subject of ``data``."""
    stray = sorted({row["subject"] for row in index} - {item["subject"] for item in data})
    if stray:
        raise InputError(source, f"holds slices of {len(stray)} subject(s) not in the dataset's data "
                                 f"(first: {stray[0]}); rebuild the cache for this split")


class LabelledSliceDataset(SliceDataset):
    """Slices of the labelled cache: ``{"image": (C, H, W) float32, "label": int64 (0 healthy, 1 tumour)}``."""

    def __init__(self, cache_dir: str | os.PathLike, section: str = "train", data: list[dict] | None = None):
        super().__init__(cache_dir, section, data)
        path = Path(cache_dir) / f"{section}_labels.npy"
        if not path.is_file():
            raise InputError(path, "slice labels not found: this is not a labelled cache (prepare with labelled=True)")
        self.labels = np.load(path)

    def __getitem__(self, i):
        return {**super().__getitem__(i), "label": torch.tensor(int(self.labels[i]), dtype=torch.long)}
