"""One synthetic BraTS-like subject: warped template anatomy, a grown tumour, rendered MRI channels.

Anatomy comes from the ICBM152 2009 template that ships inside nilearn's wheel (the default dataset
has to work offline), warped by a random affine and a smooth elastic field; tumours grow by
Fisher-Kolmogorov reaction-diffusion from a white-matter seed; intensities follow the contrast table
of docs/design.md (``CONTRAST``) with contrast jitter, a bias field and Rician noise. A subject
depends only on ``(seed, index, spacing, variety)``, so :mod:`pipeline.data.synth` can spread subjects
over worker processes and still write the same bytes. The variety settings
(:mod:`pipeline.data.variety`: several, irregular, differently enhancing lesions, mass effect, other
warps and scanners) draw from streams of their own; at their defaults the bytes are the default's.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from threadpoolctl import threadpool_limits

from pipeline.data.acquisition import acquire, bias_field, block_mean, lerp_matrix, render_scales, separable
from pipeline.data.variety import (Lesion, Plan, Variety, draw_plan, fisher_kolmogorov, harmonic_faces, mass_effect,
                                   seeds_apart)

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
NOISE_RANGE = (0.02, 0.04)  # Rician sigma as a fraction of the white-matter level, per subject

SIM_MM = 2.0  # tumour growth is simulated on a grid of about this spacing
GREY_SLOWDOWN = 10.0  # D_white / D_grey
FRONT_MM = (2.0, 3.0)  # sqrt(D_white / rho): sets the width of edema and rim
TUMOUR_FRACTION = (0.02, 0.08)  # whole-tumour volume as a fraction of the brain volume
CORE_SHARE = 0.12  # growth goes on until the core (u > CORE_LEVEL) is at least this share of it
SEED_DEPTH_MM = 20.0  # seeds lie at least this far inside the brain
SEED_SIGMA_MM = 3.0
EDEMA_LEVEL, RIM_LEVEL, CORE_LEVEL = 0.1, 0.5, 0.8  # density thresholds, outer to inner
SMALL_REFERENCE = 0.04  # a lesion under TUMOUR_FRACTION[0] shrinks its front by (fraction / this) ** (1/3)


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


def _elastic_field(rng, world_axes, peak: float = ELASTIC_MM) -> np.ndarray:
    """Smooth random displacement (3, X, Y, Z) in mm with peak ``peak``.

    Drawn on a coarse control grid, smoothed there and zoomed up separably: far cheaper than
    smoothing noise at full resolution.
    """
    starts = [axis[0] - ELASTIC_GRID_MM for axis in world_axes]  # one control point beyond each end
    counts = [int(math.ceil((axis[-1] - axis[0]) / ELASTIC_GRID_MM)) + 3 for axis in world_axes]
    coarse = rng.standard_normal((3, *counts))
    sigma = ELASTIC_SMOOTH_MM / ELASTIC_GRID_MM
    coarse = ndimage.gaussian_filter(coarse, sigma=(0, sigma, sigma, sigma), mode="nearest")
    coarse *= peak / np.sqrt((coarse**2).sum(0)).max()
    mats = [lerp_matrix((axis - s) / ELASTIC_GRID_MM, n) for axis, s, n in zip(world_axes, starts, counts)]
    return separable(coarse.astype(np.float32), mats)


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


def _subject_streams(seed: int, index: int) -> list[np.random.SeedSequence]:
    """Independent streams of one subject: anatomy, tumour, rendering (as always), lesion variety, acquisition."""
    return np.random.SeedSequence([seed, index]).spawn(5)  # children 0-2 are those spawn(3) gave


def subject_anatomy(index: int, seed: int, spacing: float) -> Anatomy:
    """Warp the template into subject ``index``: random affine + elastic field, one resampling."""
    return _warp(np.random.default_rng(_subject_streams(seed, index)[0]), spacing)


def _warp(rng, spacing: float, deformation: float = 1.0) -> Anatomy:
    """Resample template tissue maps through canvas -> subject warp -> template voxel coordinates.

    ``deformation`` multiplies the rotation, scaling and elastic ranges (1.0 leaves every value as is)."""
    tmpl = _template()
    shape, affine = _canvas(spacing)
    rotation, scaling, elastic = MAX_ROTATION_DEG * deformation, MAX_SCALE * deformation, ELASTIC_MM * deformation
    angles = np.deg2rad(rng.uniform(-rotation, rotation, 3))
    scales = 1 + rng.uniform(-scaling, scaling, 3)
    margin = elastic * (1 + scaling) + spacing
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
    coords = _elastic_field(rng, world_axes, elastic)  # the template is 1 mm, so mm == voxels
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


def _grown(u: np.ndarray, target: float) -> bool:
    """Stop once the whole tumour reaches its target size and has a real core, not just a front."""
    whole = np.count_nonzero(u > EDEMA_LEVEL)
    return whole >= target and np.count_nonzero(u > CORE_LEVEL) >= CORE_SHARE * whole


@dataclass(frozen=True)
class _SimGrid:
    """The tumour simulation grid: block means of ``k``^3 roi voxels, ``h`` mm apart."""

    k: int
    h: float
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    seeds: np.ndarray  # white matter well inside the brain, where a tumour has room to grow


def _sim_grid(anatomy: Anatomy, spacing: float) -> _SimGrid:
    """Tumours grow on a ~SIM_MM grid: fine enough for the front, coarse enough to be fast."""
    k = max(1, int(round(SIM_MM / spacing)))
    brain = block_mean(anatomy.brain.astype(np.float32), k) > 0.5
    gm, wm = (block_mean(t, k) * brain for t in anatomy.tissue[1:])
    depth = ndimage.distance_transform_edt(brain, sampling=k * spacing)
    white = wm > 0.5
    seeds = white & (depth >= min(SEED_DEPTH_MM, 0.6 * depth[white].max()))
    return _SimGrid(k, k * spacing, brain, gm, wm, seeds)


def _pick_seed(rng, grid: _SimGrid, avoid: tuple | None = None) -> tuple | None:
    """A seed voxel; ``avoid`` = (earlier lesions' mask, radius mm) keeps a later lesion apart from them."""
    options = np.argwhere(grid.seeds if avoid is None else seeds_apart(grid.seeds, *avoid, grid.h))
    return tuple(options[rng.integers(len(options))]) if len(options) else None


def _grow(rng, grid: _SimGrid, anatomy: Anatomy, spacing: float, lesion: Lesion, blocked: np.ndarray):
    """Grow one tumour from a white-matter seed; its density on the simulation grid (None: no room left).
    The first lesion of the default settings draws and computes exactly what the generator always did."""
    front = rng.uniform(*FRONT_MM)
    fraction = lesion.draw_fraction(rng)
    h, sigma = grid.h, SEED_SIGMA_MM
    if fraction < TUMOUR_FRACTION[0]:  # small: a real core has to form at a smaller size
        shrink = (fraction / SMALL_REFERENCE) ** (1 / 3)
        front, sigma = front * shrink, sigma * shrink
    radius = (3 * fraction * anatomy.index.size * spacing**3 / (4 * math.pi)) ** (1 / 3)
    seed = _pick_seed(rng, grid, (blocked, radius) if lesion.number else None)
    if seed is None:
        return None
    diffusivity, field = lesion.diffusivity(front**2 * (grid.wm + grid.gm / GREY_SLOWDOWN), h, blocked)
    dt = min(0.9 * h**2 / (6 * front**2), 0.2)
    faces = [f * (dt / h**2) for f in harmonic_faces(diffusivity)]
    axes = np.meshgrid(*[h * (np.arange(n) - s) for n, s in zip(grid.brain.shape, seed)], indexing="ij", sparse=True)
    u = (np.exp(-sum(g**2 for g in axes) / (2 * sigma**2)) * (diffusivity > 0)).astype(np.float32)
    target = fraction * anatomy.index.size / h**3 * spacing**3  # whole tumour, in sim voxels
    rate = None if field is None else (dt * field).astype(np.float32)
    return fisher_kolmogorov(u, faces, dt, functools.partial(_grown, target=target), rate)


def _tumour_labels(density: np.ndarray, brain: np.ndarray, pattern: str = "ring", edema: float = EDEMA_LEVEL):
    """Threshold density into MSD labels: edema outside, then by ``pattern`` "ring" an enhancing rim
    around a non-enhancing core, "solid" enhancing throughout, "none" non-enhancing throughout."""
    label = np.zeros(density.shape, np.uint8)
    label[density > edema] = 1
    label[density > RIM_LEVEL] = 2 if pattern == "none" else 3
    if pattern == "ring":
        label[density > CORE_LEVEL] = 2
    label[~brain] = 0
    return label


def _tumour(rng, anatomy: Anatomy, spacing: float, plan: Plan) -> tuple[Anatomy, np.ndarray, list]:
    """Grow and label the planned lesions apart from each other: (anatomy, label, one record per lesion).

    A lesion with mass effect pushes the healthy tissue around it outward (the anatomy's tissue maps)."""
    grid, brain = _sim_grid(anatomy, spacing), anatomy.brain
    label, blocked = np.zeros(brain.shape, np.uint8), np.zeros(grid.brain.shape, bool)
    records, masses = [], []
    for lesion in plan.lesions:
        u = _grow(lesion.growth_rng(rng), grid, anatomy, spacing, lesion, blocked)
        if u is None:
            continue  # no white matter left far enough from the earlier lesions
        edema = lesion.edema_level(EDEMA_LEVEL, RIM_LEVEL)
        if lesion.number + 1 < len(plan.lesions):
            blocked |= ndimage.binary_dilation(u > min(edema, EDEMA_LEVEL), np.ones((3, 3, 3), bool), iterations=2)
        density = separable(u, [lerp_matrix((np.arange(n) + 0.5) / grid.k - 0.5, m)
                                for n, m in zip(brain.shape, u.shape)])
        own = _tumour_labels(density, brain, lesion.pattern, edema)
        label = np.where(own > 0, own, label)
        records.append(lesion.record(int(np.count_nonzero(own)), anatomy.index.size))
        core = np.count_nonzero((density > RIM_LEVEL) & brain)
        if lesion.mass_effect_mm > 0 and core:
            radius = (3 * core * spacing**3 / (4 * math.pi)) ** (1 / 3)
            masses.append((ndimage.center_of_mass(own > 0), radius, lesion.mass_effect_mm))
    if masses:
        anatomy = replace(anatomy, tissue=mass_effect(anatomy.tissue, anatomy.index, masses, spacing))
    return anatomy, label, records


def _render(rng, anatomy: Anatomy, label: np.ndarray, bias_scale=1.0, noise_scale=1.0) -> np.ndarray:
    """Brain-voxel intensities (4, N): tissue mixture, tumour override, bias field, Rician noise.

    The scales multiply the bias amplitude and the noise sigma (1.0 changes no value)."""
    names = HEALTHY_TISSUES + tuple(LABEL_TISSUES.values())
    means = np.array([CONTRAST[n] for n in names], np.float32)
    means *= 1 + rng.uniform(-CONTRAST_JITTER, CONTRAST_JITTER, means.shape).astype(np.float32)
    index = anatomy.index
    values = means[: len(HEALTHY_TISSUES)].T @ anatomy.tissue.reshape(len(HEALTHY_TISSUES), -1)[:, index]
    tumour = label.ravel()[index]
    for row, cls in enumerate(LABEL_TISSUES, start=len(HEALTHY_TISSUES)):
        values[:, tumour == cls] = means[row, :, None]
    values *= bias_field(rng, len(MODALITIES), label.shape, bias_scale).reshape(len(MODALITIES), -1)[:, index]
    sigma = rng.uniform(*NOISE_RANGE) * noise_scale * means[HEALTHY_TISSUES.index("white matter"), :, None]
    noise = rng.standard_normal((2, *values.shape), dtype=np.float32) * sigma
    values = np.hypot(values + noise[0], noise[1])
    return values * INTENSITY_SCALE


def make_subject(index: int, tumour: bool, seed: int, spacing: float,
                 variety: Variety | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (image float32 (X,Y,Z,4) FLAIR,T1w,T1gd,T2w ; label uint8 (X,Y,Z) in 0..3 ; affine 4x4).

    ``variety`` (None or ``Variety()``: the default's bytes) may change grid, axis order and dtype (int16)."""
    return make_subject_with_record(index, tumour, seed, spacing, variety)[:3]


def make_subject_with_record(index: int, tumour: bool, seed: int, spacing: float, variety: Variety | None = None):
    """:func:`make_subject` plus a record of what was drawn: lesions (pattern, voxels on the ``spacing``
    canvas, ...), deformation, voxel size, orientation and dtype of the stored image."""
    variety = Variety() if variety is None else variety
    # Our matrix products are tiny; multi-threaded BLAS only leaves threads spinning that steal the
    # cores from everything else (about 3x slower at 4 mm, and worse with workers side by side).
    with threadpool_limits(limits=1, user_api="blas"):
        streams = _subject_streams(seed, index)
        anatomy_rng, tumour_rng, render_rng, scan_rng = (np.random.default_rng(streams[i]) for i in (0, 1, 2, 4))
        plan = draw_plan(streams[3], variety)
        anatomy = _warp(anatomy_rng, spacing, plan.deformation)
        if tumour:
            anatomy, label, lesions = _tumour(tumour_rng, anatomy, spacing, plan)
        else:
            label, lesions = np.zeros(anatomy.tissue.shape[1:], np.uint8), []
        image = np.zeros(label.shape + (len(MODALITIES),), np.float32)
        values = _render(render_rng, anatomy, label, *render_scales(scan_rng, variety))
        image.reshape(-1, len(MODALITIES))[anatomy.index] = values.T
        image, label, affine = acquire(anatomy.paste(image), anatomy.paste(label), anatomy.affine, scan_rng, variety)
    record = {"lesions": lesions, "deformation": round(plan.deformation, 4),
              "voxel_mm": [round(float(z), 4) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))],
              "orientation": "".join(nib.aff2axcodes(affine)), "shape": list(label.shape), "dtype": str(image.dtype)}
    return image, label, affine, record
