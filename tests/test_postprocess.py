"""Scoring choices checked on what they compute: fast sampler, patched noising, t_L ensembles,
healthy-residual normalisation, 3D median, component filter, multi-modal maps and the baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_score import Oracle, _slices

from pipeline.errors import InputError
from pipeline.model.network import make_scheduler
from pipeline.model.noise import make_noise
from pipeline.model.train import NoisePrepareBatch, clean_outside
from pipeline.scoring.postprocess import (HealthyResidualStats, map_from_residual, median_filter, median_filter_3d,
                                          remove_small_components)
from pipeline.scoring.samplers import (ddim_reconstruct, noise_patch, patch_grid, patch_masks, patched_reconstruct,
                                       x0_reconstruct)
from pipeline.scoring.score import Scorer, noise_streams, reconstruct
from pipeline.scoring.settings import ScoreSettings


class Linear:
    """A fixed, deterministic 'network': output = 0.5 * x_t + t / 1000 (any prediction type)."""

    def __call__(self, x, t):
        return 0.5 * x + t.view(-1, 1, 1, 1).to(x) / 1000


# ----------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_fast_sampler_is_one_ddim_step_computed_by_hand(prediction):
    scheduler = make_scheduler(prediction_type=prediction)
    x0, t = _slices(n=2, dtype=torch.float64), 300
    noise = make_noise("gaussian", seed=5)
    eps = make_noise("gaussian", seed=5)((2, 1, 16, 16), dtype=torch.float64)
    abar = float(scheduler.alphas_cumprod[t])
    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
    out = 0.5 * x_t + t / 1000
    expected = {"epsilon": (x_t - (1 - abar) ** 0.5 * out) / abar**0.5, "sample": out,
                "v_prediction": abar**0.5 * x_t - (1 - abar) ** 0.5 * out}[prediction].clamp(-1, 1)
    one_step = ScoreSettings(ddim_steps=1)
    torch.testing.assert_close(ddim_reconstruct(Linear(), x0, t, scheduler, noise, one_step), expected)
    torch.testing.assert_close(x0_reconstruct(Linear(), x0, t, scheduler, make_noise("gaussian", seed=5), one_step),
                               expected)


def test_patch_grid_covers_every_pixel():
    assert patch_grid(64, 32) == [0, 32]
    assert patch_grid(20, 8) == [0, 8, 12]
    masks = patch_masks(20, 20, 8)
    assert masks.shape == (9, 1, 20, 20) and (masks.sum(0) >= 1).all()


def test_patched_noising_leaves_pixels_outside_the_patch_untouched():
    scheduler = make_scheduler()
    x0, eps = _slices(n=2), _slices(n=2, seed=1)
    mask = patch_masks(16, 16, 8)[1:2].expand(2, -1, -1, -1)
    x_t = noise_patch(x0, eps, 400, scheduler, mask)
    outside = mask == 0
    assert torch.equal(x_t[outside.expand_as(x_t)], x0[outside.expand_as(x0)])
    assert not torch.allclose(x_t[~outside.expand_as(x_t)], x0[~outside.expand_as(x0)])
    # training goes through MONAI's add_noise: the adjusted noise gives the same clean context
    noise = clean_outside(x0, eps, torch.tensor([400, 700]), scheduler, mask)
    noisy = scheduler.add_noise(x0, noise, torch.tensor([400, 700]))
    torch.testing.assert_close(noisy[outside.expand_as(noisy)], x0[outside.expand_as(x0)], atol=1e-5, rtol=0)


def test_patched_training_batches_noise_one_patch_per_slice():
    scheduler = make_scheduler(prediction_type="sample")
    prepare = NoisePrepareBatch(scheduler, make_noise("gaussian", seed=1), seed=2, patch_size=8)
    images = _slices(n=4, size=16)
    _, target, _, kwargs = prepare({"image": images})
    noisy = scheduler.add_noise(images, kwargs["noise"], kwargs["timesteps"])
    changed = (noisy - images).abs() > 1e-5
    assert torch.equal(target, images)
    for i in range(4):  # the noised pixels of each slice fit inside one 8x8 square
        rows, cols = torch.nonzero(changed[i, 0], as_tuple=True)
        assert 0 < len(rows) <= 64 and rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8


@pytest.mark.parametrize("steps", [1, 3])
def test_oracle_patched_reconstruction_is_exact(steps):
    scheduler = make_scheduler(prediction_type="sample")
    x0 = _slices(n=3, size=16, dtype=torch.float64)
    recon = patched_reconstruct(Oracle(scheduler, x0.repeat_interleave(4, dim=0)), x0, 300, scheduler,
                                make_noise("gaussian"), ScoreSettings(ddim_steps=steps, patch_size=8))
    torch.testing.assert_close(recon, x0, atol=1e-9, rtol=0)


def test_t_ensemble_averages_the_residuals_of_each_level():
    scheduler = make_scheduler(prediction_type="sample")
    x = _slices(n=2, size=16)
    noise = make_noise("gaussian", seed=4)
    both = Scorer(Linear(), scheduler, noise, ScoreSettings(t_start=[100, 300], ddim_steps=1))
    residual, recon = reconstruct(both, x, noise_streams(both, "s"))
    singles = []
    for t in (100, 300):
        one = Scorer(Linear(), scheduler, noise, ScoreSettings(t_start=t, ddim_steps=1))
        singles.append(reconstruct(one, x, noise_streams(one, "s")))
    torch.testing.assert_close(residual, (singles[0][0] + singles[1][0]) / 2)
    torch.testing.assert_close(recon, (singles[0][1] + singles[1][1]) / 2)
    assert not torch.allclose(singles[0][0], singles[1][0])


# ----------------------------------------------------------------------------------------------
# maps


def test_residual_normalisation_gives_known_z_scores():
    """Healthy residuals with a known mean / std per position (or per intensity bin) -> exact z-scores."""
    n, h, w = 400, 4, 4
    signs = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0).view(n, 1, 1, 1).expand(n, 1, h, w)
    mean = torch.linspace(0.1, 0.4, h * w).view(1, 1, h, w)
    healthy = (mean + 0.05 * signs).double()  # exactly mean +- std, half each way
    x = torch.full((n, 1, h, w), 0.5, dtype=torch.float64)
    brain = torch.ones(n, 1, h, w)
    stats = HealthyResidualStats.fit("position", healthy, x, brain)
    np.testing.assert_allclose(stats.mean[0].reshape(h, w), mean[0, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(stats.std[0], 0.05, atol=1e-6)
    test = mean + 0.05 * torch.tensor([0.0, 1.0, 3.0, -2.0]).repeat(4).view(1, 1, h, w)
    z = stats.normalise(test.double(), x[:1])
    np.testing.assert_allclose(z.view(-1).numpy(), np.array([0, 1, 3, 0] * 4), atol=1e-5)  # negatives clamp to 0

    # intensity bins: dark pixels have residual 0.1 +- 0.02, bright ones 0.3 +- 0.1
    xs = torch.where(torch.arange(w).view(1, 1, 1, w) < 2, 0.2, 1.0).expand(n, 1, h, w).double()
    res = torch.where(xs < 0.5, 0.1 + 0.02 * signs, 0.3 + 0.1 * signs)
    stats = HealthyResidualStats.fit("intensity", res, xs, brain)
    z = stats.normalise(torch.tensor([[[[0.14, 0.14, 0.5, 0.5]]]], dtype=torch.float64), xs[:1, :, :1])
    np.testing.assert_allclose(z.view(-1).numpy(), [2.0, 2.0, 2.0, 2.0], atol=1e-5)


def test_3d_median_removes_a_speck_and_keeps_a_block():
    volume = torch.zeros(1, 12, 12, 12)
    volume[0, 2, 2, 2] = 5.0
    volume[0, 5:10, 5:10, 5:10] = 1.0
    out = median_filter_3d(volume, 3)
    assert out[0, 2, 2, 2] == 0 and out[0, 7, 7, 7] == 1.0
    assert torch.equal(median_filter_3d(volume, 1), volume)


def test_component_filter_clamps_small_components_only():
    volume = np.zeros((10, 10, 10), np.float32)
    volume[1, 1, 1] = 0.9  # 1-voxel speck
    volume[5:8, 5:8, 5:8] = 0.8  # 27-voxel component
    out = remove_small_components(volume, threshold=0.5, min_voxels=8)
    assert out[1, 1, 1] == 0.5 and (out[5:8, 5:8, 5:8] == 0.8).all()
    assert np.array_equal(remove_small_components(volume, 0.5, 0), volume)


def test_multimodal_map_takes_the_largest_channel_and_baseline_reads_flair_only():
    x = torch.zeros(1, 4, 12, 12)
    x[:, 0] = 0.5  # FLAIR
    x[:, 3, 5:8, 5:8] = 0.9  # an anomaly visible on T2w only
    brain = torch.ones(1, 1, 12, 12)
    recon = x.clone()
    recon[:, 3, 5:8, 5:8] = 0.3
    settings = ScoreSettings(median_size=1, erode_iters=0)
    m = map_from_residual((x - recon).abs(), x, brain, settings)
    assert m[0, 0, 6, 6] == pytest.approx(0.6) and m[0, 0, 0, 0] == 0
    baseline = Scorer(None, None, None, ScoreSettings(sampler="flair"))  # FLAIR: the first modality
    residual, _ = reconstruct(baseline, x, [])
    assert residual.shape == (1, 1, 12, 12) and torch.equal(residual[0, 0], x[0, 0])


@pytest.mark.parametrize("size", [3, 5])
def test_3d_median_equals_monai_median_filter(size):
    from monai.networks.layers import median_filter as monai_median_filter

    volume = torch.rand(1, 11, 9, 13, generator=torch.Generator().manual_seed(size))
    volume[0, :4, :4, :4] = 0.5  # ties
    expected = monai_median_filter(volume[None], kernel_size=(size,) * 3, spatial_dims=3)[0]
    assert torch.equal(median_filter_3d(volume, size, chunk=4), expected)


def test_2d_median_network_equals_sorted_median():
    maps = torch.rand(5, 1, 17, 12, generator=torch.Generator().manual_seed(0))
    maps[:, :, :6, :6] = torch.round(maps[:, :, :6, :6] * 3) / 3  # ties
    padded = torch.nn.functional.pad(maps, (1,) * 4, mode="replicate")
    windows = torch.nn.functional.unfold(padded, kernel_size=3).view(5, 1, 9, 17 * 12)
    expected = windows.median(dim=2).values.view(5, 1, 17, 12)
    assert torch.equal(median_filter(maps, 3), expected)
    assert median_filter(maps, 5).shape == maps.shape


def test_erode_equals_monai_erosion():
    """The hand-written min-pool erosion gives MONAI's binary erosion (outside the image counts as mask)."""
    from monai.transforms.utils_morphological_ops import erode as monai_erode

    from pipeline.scoring.postprocess import erode

    mask = (torch.rand(6, 1, 24, 24, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    mask[:, :, 4:20, 4:20] = 1
    expected = mask
    for iterations in (1, 2):
        expected = monai_erode(expected, filter_size=3, pad_value=1.0)
        assert torch.equal(erode(mask, iterations), expected.float())


def test_subject_standardisation_removes_a_subject_wide_scale():
    """map_norm subject: a scan whose map is 3x higher everywhere (noise, bias, another scanner) gets the
    same standardised map; a lesion stays above its healthy surroundings by the same ratio; zero outside."""
    from pipeline.scoring.postprocess import standardise_over_brain

    rng = np.random.default_rng(0)
    volume = torch.from_numpy(rng.random((1, 16, 16, 8)).astype(np.float32))
    volume[0, 6:9, 6:9, 3:5] += 5.0  # a lesion: 18 of 2048 voxels
    brain = torch.zeros_like(volume, dtype=torch.bool)
    brain[0, 2:14, 2:14, 1:7] = True
    one, three = standardise_over_brain(volume, brain), standardise_over_brain(3 * volume, brain)
    assert torch.allclose(one, three, rtol=1e-5) and float(one[~brain].abs().max()) == 0.0
    healthy = one[brain & (volume < 1)]
    assert 0.9 < float(healthy.mean()) < 1.3 and float(one[0, 7, 7, 3]) > 5 * float(healthy.mean())


def test_subject_standardisation_is_a_checked_setting():
    from pipeline.scoring.postprocess import postprocess_volume

    with pytest.raises(InputError, match="map_norm"):
        ScoreSettings(map_norm="global")
    settings = ScoreSettings(map_norm="subject", median_3d=1)
    with pytest.raises(InputError, match="brain mask"):
        postprocess_volume(torch.ones(1, 4, 4, 4), settings, None)
    out = postprocess_volume(torch.ones(1, 4, 4, 4), settings, None, torch.ones(1, 4, 4, 4))
    assert torch.allclose(out, torch.ones(1, 4, 4, 4))


def test_smoothing_the_signed_residual_cancels_noise_and_keeps_a_lesion():
    """residual_smooth: zero-mean noise the model does not reproduce averages out before |.|, a coherent
    difference (a lesion the model healed) keeps its size; filtering after |.| would keep E|noise| > 0."""
    from pipeline.scoring.postprocess import smooth_signed

    gen = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(1, 2, 48, 48, generator=gen)
    lesion = torch.zeros(1, 2, 48, 48)
    lesion[:, :, 20:28, 20:28] = 0.5
    raw, smooth = (noise + lesion).abs(), smooth_signed(noise + lesion, 5).abs()
    background = (slice(None), slice(None), slice(0, 12), slice(0, 48))
    assert float(smooth[background].mean()) < 0.4 * float(raw[background].mean())
    assert abs(float(smooth[:, :, 22:26, 22:26].mean()) - 0.5) < 0.05
    assert torch.equal(smooth_signed(noise, 1), noise)
    with pytest.raises(InputError, match="residual_smooth"):
        ScoreSettings(residual_smooth=2)


def test_positive_residual_sign_keeps_tissue_brighter_than_its_reconstruction_only():
    """residual_sign positive: a bright lesion the model healed scores its full difference, a dark
    patch it healed (a bias dip, partial volume) scores 0; ``abs`` scores both."""
    scheduler = make_scheduler(prediction_type="sample")
    healthy = torch.full((1, 2, 16, 16), 0.5)
    x = healthy.clone()
    x[:, :, 2:6, 2:6] = 0.9    # brighter than healthy: a FLAIR/T2 lesion
    x[:, :, 10:14, 10:14] = 0.2  # darker than healthy
    for sign, dark in (("abs", 0.3), ("positive", 0.0)):
        scorer = Scorer(Oracle(scheduler, healthy), scheduler, make_noise("gaussian", seed=1),
                        ScoreSettings(sampler="x0", t_start=100, residual_sign=sign))
        residual, recon = reconstruct(scorer, x, noise_streams(scorer, "s"))
        torch.testing.assert_close(recon, healthy)
        torch.testing.assert_close(residual[:, :, 2:6, 2:6], torch.full((1, 2, 4, 4), 0.4))
        torch.testing.assert_close(residual[:, :, 10:14, 10:14], torch.full((1, 2, 4, 4), dark))
        assert float(residual[:, :, 7:9].abs().max()) < 1e-6
    with pytest.raises(InputError, match="residual_sign"):
        ScoreSettings(residual_sign="negative")
