"""Between the input's space and the slice grid, and what the score stage writes.

* A subject is preprocessed into (C, H, W, D) volumes and cut into axial slices; maps are built on
  that grid (:mod:`pipeline.scoring.score`), stacked back into a volume and put into the original image
  space by inverting the preprocessing (``monai.transforms.Invertd``), then saved as NIfTI with the
  input's header and affine, plus a few preprocessed-grid slices for the report.
* ``index.json`` lists every subject's files, timing and reconstruction figures with the settings
  that made them; sharded runs write one folder per rank, merged here into the single-process layout.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from pipeline.atomic import atomic_dir, atomic_path, write_json
from pipeline.common import read_json, save_nifti
from pipeline.data.transforms import describe_failure
from pipeline.errors import InputError

INDEX_FORMAT = 2
REPORT_SLICES = 4


@dataclass
class SubjectScore:
    """One subject's result: the map in the original image space plus the preprocessed-grid arrays.

    ``grid`` holds (C or 1, H, W, D) arrays: image, recon (mean over draws), map, brain, and,
    when the subject has a label, label (0-3) and tumour (whole tumour, binary). ``recon_stats``
    holds the threshold-free reconstruction figures (sums, so they pool over subjects).
    """

    subject: str
    source: str
    score: np.ndarray
    affine: np.ndarray
    grid: dict
    seconds: float
    recon_stats: dict = field(default_factory=dict)


def preprocess_subject(item: dict, transform) -> dict:
    """Run the preprocessing; any failure becomes one line naming the file."""
    try:
        return transform(dict(item))
    except Exception as err:  # noqa: BLE001 - converted to InputError naming the file
        raise InputError(None, describe_failure(item, err)) from None


def axial_slices(volume: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(C, H, W, D) volume -> (len(z), C, H, W) axial slices."""
    return torch.as_tensor(volume)[..., z].permute(3, 0, 1, 2).float()


def to_volume(chunks: list[torch.Tensor], z: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Batches of (B, C, H, W) slices at depths ``z`` -> (C, H, W, D) volume, zero elsewhere."""
    volume = torch.zeros(shape, dtype=torch.float32)
    if chunks:
        volume[..., z] = torch.cat(chunks).permute(1, 2, 3, 0)
    return volume


def invert_to_original(grid_volume: torch.Tensor, image: MetaTensor, transform) -> MetaTensor:
    """Undo the preprocessing's spatial steps on a (1, H, W, D) volume, using the image's trace.

    Resizing and resampling are inverted with linear interpolation (the map is continuous).
    The non-spatial custom transforms record nothing, so only the spatial steps are replayed.
    """
    invert = Invertd(keys="score", transform=transform, orig_keys="image", nearest_interp=False)
    return invert({"image": image, "score": MetaTensor(grid_volume)})["score"]


# ----------------------------------------------------------------------------------------------
# one subject's files


def report_slices(grid: dict, n: int = REPORT_SLICES) -> list[int]:
    """Axial slices worth showing: the most tumour, or the most brain when there is no tumour."""
    area = grid["tumour"][0].sum(axis=(0, 1)) if "tumour" in grid else np.zeros(grid["brain"].shape[-1])
    if not area.any():
        area = grid["brain"][0].sum(axis=(0, 1))
    return sorted(int(i) for i in np.argsort(-area.astype(np.int64), kind="stable")[:n])


def save_subject(result: SubjectScore, out_dir: str | os.PathLike, threshold: float | None = None) -> dict:
    """Write ``<subject>_score.nii.gz`` (float32), optionally ``<subject>_mask.nii.gz`` (uint8,
    score > threshold, as the metrics count a prediction), and ``<subject>_slices.npz`` (a few preprocessed-grid slices for the report).

    The NIfTI files reuse the input's header and affine, so they overlay it in any viewer.
    Returns the file names written.
    """
    out_dir = Path(out_dir)
    reference = nib.load(result.source)
    if not np.allclose(reference.affine, result.affine, atol=1e-4) or reference.shape[:3] != result.score.shape:
        raise RuntimeError(f"inverted map of {result.subject} does not match its image grid "
                           f"({result.score.shape} vs {reference.shape[:3]})")
    files = {"score": f"{result.subject}_score.nii.gz"}
    save_nifti(out_dir / files["score"], result.score.astype(np.float32), reference, "anomaly score")
    if threshold is not None:
        files["mask"] = f"{result.subject}_mask.nii.gz"
        save_nifti(out_dir / files["mask"], (result.score > threshold).astype(np.uint8), reference,
                    f"anomaly mask, score > {threshold:g}")
    files["slices"] = f"{result.subject}_slices.npz"
    z = report_slices(result.grid)
    with atomic_path(out_dir / files["slices"], suffix=".npz") as tmp:
        np.savez_compressed(tmp, z=np.asarray(z), **{k: v[..., z] for k, v in result.grid.items()})
    return files


# ----------------------------------------------------------------------------------------------
# the index


def write_index(folder: Path, settings: dict, subjects: dict) -> None:
    """``folder/index.json``: the settings that made the maps and one row per subject."""
    write_json(folder / "index.json", {"format": INDEX_FORMAT, "settings": settings, "subjects": subjects})


def merge_shards(parts: Sequence[Path], out_dir: Path, order: Sequence[str]) -> Path:
    """Merge the ranks' score folders into ``out_dir`` (atomically): files moved, one index in the
    single-process subject order, the parts removed."""
    indexes = [read_index(part) for part in parts]
    subjects = {name: row for index in indexes for name, row in index["subjects"].items()}
    with atomic_dir(out_dir) as tmp:
        for part in parts:
            for path in sorted(part.rglob("*")):
                if path.is_file() and path.name != "index.json":
                    target = tmp / path.relative_to(part)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
        write_json(tmp / "index.json", {**indexes[0], "subjects": {name: subjects[name] for name in order}})
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return out_dir


def read_index(scores_dir: str | os.PathLike) -> dict:
    """The ``index.json`` a :func:`pipeline.scoring.score.score_split` run wrote (what the metrics stage reads)."""
    return read_json(Path(scores_dir) / "index.json", "scores index", hint="run the inference workflow first")
