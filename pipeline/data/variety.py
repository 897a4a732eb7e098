"""Variety settings of the synthetic generator: the axes real BraTS-style data varies on.

The default generator makes one kind of data (one big round ring-enhancing tumour, one warp range,
isotropic RAS voxels, one intensity scale, the full field of view), and methods tuned on it fail on
real-world variety. Each setting here is a per-subject (or per-lesion) range or a weighted choice;
``Variety()`` reproduces the default generator byte for byte, because published benchmark protocols
are fingerprinted by their data. New randomness comes from streams of its own (never from the
anatomy, tumour or rendering streams), so a setting left at its default changes nothing. This module
holds the settings, what they draw per subject (:func:`draw_plan`) and the lesion physics that needs
no template (the reaction-diffusion solver, uneven growth, seeds apart, mass effect); the scanner
side is in :mod:`pipeline.data.acquisition`. The table of settings is docs/generator.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.common import is_int, is_real
from pipeline.errors import InputError

MAX_LESIONS = 3
PATTERNS = ("ring", "solid", "none")  # enhancement: necrotic core in an enhancing rim / enhancing throughout / none
IRREGULAR_LOG = 3.0  # standard deviation of the log growth multiplier at irregularity 1
IRREGULAR_MM = 5.0  # gaussian smoothing of that field: lobes of about a centimetre
IRREGULAR_FLOOR = 6.0  # the multiplier lies in [e^-6, 1]: it only slows, so the time step stays as it is
APART_MM = 6.0  # a later lesion's seed lies its own radius plus this far from earlier lesions
MAX_GROWTH_TIME = 80.0  # in units of 1 / rho; a safety stop of the growth, never reached in practice
TAPER_MM = 10.0  # mass effect fades to zero over this depth below the brain surface (the skull holds)
MAX_PUSH = 0.75  # a lesion pushes its surroundings out by at most this share of its radius

# name: (lowest, highest) allowed for each end of a range setting
_LIMITS = {
    "lesion_count": (1, MAX_LESIONS), "lesion_fraction": (0.0005, 0.15), "irregularity": (0.0, 1.0),
    "edema_scale": (0.25, 3.0), "mass_effect_mm": (0.0, 15.0), "deformation": (0.0, 3.0),
    "fov_crop_mm": (0.0, 40.0), "intensity_gain": (0.01, 100.0), "bias_scale": (0.0, 4.0),
    "noise_scale": (0.0, 5.0),
}
VOXEL_LIMITS = (0.5, 8.0)


@dataclass(frozen=True)
class Variety:
    """Generator variety settings; ranges are (low, high), drawn uniformly per subject unless noted.

    Lesions (tumour subjects): ``lesion_count`` 1..3 separate lesions (default (1, 1));
    ``lesion_fraction`` whole-tumour volume of each lesion as a fraction of the brain, 0.0005..0.15
    (default (0.02, 0.08)), drawn uniformly or, with ``lesion_size_log``, log-uniformly (sizes that span
    orders of magnitude, as real lesions do; default false); ``irregularity`` 0..1 uneven diffusion and proliferation, lobulated
    infiltrative growth (default 0); ``enhancement`` probabilities of "ring" / "solid" / "none" per lesion (default
    ring); ``edema_scale`` 0.25..3 edema extent (default 1); ``mass_effect_mm`` 0..15 peak outward push
    of healthy tissue per lesion (default 0). Anatomy: ``deformation`` 0..3 multiplier of rotation,
    scaling and elastic warp (default 1). Acquisition: ``voxel_mm`` per-axis (x, y, z) voxel size
    ranges in mm, 0.5..8 (default None: the generation spacing); ``orientations`` axis codes drawn
    uniformly (default RAS); ``fov_crop_mm`` 0..40 mm cut into the brain at the top or bottom after a
    tight crop (default (0, 0): full canvas, no crop); ``intensity_gain`` 0.01..100 global scale,
    log-uniform (default 1); ``store_int16`` probability of int16 storage (default 0); ``bias_scale``
    0..4 and ``noise_scale`` 0..5 multipliers of bias-field amplitude and Rician sigma (default 1).
    """

    lesion_count: tuple = (1, 1)
    lesion_fraction: tuple = (0.02, 0.08)
    lesion_size_log: bool = False
    irregularity: tuple = (0.0, 0.0)
    enhancement: tuple = (("ring", 1.0),)
    edema_scale: tuple = (1.0, 1.0)
    mass_effect_mm: tuple = (0.0, 0.0)
    deformation: tuple = (1.0, 1.0)
    voxel_mm: tuple | None = None
    orientations: tuple = ("RAS",)
    fov_crop_mm: tuple = (0.0, 0.0)
    intensity_gain: tuple = (1.0, 1.0)
    store_int16: float = 0.0
    bias_scale: tuple = (1.0, 1.0)
    noise_scale: tuple = (1.0, 1.0)

    def __post_init__(self):
        for name, (low, high) in _LIMITS.items():
            object.__setattr__(self, name, _range(name, getattr(self, name), low, high, name == "lesion_count"))
        if not isinstance(self.lesion_size_log, bool):
            raise InputError("lesion_size_log", f"must be true or false, got {self.lesion_size_log!r}")
        if self.voxel_mm is not None:
            axes = self.voxel_mm
            if isinstance(axes, (str, bytes)) or not hasattr(axes, "__len__") or len(axes) != 3:
                raise InputError("voxel_mm", f"must be three (low, high) ranges for x, y, z, got {axes!r}")
            object.__setattr__(self, "voxel_mm", tuple(_range("voxel_mm", a, *VOXEL_LIMITS) for a in axes))
        object.__setattr__(self, "enhancement", _weights(self.enhancement))
        object.__setattr__(self, "orientations", _orientations(self.orientations))
        p = self.store_int16
        if not is_real(p) or not 0 <= p <= 1:
            raise InputError("store_int16", f"must be a probability in [0, 1], got {p!r}")
        object.__setattr__(self, "store_int16", float(p))

    @classmethod
    def from_dict(cls, d, source) -> Variety:
        """Settings from a mapping (a YAML file's); an unknown key or bad value is one line naming ``source``."""
        if not isinstance(d, dict):
            raise InputError(source, f"variety settings must be a mapping of setting: value, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
                raise InputError(source, f"unknown variety setting {key!r}{hint}")
        try:
            return cls(**d)
        except InputError as err:
            raise InputError(source, f"{err.source}: {err.problem}") from None

    def to_dict(self) -> dict:
        """JSON/YAML-ready settings; ``Variety.from_dict(v.to_dict(), ...) == v``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["enhancement"] = dict(self.enhancement)
        out["voxel_mm"] = None if self.voxel_mm is None else [list(a) for a in self.voxel_mm]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _range(name: str, value, low: float, high: float, integer: bool = False) -> tuple:
    """A validated (low, high) range inside [low, high] (integers for counts)."""
    ok = is_int if integer else is_real
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 \
            or not all(ok(v) for v in value):
        kind = "integers" if integer else "numbers"
        raise InputError(name, f"must be a (min, max) pair of {kind}, got {value!r}")
    a, b = (int(v) if integer else float(v) for v in value)
    if not low <= a <= b <= high:
        raise InputError(name, f"must satisfy {low} <= min <= max <= {high}, got ({a}, {b})")
    return a, b


def _weights(value) -> tuple:
    """Enhancement probabilities as ((pattern, p), ...) in PATTERNS order, zero weights dropped; a pattern
    name alone means always that pattern."""
    try:
        items = {value: 1.0} if isinstance(value, str) else dict(value.items() if isinstance(value, dict) else value)
    except (TypeError, ValueError):
        raise InputError("enhancement", f"must map ring / solid / none to probabilities, got {value!r}") from None
    bad = [k for k in items if k not in PATTERNS]
    if bad:
        raise InputError("enhancement", f"unknown pattern {bad[0]!r}; choose from {', '.join(PATTERNS)}")
    if not all(is_real(p) and p >= 0 for p in items.values()) or not math.isclose(sum(items.values()), 1,
                                                                                  abs_tol=1e-6):
        raise InputError("enhancement", f"probabilities must be >= 0 and sum to 1, got {items!r}")
    return tuple((k, float(items[k])) for k in PATTERNS if items.get(k, 0) > 0)


def _orientations(value) -> tuple:
    """Axis codes such as "RAS" or "LPS": one letter for each of R/L, A/P, S/I."""
    codes = (value,) if isinstance(value, str) else tuple(value) if hasattr(value, "__iter__") else ()
    if not codes:
        raise InputError("orientations", f"must be a non-empty list of axis codes such as 'RAS', got {value!r}")
    for code in codes:
        if not isinstance(code, str) or len(code) != 3 or sorted(
                {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(c, 9) for c in code.upper()) != [0, 1, 2]:
            raise InputError("orientations", f"{code!r} is not an axis code (one of R/L, A/P, S/I each, e.g. 'LPS')")
    return tuple(c.upper() for c in codes)


@dataclass(frozen=True)
class Domain:
    """A share of a dataset's subjects generated with one ``variety`` (a site, a scanner, a protocol)."""

    name: str
    share: float
    variety: Variety = Variety()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.replace("_", "").replace("-", "").isalnum():
            raise InputError("domains", f"name must be letters, digits, '-' or '_', got {self.name!r}")
        if not is_real(self.share) or self.share <= 0:
            raise InputError(f"domains: {self.name}", f"share must be a number > 0, got {self.share!r}")
        if not isinstance(self.variety, Variety):
            raise InputError(f"domains: {self.name}", "variety must be a Variety")

    @classmethod
    def from_dict(cls, d, source) -> Domain:
        """``{name, share, variety}``; the variety is a preset name or a mapping of settings."""
        if not isinstance(d, dict) or set(d) - {"name", "share", "variety"} or not {"name", "share"} <= set(d):
            raise InputError(source, f"a domain needs exactly name, share and optionally variety, got {d!r}")
        variety = preset(d.get("variety", "none"), source) if isinstance(d.get("variety", "none"), str) \
            else Variety.from_dict(d["variety"], f"{source}: domain {d['name']}")
        try:
            return cls(d["name"], d["share"], variety)
        except InputError as err:
            raise InputError(source, f"{err.source}: {err.problem}") from None

    def to_dict(self) -> dict:
        return {"name": self.name, "share": self.share, "variety": self.variety.to_dict()}


PRESETS = {
    "none": Variety(),
    "mixed": Variety(
        lesion_count=(1, 3), lesion_fraction=(0.0005, 0.04), lesion_size_log=True, irregularity=(0.0, 0.8),
        enhancement={"ring": 0.6, "solid": 0.2, "none": 0.2}, edema_scale=(0.5, 2.0), mass_effect_mm=(0.0, 8.0),
        deformation=(0.5, 2.0), voxel_mm=((1.0, 2.5), (1.0, 2.5), (1.5, 5.0)),
        orientations=("RAS", "LPS", "LAS", "RPI", "PIR"), fov_crop_mm=(0.0, 20.0), intensity_gain=(0.05, 20.0),
        store_int16=0.5, bias_scale=(0.5, 3.0), noise_scale=(0.5, 3.0)),
}


def preset(name: str, source="variety") -> Variety:
    """A named preset; an unknown name is one line listing the presets."""
    if name not in PRESETS:
        raise InputError(source, f"unknown variety preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def load_settings(value, source) -> Variety | list[Domain]:
    """A preset name, a mapping of settings, or ``{"domains": [...]}`` (as read from YAML)."""
    if isinstance(value, str):
        return preset(value, source)
    if isinstance(value, dict) and "domains" in value:
        if set(value) != {"domains"} or not isinstance(value["domains"], list) or not value["domains"]:
            raise InputError(source, "'domains' must be the only key and hold a non-empty list of domains")
        domains = [Domain.from_dict(d, source) for d in value["domains"]]
        if len({d.name for d in domains}) < len(domains):
            raise InputError(source, "domain names must be unique")
        return domains
    return Variety.from_dict(value, source)


def between(u: float, bounds: tuple) -> float:
    """Map a uniform draw ``u`` in [0, 1) into ``bounds``; exactly ``low`` when low == high."""
    low, high = bounds
    return float(low + (high - low) * float(u))  # a Python float: a numpy scalar would promote float32 maths


@dataclass(frozen=True)
class Lesion:
    """What the variety settings drew for one lesion; its seed, front and size come from ``growth_rng``."""

    number: int  # 0: the first lesion, grown from the tumour stream exactly as without variety
    fraction_range: tuple
    log_size: bool
    pattern: str
    edema_scale: float
    mass_effect_mm: float
    irregularity: float
    stream: np.random.SeedSequence  # (growth of lesions after the first, irregular field)

    def draw_fraction(self, rng: np.random.Generator) -> float:
        """Whole-tumour size as a fraction of the brain: uniform in the range (one draw, as the published
        generator made it) or log-uniform (one draw too), so small lesions are as common as large ones."""
        low, high = self.fraction_range
        return math.exp(rng.uniform(math.log(low), math.log(high))) if self.log_size else rng.uniform(low, high)

    def edema_level(self, edema: float, rim: float) -> float:
        """Density threshold of the edema: at scale s the edema band spans s times its log-density range."""
        return edema if self.edema_scale == 1 else rim * (edema / rim) ** self.edema_scale

    def record(self, voxels: int, brain_voxels: int) -> dict:
        """What was drawn for this lesion and how big it came out, for the dataset's generator record."""
        return {"pattern": self.pattern, "voxels": voxels, "fraction": round(voxels / brain_voxels, 6),
                "edema_scale": round(self.edema_scale, 4), "mass_effect_mm": round(self.mass_effect_mm, 3),
                "irregularity": round(self.irregularity, 4)}

    def growth_rng(self, tumour_rng: np.random.Generator) -> np.random.Generator:
        """The first lesion draws as the default generator did; the others from streams of their own."""
        return tumour_rng if self.number == 0 else np.random.default_rng(_child(self.stream, 0))

    def diffusivity(self, base: np.ndarray, h: float, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``base`` made uneven and zeroed on earlier lesions, and the uneven multiplier (None: even).

        A smooth log-normal field slows diffusion and proliferation alike in random pockets, so the
        front grows lobes around them instead of a ball."""
        field = None
        if self.irregularity > 0:
            rng = np.random.default_rng(_child(self.stream, 1))
            noise = ndimage.gaussian_filter(rng.standard_normal(base.shape, dtype=np.float32), IRREGULAR_MM / h)
            noise *= IRREGULAR_LOG * self.irregularity / max(float(noise.std()), 1e-12)
            field = np.exp(np.clip(noise, -IRREGULAR_FLOOR, 0))
            base = base * field
        if blocked.any():
            base = np.where(blocked, 0, base).astype(base.dtype)
        return base, field


@dataclass(frozen=True)
class Plan:
    """Per-subject variety draws made before anything is grown: anatomy deformation and the lesions."""

    deformation: float
    lesions: tuple


def _child(stream: np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    """The ``i``-th child of ``stream``, the same however often it is asked for (``spawn`` counts calls)."""
    return np.random.SeedSequence(stream.entropy, spawn_key=stream.spawn_key + (i,))


def draw_plan(stream: np.random.SeedSequence, variety: Variety) -> Plan:
    """Draw a subject's deformation and lesions; always the same number of draws, whatever the settings,
    so changing one setting never moves the others' draws."""
    u = np.random.default_rng(stream).random(2 + 4 * MAX_LESIONS)
    low, high = variety.lesion_count
    count = low + min(int(u[1] * (high - low + 1)), high - low)
    names, weights = zip(*variety.enhancement)
    lesions = []
    for i in range(count):
        pick, edema, mass, irregular = u[2 + 4 * i: 6 + 4 * i]
        pattern = names[min(int(np.searchsorted(np.cumsum(weights), pick * sum(weights), "right")), len(names) - 1)]
        lesions.append(Lesion(i, variety.lesion_fraction, variety.lesion_size_log, pattern, between(edema, variety.edema_scale),
                              between(mass, variety.mass_effect_mm), between(irregular, variety.irregularity),
                              _child(stream, i)))
    return Plan(between(u[0], variety.deformation), tuple(lesions))


def harmonic_faces(diffusivity: np.ndarray) -> list[np.ndarray]:
    """Face diffusivity per axis; harmonic, so no flux crosses into CSF or background (D = 0)."""
    faces = []
    for axis in range(3):
        a = np.take(diffusivity, range(diffusivity.shape[axis] - 1), axis=axis)
        b = np.take(diffusivity, range(1, diffusivity.shape[axis]), axis=axis)
        total = a + b
        faces.append(np.divide(2 * a * b, total, out=np.zeros_like(total), where=total > 0))
    return faces


def fisher_kolmogorov(u: np.ndarray, faces, dt: float, stop, rate=None) -> np.ndarray:
    """Explicit Euler for du/dt = div(D grad u) + u (1 - u) (time in units of 1/rho) until ``stop(u)``.

    ``faces`` already hold D * dt / h^2 per face; ``rate`` (optional) is a local rho * dt, for lesions
    that proliferate unevenly.
    """
    lows = [tuple(slice(0, -1) if a == axis else slice(None) for a in range(3)) for axis in range(3)]
    highs = [tuple(slice(1, None) if a == axis else slice(None) for a in range(3)) for axis in range(3)]
    for _ in range(int(MAX_GROWTH_TIME / dt)):
        change = u * (1 - u) * (dt if rate is None else rate)
        for axis, face in enumerate(faces):
            flux = np.diff(u, axis=axis)
            flux *= face
            change[lows[axis]] += flux
            change[highs[axis]] -= flux
        u += change
        if stop(u):
            break
    return u


def seeds_apart(wanted: np.ndarray, blocked: np.ndarray, radius_mm: float, h: float) -> np.ndarray:
    """Seed options a later lesion's radius plus APART_MM from earlier lesions, else the farthest ones."""
    if not blocked.any():
        return wanted
    gap = ndimage.distance_transform_edt(~blocked, sampling=h)
    far = wanted & (gap >= radius_mm + APART_MM)
    if far.any() or not (wanted & (gap > 0)).any():
        return far
    return wanted & (gap >= 0.8 * gap[wanted].max())


def mass_effect(tissue: np.ndarray, index: np.ndarray, masses: list, spacing: float) -> np.ndarray:
    """Tissue maps (3, X, Y, Z) with healthy tissue pushed outward around each lesion.

    Each mass ``(centre voxel, radius R mm, peak a mm)`` pushes the tissue at its edge out by ``a`` (at
    most MAX_PUSH R) and keeps volume outside: a point at r >= R comes from (r^3 - R^3 + (R - a)^3)^(1/3),
    so the push falls off as 1/r^2, and inside from r (R - a) / R. It fades to zero within TAPER_MM of
    the brain surface, as the skull stops it; the brain mask itself is unchanged.
    """
    brain = np.zeros(tissue.shape[1:], bool)
    brain.flat[index] = True
    points = np.stack(np.unravel_index(index, brain.shape)).astype(np.float64)
    push = np.zeros_like(points)
    for centre, radius, peak in masses:
        inner = radius - min(peak, MAX_PUSH * radius)
        offset = points - np.asarray(centre, np.float64)[:, None]
        r = np.sqrt((offset**2).sum(0)) * spacing
        source = np.where(r >= radius, np.cbrt(np.maximum(r**3 - radius**3 + inner**3, 0)), r * inner / radius)
        push += offset * (1 - np.divide(source, r, out=np.ones_like(r), where=r > 0))
    depth = ndimage.distance_transform_edt(brain, sampling=spacing).flat[index]
    points -= push * np.clip(depth / TAPER_MM, 0, 1)
    out = np.zeros_like(tissue)
    for c in range(len(tissue)):
        out[c].flat[index] = ndimage.map_coordinates(tissue[c], points, order=1, mode="nearest")
    return out
