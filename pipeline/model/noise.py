"""Noise for diffusion training and scoring: Gaussian (DDPM), simplex (AnoDDPM, Wyatt et al. 2022)
or coarse (Kascenas et al., MedIA 2023).

Simplex and coarse noise are low-frequency, so partial diffusion with them hides whole tumours
rather than single pixels, and the model has to "repaint" them as healthy tissue.

Coarse noise: Gaussian noise drawn on a ``coarse_resolution`` x ``coarse_resolution`` grid per
(sample, channel), upsampled bilinearly to the image (Kascenas et al.: 16x16 at 128x128, i.e.
a cell of 8 px; the default keeps that ratio, ``image_size / 8`` cells), then normalised per plane
to zero mean and unit variance as epsilon must be. Its strength is the diffusion level: noising to
t_L gives a corruption of standard deviation sqrt((1 - abar_t) / abar_t) relative to the clean
image, the role the DAE's sigma plays in their paper.

How simplex epsilon is built (one batch):

* Every (sample, channel) plane is a slice at fixed z through one 3D OpenSimplex field
  (seeded once per generator), summed over octaves: octave ``o`` has amplitude
  ``persistence**o`` and feature size ``feature_size / 2**o`` (pixel coordinate / feature size).
* OpenSimplex 3D repeats every :data:`PERIOD` = 1536 lattice units along each axis and slices
  decorrelate within about one unit of z. So the ``N * octaves`` slices of a batch are laid out
  as an evenly spaced comb over one period, rotated and shifted in x/y by random draws from the
  generator: every plane of every octave is a different, independent slice, however unlucky the
  draw. One ``noise3array`` call per octave covers the whole batch (z is the stacked axis).
* Each plane is then normalised to zero mean and unit variance: the raw octave sum is neither.

Default feature size: AnoDDPM uses 64 px at 256 px, i.e. a quarter of the image; we keep that
ratio, ``max(2, image_size / 4)``. With 6 octaves at 64 px the finest octaves are 1 and 0.5 px,
the same scales relative to the image as AnoDDPM's 4 and 2 px at 256 px.

Draws run on the CPU (torch generator for Gaussian and for the simplex offsets) and are moved to
``device`` afterwards, so a seed gives the same stream on every machine.
"""

from __future__ import annotations

import functools

import numpy as np
import opensimplex
import torch

from pipeline.common import is_int, is_real
from pipeline.errors import InputError

NOISE_TYPES = ("gaussian", "simplex", "coarse")

PERIOD = 1536.0
"""OpenSimplex 3D repeats with this period (256-entry permutation table times the 1/6 skew)."""

MIN_Z_GAP = 2.0
"""Slices closer than about one unit of z are correlated; keep at least this gap between them."""


def _check_type(noise_type) -> str:
    if noise_type not in NOISE_TYPES:
        raise InputError("noise", f"unknown noise type {noise_type!r}; choose one of {', '.join(NOISE_TYPES)}")
    return noise_type


def _check_params(octaves, persistence, feature_size, image_size, seed) -> None:
    """Reject settings that would give silent nonsense (NaN planes, no octaves, growing octaves)."""
    if not is_int(octaves) or octaves < 1:
        raise InputError("noise", f"octaves must be an integer >= 1, got {octaves!r}")
    if not is_real(persistence) or not 0 < persistence <= 1:
        raise InputError("noise", f"persistence must be in (0, 1], got {persistence!r}")
    if feature_size is not None and (not is_real(feature_size) or feature_size <= 0):
        raise InputError("noise", f"feature_size must be > 0, got {feature_size!r}")
    if not is_real(image_size) or image_size <= 0:
        raise InputError("noise", f"image_size must be > 0, got {image_size!r}")
    if not is_int(seed):
        raise InputError("noise", f"seed must be an integer, got {seed!r}")


def default_coarse_resolution(image_size: float) -> int:
    """Grid cells per side: a cell of 8 px, as Kascenas et al.'s 16x16 at 128 px; at least 2."""
    return max(2, int(round(image_size / 8.0)))


def _check_coarse(coarse_resolution) -> None:
    if coarse_resolution is not None and (not is_int(coarse_resolution) or coarse_resolution < 1):
        raise InputError("noise", f"coarse_resolution must be an integer >= 1, got {coarse_resolution!r}")


def default_feature_size(image_size: float) -> float:
    """Coarsest feature a quarter of the image, as AnoDDPM's 64 px at 256 px; at least 2 px."""
    return max(2.0, 64.0 * image_size / 256.0)


@functools.lru_cache(maxsize=32)
def _field(seed: int) -> opensimplex.OpenSimplex:
    """One seeded field object per seed: no global ``opensimplex.seed`` state, safe across threads."""
    return opensimplex.OpenSimplex(int(seed))


def _octave_sum(height, width, z_offsets, octaves, persistence, feature_size, seed, xy_offset=(0.0, 0.0)):
    """Raw octave sum for planes at ``z_offsets``: float64 (len(z_offsets), height, width).

    Octave ``o`` reads z + o * PERIOD / octaves so the octaves of one plane are distinct slices.
    """
    field = _field(seed)
    z_offsets = np.asarray(z_offsets, dtype=np.float64).reshape(-1)
    cols = np.arange(width, dtype=np.float64)
    rows = np.arange(height, dtype=np.float64)
    total = np.zeros((z_offsets.size, height, width), dtype=np.float64)
    for o in range(octaves):
        size = feature_size / 2.0**o
        z = np.mod(z_offsets + o * PERIOD / octaves, PERIOD)
        # noise3array(x, y, z) returns (len(z), len(y), len(x)): x = columns, y = rows.
        octave = field.noise3array(cols / size + xy_offset[0], rows / size + xy_offset[1], z)
        octave *= persistence**o
        total += octave
    return total


def simplex_noise_2d(height, width, octaves, persistence, feature_size, z_offset, seed, *, xy_offset=(0.0, 0.0)):
    """One raw (un-normalised) multi-octave simplex plane, float32 (height, width).

    The reference for a single plane; the batched path in :class:`NoiseGenerator` gives the same
    values for the same offsets.
    """
    if not (is_int(height) and is_int(width)) or min(height, width) < 1:
        raise InputError("noise", f"plane size must be positive integers, got {height}x{width}")
    _check_params(octaves, persistence, feature_size, max(height, width), seed)
    plane = _octave_sum(height, width, [z_offset], octaves, persistence, feature_size, seed, xy_offset)
    return plane[0].astype(np.float32)


def _normalise(planes: np.ndarray) -> np.ndarray:
    """Zero mean, unit (population) variance per plane, as epsilon must be."""
    mean = planes.mean(axis=(1, 2), keepdims=True)
    std = planes.std(axis=(1, 2), keepdims=True)
    return (planes - mean) / np.where(std > 0, std, 1.0)


class NoiseGenerator:
    """Draws epsilon for a batch: Gaussian, or multi-octave 3D simplex normalised per sample.

    Owns its torch generator, so the stream repeats with ``seed``, advances with every call and
    can be saved with :meth:`state_dict` to resume exactly. Picklable for DataLoader workers.
    """

    def __init__(self, noise_type="gaussian", octaves=6, persistence=0.8, feature_size=None, image_size=64, seed=0,
                 coarse_resolution=None):
        self.noise_type = _check_type(noise_type)
        _check_params(octaves, persistence, feature_size, image_size, seed)
        _check_coarse(coarse_resolution)
        self.coarse_resolution = (int(coarse_resolution) if coarse_resolution is not None
                                  else default_coarse_resolution(image_size))
        self.octaves = int(octaves)
        self.persistence = float(persistence)
        self.image_size = image_size
        self.feature_size = float(feature_size) if feature_size is not None else default_feature_size(image_size)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        return (f"NoiseGenerator(noise_type={self.noise_type!r}, octaves={self.octaves}, "
                f"persistence={self.persistence}, feature_size={self.feature_size}, "
                f"coarse_resolution={self.coarse_resolution}, seed={self.seed})")

    def __call__(self, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        shape = _check_shape(shape)
        if self.noise_type == "gaussian":
            noise = torch.randn(shape, generator=self._generator, dtype=torch.float32)
        elif self.noise_type == "coarse":
            noise = self._coarse(shape)
        else:
            noise = torch.from_numpy(self._simplex(shape).astype(np.float32))
        return noise.to(device=device, dtype=dtype)

    def _coarse(self, shape) -> torch.Tensor:
        """Gaussian on a coarse grid, bilinearly upsampled, normalised per (sample, channel) plane."""
        batch, channels, height, width = shape
        grid = torch.randn((batch, channels, self.coarse_resolution, self.coarse_resolution),
                           generator=self._generator, dtype=torch.float32)
        planes = torch.nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        flat = planes.reshape(batch * channels, height, width).double().numpy()
        return torch.from_numpy(_normalise(flat).astype(np.float32)).reshape(shape)

    def _simplex(self, shape) -> np.ndarray:
        """Normalised simplex planes for (B, C, H, W), in chunks small enough to keep slices apart."""
        batch, channels, height, width = shape
        n_planes = batch * channels
        per_chunk = max(1, int(PERIOD // (self.octaves * MIN_Z_GAP)))
        chunks = [self._simplex_chunk(min(per_chunk, n_planes - start), height, width)
                  for start in range(0, n_planes, per_chunk)]
        return _normalise(np.concatenate(chunks)).reshape(shape)

    def _simplex_chunk(self, n_planes, height, width) -> np.ndarray:
        """Raw planes at evenly spaced z (all octaves interleaved), comb rotated and shifted at random."""
        draws = torch.rand(3, generator=self._generator, dtype=torch.float64).numpy() * PERIOD
        z_offsets = draws[0] + np.arange(n_planes) * PERIOD / (self.octaves * n_planes)
        return _octave_sum(height, width, z_offsets, self.octaves, self.persistence,
                           self.feature_size, self.seed, (draws[1], draws[2]))

    def with_seed(self, seed: int) -> "NoiseGenerator":
        """Same settings, independent stream (validation noise must not share training's)."""
        return NoiseGenerator(self.noise_type, self.octaves, self.persistence, self.feature_size, self.image_size, seed,
                              self.coarse_resolution)

    def reset(self) -> None:
        """Restart the stream from the seed (validation draws the same noise every epoch)."""
        self._generator.manual_seed(self.seed)

    def _config(self) -> dict:
        """Settings that shape the stream; simplex settings do not matter to Gaussian noise."""
        config = {"noise_type": self.noise_type, "seed": self.seed}
        if self.noise_type == "simplex":
            config.update(octaves=self.octaves, persistence=self.persistence, feature_size=self.feature_size)
        if self.noise_type == "coarse":
            config.update(coarse_resolution=self.coarse_resolution)
        return config

    def state_dict(self) -> dict:
        """Settings plus RNG state; settings are kept so a resume with other noise fails loudly."""
        return {**self._config(), "generator_state": self._generator.get_state()}

    def load_state_dict(self, d) -> None:
        """Continue the saved stream; refuse a state saved by a generator with other settings."""
        saved = {key: d.get(key) for key in self._config()}
        if saved != self._config():
            raise InputError("noise", f"saved noise state {saved} does not match this generator {self._config()}")
        self._generator.set_state(d["generator_state"].cpu())


def _check_shape(shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"noise shape must be (B, C, H, W) with positive sizes, got {shape}")
    return shape


def make_noise(noise_type: str, **kwargs) -> NoiseGenerator:
    """Build a :class:`NoiseGenerator` from config values, naming a bad type before anything else."""
    return NoiseGenerator(_check_type(noise_type), **kwargs)
