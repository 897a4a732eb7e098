"""Preprocessing transforms: raw 4D MSD NIfTI -> checked, brain-cropped, intensity-scaled volumes.

MONAI dictionary transforms, so the same chain serves the slice cache, scoring and (inverted) the
maps put back into each input's space. The checks here fail fast with one line naming the file.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, LoadImaged, MapTransform,
                              Orientationd, Resized, ResizeWithPadOrCropd, Spacingd)

from pipeline.data.dataset import MSD_MODALITIES, PreprocessConfig
from pipeline.errors import InputError, find_input_error

MEDIAN_LEVEL = 0.5
"""Where the median scaling puts a channel's robust brain median (healthy tissue sits around it)."""
MEDIAN_CLIP = 4.0
"""Upper clip of median-scaled values, in units of the scaled median's level (outliers only)."""


# ----------------------------------------------------------------------------------------------
# checks on single files


MAX_VOXELS = 2**30
"""Most values (voxels times channels) a header may claim: 4 GiB as float32; an MSD Task01 image has 36 M."""
DEFLATE_MAX_RATIO = 1032
"""Deflate (gzip) cannot compress better than about 1032:1, so a .nii.gz of n bytes holds at most 1032 n."""
AFFINE_TOLERANCE_MM = 0.01
"""How far a label's voxel-to-world matrix may differ from its image's (and a map's, in evaluation)."""


def check_header(path: str | os.PathLike, what: str = "image", **load_options):
    """Open a NIfTI's header only and refuse, in one line, what reading it would fail on late or at great cost:
    a claimed size over :data:`MAX_VOXELS` or more than the file can hold, and a degenerate affine.
    Returns the (lazy) nibabel image, opened with ``load_options`` (``nib.load``'s keywords)."""
    path = Path(path)
    try:
        img = nib.load(str(path), **load_options)
    except Exception as err:  # nibabel raises several unrelated types for non-NIfTI input
        raise InputError(path, f"not a readable NIfTI {what} ({type(err).__name__}: {err})") from None
    shape = tuple(int(n) for n in img.shape)
    values = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if values > MAX_VOXELS:
        raise InputError(path, f"header claims a {what} of shape {shape} ({values:,} values), over the limit of {MAX_VOXELS:,}")
    data_bytes = values * img.get_data_dtype().itemsize
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        if size * DEFLATE_MAX_RATIO < data_bytes:
            raise InputError(path, f"header claims {data_bytes:,} bytes of voxel data (shape {shape}), more than a "
                                   f"{size:,}-byte gzip file can hold")
    elif size < int(img.dataobj.offset) + data_bytes:
        raise InputError(path, f"truncated: header claims {data_bytes:,} bytes of voxel data (shape {shape}), "
                               f"the file has {size:,} bytes")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, f"degenerate affine (zero, singular or non-finite voxel-to-world matrix) in the "
                               f"{what}'s header")
    return img


class CheckHeadersd(MapTransform):
    """Before any voxel is read: both headers sane (:func:`check_header`) and the label on its image's grid
    (same spatial shape, affines within :data:`AFFINE_TOLERANCE_MM`), so a shifted or mis-written label
    never trains or scores silently."""

    def __init__(self, image_key: str = "image", label_key: str | None = "label"):
        super().__init__([k for k in (image_key, label_key) if k])
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data):
        image = check_header(data[self.image_key], "image")
        if self.label_key and data.get(self.label_key):
            label = check_header(data[self.label_key], "label")
            if tuple(label.shape[:3]) != tuple(image.shape[:3]):
                raise InputError(data[self.label_key], f"label shape {tuple(label.shape)} does not match image shape "
                                                       f"{tuple(image.shape[:3])} of {data[self.image_key]}")
            worst = float(np.abs(np.asarray(label.affine) - np.asarray(image.affine)).max())
            if worst > AFFINE_TOLERANCE_MM:
                raise InputError(data[self.label_key], f"label affine differs from that of {data[self.image_key]} "
                                                       f"by up to {worst:.3g} (shifted, flipped or resampled label)")
        return dict(data)


def check_nifti(path: str | os.PathLike, ndim: int, channels: int | None = None) -> None:
    """Read one NIfTI fully and raise a one-line :class:`InputError` for whatever is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist")
    img = check_header(path, "file")
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
        CheckHeadersd("image", "label" if with_label else None),
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
