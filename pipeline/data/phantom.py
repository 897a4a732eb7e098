"""One synthetic BraTS-like subject: warped template anatomy, a grown tumour, rendered MRI channels.

Anatomy comes from the ICBM152 2009 template that ships inside nilearn's wheel (the default dataset
has to work offline), warped by a random affine and a smooth elastic field; tumours grow by
Fisher-Kolmogorov reaction-diffusion from a white-matter seed; intensities follow the contrast table
of docs/design.md (``CONTRAST``) with contrast jitter, a bias field and Rician noise. A subject
depends only on ``(seed, index, spacing)``, so :mod:`pipeline.data.synth` can spread subjects over
worker processes and still write the same bytes.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from threadpoolctl import threadpool_limits

MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")

# Relative mean intensity per tissue, channels (FLAIR, T1w, T1gd, T2w): the table in docs/design.md.
CONTRAST = {
    "CSF": (0.12, 0.22, 0.25, 1.00),
    "grey matter": (0.62, 0.62, 0.64, 0.62),
    "white matter": (0.48, 0.92, 0.92, 0.40),
    "edema": (0.95, 0.52, 0.54, 0.85),
    "necrotic / non-enhancing core": (0.55, 0.28, 0.30, 0.95),
    "enhancing rim": (0.80, 0.50, 1.35, 0.70),
}
HEALTHY_TISSUES = ("CSF", "grey matter", "white matter")  # order of ``Anatomy.tissue``
LABEL_TISSUES = {1: "edema", 2: "necrotic / non-enhancing core", 3: "enhancing rim"}

CANVAS_MM = (240.0, 240.0, 155.0)  # BraTS: 240 x 240 x 155 voxels at 1 mm
INTENSITY_SCALE = 1000.0  # BraTS-like value range
MAX_ROTATION_DEG = 8.0
MAX_SCALE = 0.08
MAX_SHIFT_MM = 5.0
ELASTIC_MM = 3.0  # peak elastic displacement
ELASTIC_GRID_MM = 8.0  # control-point spacing of the elastic field
ELASTIC_SMOOTH_MM = 16.0  # gaussian smoothing of the control-point noise
CONTRAST_JITTER = 0.06
BIAS = 0.12  # peak deviation of the multiplicative bias field
NOISE_RANGE = (0.02, 0.04)  # Rician sigma as a fraction of the white-matter level, per subject

SIM_MM = 2.0  # tumour growth is simulated on a grid of about this spacing
GREY_SLOWDOWN = 10.0  # D_white / D_grey
FRONT_MM = (2.0, 3.0)  # sqrt(D_white / rho): sets the width of edema and rim
TUMOUR_FRACTION = (0.02, 0.08)  # whole-tumour volume as a fraction of the brain volume
CORE_SHARE = 0.12  # growth goes on until the core (u > CORE_LEVEL) is at least this share of it
MAX_GROWTH_TIME = 80.0  # in units of 1 / rho; a safety stop, never reached in practice
SEED_DEPTH_MM = 20.0  # seeds lie at least this far inside the brain
SEED_SIGMA_MM = 3.0
EDEMA_LEVEL, RIM_LEVEL, CORE_LEVEL = 0.1, 0.5, 0.8  # density thresholds, outer to inner


@dataclass(frozen=True)
class _Template:
    """The ICBM152 maps and the facts about them that every subject's warp needs."""

    gm: np.ndarray  # uint8 0-255, as stored
    wm: np.ndarray
    brain: np.ndarray  # uint8 0/255 so it interpolates on the same scale as gm and wm
    to_voxel: np.ndarray  # world mm -> template voxel
    centre: np.ndarray  # world centre of the brain's bounding box
    points: np.ndarray  # (N, 3) convex-hull vertices of the brain, in mm about ``centre``


@dataclass(frozen=True)
class Anatomy:
    """One subject's warped tissue maps, kept on the brain's bounding box (``roi``) for speed."""

    shape: tuple  # canvas shape (X, Y, Z)
    affine: np.ndarray
    roi: tuple  # slices of the canvas holding the brain
    tissue: np.ndarray  # (3, *roi) float32 fractions of HEALTHY_TISSUES, zero outside the brain
    index: np.ndarray  # flat indices (in roi) of brain voxels

    @property
    def brain(self) -> np.ndarray:
        """Brain mask on the roi grid."""
        mask = np.zeros(self.tissue.shape[1:], bool)
        mask.flat[self.index] = True
        return mask

    def paste(self, values: np.ndarray) -> np.ndarray:
        """Place roi-grid ``values`` (trailing channel axes allowed) into a zero canvas."""
        out = np.zeros(self.shape + values.shape[3:], values.dtype)
        out[self.roi] = values
        return out


def _template_path(name: str) -> Path:
    """The template files inside nilearn's installed package: no download, works offline."""
    folder = Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"
    return folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """Load the template once per process; every subject warps the same anatomy.

    The template is 1 mm and axis-aligned, so the elastic field (mm) adds directly to voxel indices.
    """
    t1 = nib.load(_template_path("t1"))
    # C order: NIfTI loads Fortran-ordered, which makes map_coordinates ~3x slower on our C-ordered grids
    gm, wm = (np.ascontiguousarray(nib.load(_template_path(n)).dataobj, np.uint8) for n in ("gm", "wm"))
    inside = np.ascontiguousarray(t1.dataobj) > 0
    to_world = t1.affine
    voxels = np.argwhere(inside)
    lo, hi = voxels.min(0), voxels.max(0)
    centre = to_world[:3, :3] @ ((lo + hi) / 2) + to_world[:3, 3]
    surface = np.argwhere(inside & ~ndimage.binary_erosion(inside)) @ to_world[:3, :3].T + to_world[:3, 3]
    points = (surface[ConvexHull(surface).vertices] - centre).astype(np.float64)  # extremes of any affine map
    return _Template(gm, wm, inside.astype(np.uint8) * 255, np.linalg.inv(to_world), centre, points)


def _canvas(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """BraTS-sized canvas at ``spacing`` mm, centred on world (0, 0, 0)."""
    shape = tuple(int(round(mm / spacing)) for mm in CANVAS_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2
    return shape, affine


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, y and z (fixed axes, x first).

    The matrix scipy's ``Rotation.from_euler("xyz", angles)`` gives (checked in the tests to 1e-12),
    written out so that the generator's bytes cannot change with scipy's floating-point order: the
    published protocols are fingerprinted by their data.
    """
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _place_brain(rng, linear, points, half_extent, margin):
    """Shrink (if needed) and shift the warped brain so all of it stays on the canvas.

    BraTS keeps the whole brain inside its 155 slices; the template brain already spans 155 mm
    in z, so a subject scaled up or tilted has to be shrunk uniformly to fit.
    Returns the fitted linear map, the shift, and the brain's world bounding box.
    """
    moved = points @ linear.T
    lo, hi = moved.min(0), moved.max(0)
    room = 2 * (half_extent - margin)
    shrink = min(1.0, float((room / (hi - lo)).min()))
    lo, hi = lo * shrink, hi * shrink
    slack = np.minimum((room - (hi - lo)) / 2, MAX_SHIFT_MM)
    shift = -(lo + hi) / 2 + rng.uniform(-1, 1, 3) * slack
    return linear * shrink, shift, lo + shift, hi + shift


def _lerp_matrix(positions: np.ndarray, n: int) -> np.ndarray:
    """Matrix whose rows linearly interpolate ``n`` samples at fractional ``positions`` (clamped)."""
    x = np.clip(positions, 0, n - 1)
    left = np.minimum(np.floor(x).astype(int), n - 2)
    weight = (x - left).astype(np.float32)
    rows = np.arange(len(x))
    out = np.zeros((len(x), n), np.float32)
    out[rows, left] = 1 - weight
    out[rows, left + 1] = weight
    return out


def _separable(coeffs: np.ndarray, matrices) -> np.ndarray:
    """Expand a coarse (..., a, b, c) tensor with one matrix per spatial axis: a cheap smooth zoom."""
    mx, my, mz = matrices
    return np.einsum("...abc,xa,yb,zc->...xyz", coeffs, mx, my, mz, optimize=True)


def _elastic_field(rng, world_axes) -> np.ndarray:
    """Smooth random displacement (3, X, Y, Z) in mm with peak ``ELASTIC_MM``.

    Drawn on a coarse control grid, smoothed there and zoomed up separably: far cheaper than
    smoothing noise at full resolution.
    """
    starts = [axis[0] - ELASTIC_GRID_MM for axis in world_axes]  # one control point beyond each end
    counts = [int(math.ceil((axis[-1] - axis[0]) / ELASTIC_GRID_MM)) + 3 for axis in world_axes]
    coarse = rng.standard_normal((3, *counts))
    sigma = ELASTIC_SMOOTH_MM / ELASTIC_GRID_MM
    coarse = ndimage.gaussian_filter(coarse, sigma=(0, sigma, sigma, sigma), mode="nearest")
    coarse *= ELASTIC_MM / np.sqrt((coarse**2).sum(0)).max()
    mats = [_lerp_matrix((axis - s) / ELASTIC_GRID_MM, n) for axis, s, n in zip(world_axes, starts, counts)]
    return _separable(coarse.astype(np.float32), mats)


def _brain_candidates(tmpl: _Template, coords: np.ndarray, spacing: float) -> np.ndarray:
    """Roi voxels that may hold brain, found on a ~4 mm subgrid (coarse-to-fine).

    Interpolating the template only there skips the roughly half of the bounding box that is
    background.
    """
    step = max(1, int(round(4.0 / spacing)))
    shape = coords.shape[1:]
    if step == 1:
        return np.ones(shape, bool)
    sub = coords[:, ::step, ::step, ::step]
    coarse = ndimage.map_coordinates(tmpl.brain, sub, order=1, prefilter=False) > 0
    coarse = ndimage.binary_dilation(coarse, np.ones((3, 3, 3), bool))
    for axis in range(3):
        coarse = np.repeat(coarse, step, axis=axis)
    return coarse[: shape[0], : shape[1], : shape[2]]


def _subject_rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Independent streams for anatomy, tumour and rendering of one subject."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)]


def subject_anatomy(index: int, seed: int, spacing: float) -> Anatomy:
    """Warp the template into subject ``index``: random affine + elastic field, one resampling."""
    return _warp(_subject_rngs(seed, index)[0], spacing)


def _warp(rng, spacing: float) -> Anatomy:
    """Resample template tissue maps through canvas -> subject warp -> template voxel coordinates."""
    tmpl = _template()
    shape, affine = _canvas(spacing)
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    scales = 1 + rng.uniform(-MAX_SCALE, MAX_SCALE, 3)
    margin = ELASTIC_MM * (1 + MAX_SCALE) + spacing
    half = spacing * np.array(shape) / 2
    linear, shift, lo, hi = _place_brain(rng, _rotation(angles) @ np.diag(scales), tmpl.points, half, margin)

    first = np.maximum(np.floor((lo - margin - affine[:3, 3]) / spacing).astype(int), 0)
    last = np.minimum(np.ceil((hi + margin - affine[:3, 3]) / spacing).astype(int) + 1, shape)
    roi = tuple(slice(int(a), int(b)) for a, b in zip(first, last))
    world_axes = [affine[a, 3] + spacing * np.arange(first[a], last[a]) for a in range(3)]

    # world q -> template world p = L^-1 (q - shift) + centre + d(q) -> template voxel
    inv = np.linalg.inv(linear)
    to_tmpl = tmpl.to_voxel[:3, :3] @ inv
    offset = tmpl.to_voxel[:3, :3] @ (tmpl.centre - inv @ shift) + tmpl.to_voxel[:3, 3]
    coords = _elastic_field(rng, world_axes)  # the template is 1 mm, so mm == voxels
    grids = np.meshgrid(*world_axes, indexing="ij", sparse=True)
    for c in range(3):
        coords[c] += sum(to_tmpl[c, a] * grids[a] for a in range(3)) + offset[c]

    candidates = np.flatnonzero(_brain_candidates(tmpl, coords, spacing))
    points = coords.reshape(3, -1)[:, candidates]
    sample = functools.partial(ndimage.map_coordinates, coordinates=points, order=1, prefilter=False,
                               output=np.float32)
    inside = sample(tmpl.brain) > 127.5
    index = candidates[inside]
    gm, wm = (sample(v)[inside] / 255 for v in (tmpl.gm, tmpl.wm))
    tissue = np.zeros((3, coords[0].size), np.float32)
    tissue[:, index] = np.clip(1 - gm - wm, 0, 1), gm, wm
    return Anatomy(shape, affine, roi, tissue.reshape(3, *coords.shape[1:]), index)


def _block_mean(volume: np.ndarray, k: int) -> np.ndarray:
    """Average ``k``^3 blocks (zero-padded at the far edges)."""
    if k == 1:
        return volume
    pad = [(0, -n % k) for n in volume.shape]
    v = np.pad(volume, pad)
    x, y, z = (n // k for n in v.shape)
    return v.reshape(x, k, y, k, z, k).mean(axis=(1, 3, 5))


def _harmonic_faces(diffusivity: np.ndarray) -> list[np.ndarray]:
    """Face diffusivity per axis; harmonic, so no flux crosses into CSF or background (D = 0)."""
    faces = []
    for axis in range(3):
        a = np.take(diffusivity, range(diffusivity.shape[axis] - 1), axis=axis)
        b = np.take(diffusivity, range(1, diffusivity.shape[axis]), axis=axis)
        total = a + b
        faces.append(np.divide(2 * a * b, total, out=np.zeros_like(total), where=total > 0))
    return faces


def _fisher_kolmogorov(u: np.ndarray, faces, dt: float, stop) -> np.ndarray:
    """Explicit Euler for du/dt = div(D grad u) + u (1 - u) (time in units of 1/rho) until ``stop(u)``.

    ``faces`` already hold D * dt / h^2 per face.
    """
    lows = [tuple(slice(0, -1) if a == axis else slice(None) for a in range(3)) for axis in range(3)]
    highs = [tuple(slice(1, None) if a == axis else slice(None) for a in range(3)) for axis in range(3)]
    for _ in range(int(MAX_GROWTH_TIME / dt)):
        change = u * (1 - u) * dt
        for axis, face in enumerate(faces):
            flux = np.diff(u, axis=axis)
            flux *= face
            change[lows[axis]] += flux
            change[highs[axis]] -= flux
        u += change
        if stop(u):
            break
    return u


def _grown(u: np.ndarray, target: float) -> bool:
    """Stop once the whole tumour reaches its target size and has a real core, not just a front."""
    whole = np.count_nonzero(u > EDEMA_LEVEL)
    return whole >= target and np.count_nonzero(u > CORE_LEVEL) >= CORE_SHARE * whole


def _pick_seed(rng, wm: np.ndarray, brain: np.ndarray, h: float) -> tuple:
    """A white-matter voxel well inside the brain, so the tumour has room to grow."""
    depth = ndimage.distance_transform_edt(brain, sampling=h)
    white = wm > 0.5
    wanted = white & (depth >= min(SEED_DEPTH_MM, 0.6 * depth[white].max()))
    options = np.argwhere(wanted)
    return tuple(options[rng.integers(len(options))])


def _tumour_density(rng, anatomy: Anatomy, spacing: float) -> np.ndarray:
    """Grow a tumour on a ~2 mm grid and return its density on the roi grid."""
    front = rng.uniform(*FRONT_MM)
    fraction = rng.uniform(*TUMOUR_FRACTION)
    k = max(1, int(round(SIM_MM / spacing)))
    h = k * spacing
    brain = _block_mean(anatomy.brain.astype(np.float32), k) > 0.5
    gm, wm = (_block_mean(t, k) * brain for t in anatomy.tissue[1:])
    seed = _pick_seed(rng, wm, brain, h)

    diffusivity = front**2 * (wm + gm / GREY_SLOWDOWN)
    dt = min(0.9 * h**2 / (6 * front**2), 0.2)
    faces = [f * (dt / h**2) for f in _harmonic_faces(diffusivity)]
    grid = np.meshgrid(*[h * (np.arange(n) - s) for n, s in zip(brain.shape, seed)], indexing="ij", sparse=True)
    u = (np.exp(-sum(g**2 for g in grid) / (2 * SEED_SIGMA_MM**2)) * (diffusivity > 0)).astype(np.float32)

    target = fraction * anatomy.index.size / h**3 * spacing**3  # whole tumour, in sim voxels
    u = _fisher_kolmogorov(u, faces, dt, functools.partial(_grown, target=target))
    roi_shape = anatomy.tissue.shape[1:]
    mats = [_lerp_matrix((np.arange(n) + 0.5) / k - 0.5, m) for n, m in zip(roi_shape, u.shape)]
    return _separable(u, mats)


def _tumour_labels(density: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Threshold density into MSD labels: edema outside, enhancing rim, non-enhancing core inside."""
    label = np.zeros(density.shape, np.uint8)
    label[density > EDEMA_LEVEL] = 1
    label[density > RIM_LEVEL] = 3
    label[density > CORE_LEVEL] = 2
    label[~brain] = 0
    return label


def _bias_field(rng, shape) -> np.ndarray:
    """Multiplicative, low-frequency field (4, X, Y, Z), one per channel, peak deviation ``BIAS``.

    Cosine basis up to 2 half-periods per axis, like SPM's bias model.
    """
    coeffs = rng.standard_normal((len(MODALITIES), 3, 3, 3)).astype(np.float32)
    coeffs[:, 0, 0, 0] = 0  # the constant term is a global gain, already covered by contrast jitter
    mats = [np.cos(np.pi * np.outer((np.arange(n) + 0.5) / n, np.arange(3))).astype(np.float32) for n in shape]
    field = _separable(coeffs, mats)
    field *= BIAS / np.abs(field).max(axis=(1, 2, 3), keepdims=True)
    field += 1
    return field


def _render(rng, anatomy: Anatomy, label: np.ndarray) -> np.ndarray:
    """Brain-voxel intensities (4, N): tissue mixture, tumour override, bias field, Rician noise."""
    names = HEALTHY_TISSUES + tuple(LABEL_TISSUES.values())
    means = np.array([CONTRAST[n] for n in names], np.float32)
    means *= 1 + rng.uniform(-CONTRAST_JITTER, CONTRAST_JITTER, means.shape).astype(np.float32)
    index = anatomy.index
    values = means[: len(HEALTHY_TISSUES)].T @ anatomy.tissue.reshape(len(HEALTHY_TISSUES), -1)[:, index]
    tumour = label.ravel()[index]
    for row, cls in enumerate(LABEL_TISSUES, start=len(HEALTHY_TISSUES)):
        values[:, tumour == cls] = means[row, :, None]
    values *= _bias_field(rng, label.shape).reshape(len(MODALITIES), -1)[:, index]
    sigma = rng.uniform(*NOISE_RANGE) * means[HEALTHY_TISSUES.index("white matter"), :, None]
    noise = rng.standard_normal((2, *values.shape), dtype=np.float32) * sigma
    values = np.hypot(values + noise[0], noise[1])
    return values * INTENSITY_SCALE


def make_subject(index: int, tumour: bool, seed: int, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image float32 (X,Y,Z,4) FLAIR,T1w,T1gd,T2w ; label uint8 (X,Y,Z) in 0..3 ; affine 4x4)."""
    # Our matrix products are tiny; multi-threaded BLAS only leaves threads spinning that steal the
    # cores from everything else (about 3x slower at 4 mm, and worse with workers side by side).
    with threadpool_limits(limits=1, user_api="blas"):
        anatomy_rng, tumour_rng, render_rng = _subject_rngs(seed, index)
        anatomy = _warp(anatomy_rng, spacing)
        brain = anatomy.brain
        if tumour:
            label = _tumour_labels(_tumour_density(tumour_rng, anatomy, spacing), brain)
        else:
            label = np.zeros(brain.shape, np.uint8)
        image = np.zeros(brain.shape + (len(MODALITIES),), np.float32)
        image.reshape(-1, len(MODALITIES))[anatomy.index] = _render(render_rng, anatomy, label).T
    return anatomy.paste(image), anatomy.paste(label), anatomy.affine

