"""The scanner side of a synthetic subject: voxel grid, orientation, field of view, intensity scale.

Real BraTS-style data comes from many scanners and protocols: thick axial slices, LPS or other
storage orders, a field of view that cuts the vertex, raw intensities in any unit, int16 files.
:func:`acquire` applies what :class:`pipeline.data.variety.Variety` asks for to a finished subject
(image, label, affine on the generator's isotropic RAS canvas); every step is skipped at its default,
so the default generator's bytes stay as they are. The background stays exactly zero throughout,
as in skull-stripped BraTS images (the pipeline's brain mask is "any channel non-zero").
Also home to the separable resampling helpers the phantom uses.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from scipy import sparse

from pipeline.data.variety import Variety, between

BIAS = 0.12  # peak deviation of the multiplicative bias field
CROP_MARGIN_MM = (2.0, 10.0)  # tight crop: brain bounding box plus this much, drawn per side
ACQUISITION_DRAWS = 14  # fixed: gain, int16, voxel x 3, orientation, cut depth, cut side, margins x 6


def lerp_matrix(positions: np.ndarray, n: int) -> np.ndarray:
    """Matrix whose rows linearly interpolate ``n`` samples at fractional ``positions`` (clamped)."""
    x = np.clip(positions, 0, n - 1)
    left = np.minimum(np.floor(x).astype(int), n - 2)
    weight = (x - left).astype(np.float32)
    rows = np.arange(len(x))
    out = np.zeros((len(x), n), np.float32)
    out[rows, left] = 1 - weight
    out[rows, left + 1] = weight
    return out


def separable(coeffs: np.ndarray, matrices) -> np.ndarray:
    """Expand a coarse (..., a, b, c) tensor with one matrix per spatial axis: a cheap smooth zoom."""
    mx, my, mz = matrices
    return np.einsum("...abc,xa,yb,zc->...xyz", coeffs, mx, my, mz, optimize=True)


def block_mean(volume: np.ndarray, k: int) -> np.ndarray:
    """Average ``k``^3 blocks (zero-padded at the far edges)."""
    if k == 1:
        return volume
    pad = [(0, -n % k) for n in volume.shape]
    v = np.pad(volume, pad)
    x, y, z = (n // k for n in v.shape)
    return v.reshape(x, k, y, k, z, k).mean(axis=(1, 3, 5))


def bias_field(rng, channels: int, shape, scale: float = 1.0) -> np.ndarray:
    """Multiplicative, low-frequency field (channels, X, Y, Z), peak deviation ``BIAS * scale``: coil
    sensitivity, which no two scanners share.

    Cosine basis up to 2 half-periods per axis, like SPM's bias model.
    """
    coeffs = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    coeffs[:, 0, 0, 0] = 0  # the constant term is a global gain, already covered by contrast jitter
    mats = [np.cos(np.pi * np.outer((np.arange(n) + 0.5) / n, np.arange(3))).astype(np.float32) for n in shape]
    field = separable(coeffs, mats)
    field *= BIAS * scale / np.abs(field).max(axis=(1, 2, 3), keepdims=True)
    field += 1
    return field


def render_scales(rng: np.random.Generator, variety: Variety) -> tuple[float, float]:
    """Bias-field and noise multipliers: the acquisition stream's first two draws, made before rendering."""
    u = rng.random(2)
    return between(u[0], variety.bias_scale), between(u[1], variety.noise_scale)


def acquire(image: np.ndarray, label: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
            variety: Variety) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop, resample, reorient and rescale a finished subject as ``variety`` asks.

    Always draws ACQUISITION_DRAWS values, so that changing one setting never moves another's draws;
    each step is skipped at its default. The label never reaches outside the (new) brain mask.
    """
    u = rng.random(ACQUISITION_DRAWS)
    reshaped = variety.fov_crop_mm != (0.0, 0.0) or variety.voxel_mm is not None
    if variety.fov_crop_mm != (0.0, 0.0):
        image, label, affine = _crop(image, label, affine, between(u[6], variety.fov_crop_mm), u[7:14])
    if variety.voxel_mm is not None:
        size = [between(x, axis) for x, axis in zip(u[2:5], variety.voxel_mm)]
        image, label, affine = _resample(image, label, affine, size)
    code = variety.orientations[min(int(u[5] * len(variety.orientations)), len(variety.orientations) - 1)]
    if code != "RAS":
        image, label, affine = _reorient(image, label, affine, code)
    low, high = variety.intensity_gain
    if (low, high) != (1.0, 1.0):
        image = image * np.float32(low if low == high else math.exp(between(u[0], (math.log(low), math.log(high)))))
    if u[1] < variety.store_int16:
        image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
        reshaped = True
    if reshaped:
        label = np.where(image.any(-1), label, 0).astype(np.uint8)
    return image, label, affine


def _crop(image, label, affine, cut_mm: float, u: np.ndarray):
    """Crop the canvas to the brain plus a random margin per side, then cut ``cut_mm`` off the brain's
    top (vertex) or bottom, as a field of view planned too tight does."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    brain = image.any(-1)
    start, stop = np.zeros(3, int), np.array(brain.shape)
    for axis in range(3):
        inside = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = [round(between(x, CROP_MARGIN_MM) / spacing[axis]) for x in u[1 + 2 * axis: 3 + 2 * axis]]
        start[axis] = max(inside[0] - margin[0], 0)
        stop[axis] = min(inside[-1] + 1 + margin[1], brain.shape[axis])
        if axis == 2:
            cut = min(int(round(cut_mm / spacing[axis])), len(inside) - 1)
            if u[0] < 0.5:
                stop[axis] = inside[-1] + 1 - cut
            else:
                start[axis] = inside[0] + cut
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ start
    return image[box], label[box], moved


def _axis_weights(n: int, ratio: float, count: int, offset: float) -> sparse.csr_matrix:
    """(count, n) rows averaging the linear interpolant over each new voxel's footprint (partial volume).

    New voxel j is centred at source index ``offset + ratio * (j + 0.5) - 0.5``, ``ratio`` source voxels wide.
    """
    sub = max(1, math.ceil(2 * ratio))
    centres = offset + ratio * (np.arange(count) + 0.5) - 0.5
    points = centres[:, None] + ratio * ((np.arange(sub) + 0.5) / sub - 0.5)
    if n == 1:
        return sparse.csr_matrix(np.ones((count, 1), np.float32))
    return sparse.csr_matrix(lerp_matrix(points.ravel(), n).reshape(count, sub, n).mean(1))


def _resample(image, label, affine, size_mm):
    """Image to voxels of ``size_mm`` (linear, partial-volume averaged), label nearest, same field of view."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = label.shape
    counts = [max(1, round(n * s / v)) for n, s, v in zip(shape, spacing, size_mm)]
    ratios = [v / s for s, v in zip(spacing, size_mm)]
    offsets = [(n - c * r) / 2 for n, c, r in zip(shape, counts, ratios)]
    out = image
    for axis in range(3):
        weights = _axis_weights(shape[axis], ratios[axis], counts[axis], offsets[axis])
        moved = np.moveaxis(out, axis, 0)
        flat = (weights @ moved.reshape(moved.shape[0], -1)).astype(np.float32)
        out = np.ascontiguousarray(np.moveaxis(flat.reshape((counts[axis],) + moved.shape[1:]), 0, axis))
    nearest = [np.clip(np.rint(o + r * (np.arange(c) + 0.5) - 0.5).astype(int), 0, n - 1)
               for o, r, c, n in zip(offsets, ratios, counts, shape)]
    step = np.eye(4)
    step[:3, :3] = np.diag(ratios)
    step[:3, 3] = [o + r / 2 - 0.5 for o, r in zip(offsets, ratios)]
    return out, label[np.ix_(*nearest)], affine @ step


def _reorient(image, label, affine, code: str):
    """Store the arrays in axis order ``code`` (e.g. "LPS"); the affine keeps every voxel's world position."""
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt(code))
    moved = affine @ nib.orientations.inv_ornt_aff(transform, label.shape)
    return (np.ascontiguousarray(nib.orientations.apply_orientation(image, transform)),
            np.ascontiguousarray(nib.orientations.apply_orientation(label, transform)), moved)
