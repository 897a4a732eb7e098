"""Noise generators: the statistics epsilon must have, seeding/resume, and validation."""

from __future__ import annotations

import io
import pickle

import numpy as np
import opensimplex
import pytest
import torch

from pipeline.errors import InputError
from pipeline.model.noise import NOISE_TYPES, PERIOD, NoiseGenerator, make_noise, simplex_noise_2d

SHAPE = (4, 2, 32, 32)


def _neighbour_corr(x: torch.Tensor, dim: int) -> float:
    a = x.narrow(dim, 0, x.shape[dim] - 1).flatten().numpy()
    b = x.narrow(dim, 1, x.shape[dim] - 1).flatten().numpy()
    return float(np.corrcoef(a, b)[0, 1])


def _planes(x: torch.Tensor) -> np.ndarray:
    return x.reshape(-1, x.shape[-2] * x.shape[-1]).double().numpy()


def test_noise_types():
    assert NOISE_TYPES == ("gaussian", "simplex", "coarse")


def test_simplex_is_normalised_per_sample_and_channel():
    x = make_noise("simplex", image_size=32, seed=3)(SHAPE).double()
    assert x.mean(dim=(2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(2, 3), correction=0) - 1).abs().max() < 1e-4
    assert x.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(1, 2, 3), correction=0) - 1).abs().max() < 1e-4


def test_simplex_planes_are_independent_across_samples_and_channels():
    x = make_noise("simplex", image_size=64, feature_size=4, seed=1)((8, 2, 64, 64))
    corr = np.corrcoef(_planes(x))
    off_diagonal = np.abs(corr - np.eye(len(corr)))
    assert off_diagonal.max() < 0.25  # independent smooth fields; a shared slice would give ~1


def test_large_batches_are_chunked_yet_stay_distinct_and_normalised():
    x = make_noise("simplex", image_size=8, feature_size=2, seed=0)((3, 50, 8, 8)).double()  # 150 planes > 1 chunk
    assert x.mean(dim=(2, 3)).abs().max() < 1e-5
    assert (x.std(dim=(2, 3), correction=0) - 1).abs().max() < 1e-4
    corr = np.corrcoef(_planes(x))
    assert np.abs(corr - np.eye(len(corr))).max() < 0.95


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_same_seed_repeats_stream_other_seed_differs(noise_type):
    a, b, c = (make_noise(noise_type, image_size=32, seed=s) for s in (7, 7, 8))
    first, second = a(SHAPE), a(SHAPE)
    assert torch.equal(first, b(SHAPE)) and torch.equal(second, b(SHAPE))
    assert not torch.allclose(first, c(SHAPE))
    assert not torch.allclose(first, second)  # the stream advances


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_state_dict_resumes_same_stream_through_a_checkpoint(noise_type):
    gen = make_noise(noise_type, image_size=32, seed=5)
    gen(SHAPE)
    buffer = io.BytesIO()
    torch.save({"noise": gen.state_dict()}, buffer)
    expected = [gen(SHAPE), gen(SHAPE)]

    resumed = make_noise(noise_type, image_size=32, seed=5)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["noise"])
    assert all(torch.equal(e, resumed(SHAPE)) for e in expected)


def test_load_state_dict_refuses_other_settings():
    state = make_noise("simplex", seed=1).state_dict()
    with pytest.raises(InputError) as err:
        make_noise("simplex", seed=2).load_state_dict(state)
    assert err.value.source == "noise"
    with pytest.raises(InputError):
        make_noise("simplex", seed=1, octaves=3).load_state_dict(state)
    with pytest.raises(InputError):
        make_noise("gaussian", seed=1).load_state_dict(state)
    make_noise("gaussian", seed=1, octaves=3).load_state_dict(make_noise("gaussian", seed=1).state_dict())


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_reset_restarts_the_stream(noise_type):
    gen = make_noise(noise_type, image_size=32, seed=4)
    first = gen(SHAPE)
    gen(SHAPE)
    gen.reset()
    assert torch.equal(first, gen(SHAPE))


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_pickled_generator_continues_the_stream(noise_type):
    gen = make_noise(noise_type, image_size=32, seed=9)
    gen(SHAPE)
    clone = pickle.loads(pickle.dumps(gen))
    assert torch.equal(gen(SHAPE), clone(SHAPE))


def test_simplex_is_smooth_gaussian_is_white():
    shape = (4, 1, 64, 64)
    simplex = make_noise("simplex", image_size=64, seed=0)(shape)
    gaussian = make_noise("gaussian", seed=0)(shape)
    for dim in (2, 3):
        assert _neighbour_corr(simplex, dim) > 0.5
        assert abs(_neighbour_corr(gaussian, dim)) < 0.05


def test_fewer_octaves_are_smoother():
    one = make_noise("simplex", image_size=64, octaves=1, seed=0)((4, 1, 64, 64))
    six = make_noise("simplex", image_size=64, octaves=6, seed=0)((4, 1, 64, 64))
    assert _neighbour_corr(one, 3) > _neighbour_corr(six, 3) + 0.05


def test_gaussian_is_standard_normal():
    x = make_noise("gaussian", seed=0)((16, 1, 64, 64))
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_device(noise_type, dtype):
    x = make_noise(noise_type, image_size=16, seed=0)((3, 2, 8, 12), device="cpu", dtype=dtype)
    assert x.shape == (3, 2, 8, 12) and x.dtype == dtype and x.device.type == "cpu"
    assert torch.isfinite(x).all()


def test_shape_must_be_bchw():
    with pytest.raises(ValueError):
        make_noise("simplex")((4, 64, 64))


def test_simplex_plane_matches_scalar_opensimplex():
    """Independent reference: the octave sum at a few pixels, via the scalar noise3 (catches x/y swaps)."""
    height, width, octaves, persistence, size, z, seed = 6, 9, 3, 0.7, 4.0, 11.5, 42
    plane = simplex_noise_2d(height, width, octaves, persistence, size, z, seed)
    assert plane.shape == (height, width) and plane.dtype == np.float32
    field = opensimplex.OpenSimplex(seed)
    for row, col in [(0, 0), (1, 7), (5, 2), (3, 8)]:
        expected = sum(
            persistence**o * field.noise3(col * 2**o / size, row * 2**o / size, (z + o * PERIOD / octaves) % PERIOD)
            for o in range(octaves)
        )
        assert plane[row, col] == pytest.approx(expected, abs=1e-6)


def test_batched_simplex_equals_reference_planes():
    """The fast batched path gives the reference planes at the documented comb of offsets."""
    seed, octaves, size, shape = 3, 4, 5.0, (3, 2, 10, 14)
    x = make_noise("simplex", octaves=octaves, feature_size=size, seed=seed)(shape, dtype=torch.float64)
    draws = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy() * PERIOD
    n_planes = shape[0] * shape[1]
    for i, plane in enumerate(_planes(x)):
        z = draws[0] + i * PERIOD / (octaves * n_planes)
        ref = simplex_noise_2d(10, 14, octaves, 0.8, size, z, seed, xy_offset=(draws[1], draws[2])).astype(np.float64)
        ref = (ref - ref.mean()) / ref.std()
        np.testing.assert_allclose(plane, ref.ravel(), atol=1e-5)


def test_default_feature_size_scales_with_image_size():
    assert NoiseGenerator("simplex", image_size=256).feature_size == 64
    assert NoiseGenerator("simplex", image_size=64).feature_size == 16
    assert NoiseGenerator("simplex", image_size=4).feature_size == 2
    assert NoiseGenerator("simplex", image_size=64, feature_size=10).feature_size == 10


def test_unknown_noise_type():
    with pytest.raises(InputError) as err:
        make_noise("pink")
    assert err.value.source == "noise"
    assert err.value.problem == "unknown noise type 'pink'; choose one of gaussian, simplex, coarse"
    with pytest.raises(InputError):
        NoiseGenerator("pink")


@pytest.mark.parametrize("kwargs", [
    {"octaves": 0}, {"octaves": 2.5}, {"persistence": 0}, {"persistence": 1.5}, {"persistence": float("nan")},
    {"feature_size": 0}, {"feature_size": -3}, {"image_size": 0}, {"image_size": -64}, {"seed": 1.5},
])
def test_bad_parameters(kwargs):
    with pytest.raises(InputError) as err:
        make_noise("simplex", **kwargs)
    assert err.value.source == "noise"


def test_bad_plane_size():
    with pytest.raises(InputError):
        simplex_noise_2d(0, 8, 6, 0.8, 4.0, 0.0, 0)


# ----------------------------------------------------------------------------- coarse noise


def test_coarse_noise_is_an_upsampled_coarse_gaussian_normalised_per_plane():
    gen = make_noise("coarse", image_size=32, seed=5, coarse_resolution=4)
    x = gen((3, 2, 32, 32))
    # by hand: the same draws on a 4x4 grid, bilinear to 32x32, zero mean / unit variance per plane
    grid = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(5))
    up = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False).double()
    mean, std = up.mean(dim=(2, 3), keepdim=True), up.std(dim=(2, 3), keepdim=True, unbiased=False)
    assert torch.allclose(x.double(), (up - mean) / std, atol=1e-5)
    # coarse: neighbours 4 px apart (half a cell) still correlate strongly, unlike Gaussian noise
    lag = (x[..., :, :-4] * x[..., :, 4:]).mean()
    white = make_noise("gaussian", image_size=32, seed=5)((3, 2, 32, 32))
    assert lag > 0.5 and abs(float((white[..., :, :-4] * white[..., :, 4:]).mean())) < 0.1


@pytest.mark.parametrize("resolution", [4, 8])
def test_coarse_noise_power_sits_below_its_grid_frequency(resolution):
    """A grid of r cells carries at most r/2 cycles per image; bilinear upsampling leaks a little above."""
    size = 32
    frequency = torch.fft.fftfreq(size) * size  # cycles per image
    above = torch.maximum(frequency[:, None].abs(), frequency[None, :].abs()) > resolution / 2

    def share_above(noise_type):
        planes = make_noise(noise_type, image_size=size, seed=5, coarse_resolution=resolution)((64, 1, size, size))
        power = torch.fft.fft2(planes.double()).abs() ** 2
        return float(power[..., above].sum() / power.sum())

    assert share_above("coarse") < 0.2  # measured 0.13 (r=4), 0.10 (r=8)
    assert share_above("gaussian") > 0.9  # white: 1 - (r/size)^2 of its power lies above


def test_coarse_noise_default_resolution_seeds_and_resume():
    assert make_noise("coarse", image_size=128).coarse_resolution == 16
    assert make_noise("coarse", image_size=8).coarse_resolution == 2
    a, b = make_noise("coarse", image_size=32, seed=1), make_noise("coarse", image_size=32, seed=1)
    assert torch.equal(a((2, 1, 32, 32)), b((2, 1, 32, 32)))
    state = a.state_dict()
    first = a((2, 1, 32, 32))
    b.load_state_dict(state)
    assert torch.equal(b((2, 1, 32, 32)), first)
    other = make_noise("coarse", image_size=32, seed=1, coarse_resolution=8)
    with pytest.raises(InputError, match="does not match"):
        other.load_state_dict(state)
    with pytest.raises(InputError, match="coarse_resolution"):
        make_noise("coarse", coarse_resolution=0)
