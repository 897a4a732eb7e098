"""Score stage: samplers checked against an oracle model, anomaly maps, and maps written in the
input's space after a tiny training run (32x32, 4 mm synthetic data)."""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_train import tiny

from pipeline.bundle import run_bundle
from pipeline.data.dataset import PreprocessConfig, load_subjects
from pipeline.data.transforms import preprocess_transforms
from pipeline.errors import InputError, find_input_error
from pipeline.model.network import diffusion_unet, make_scheduler
from pipeline.model.noise import make_noise
from pipeline.scoring.maps import invert_to_original, preprocess_subject, read_index
from pipeline.scoring.samplers import ddim_reconstruct, ddim_timesteps, ddpm_reconstruct, noise_to
from pipeline.scoring.score import (SAMPLERS, Scorer, anomaly_map, load_scorer, noise_streams, reconstruct, score_split,
                                    score_subject)
from pipeline.scoring.settings import SAMPLER_NAMES, ScoreSettings

PREPROCESS = PreprocessConfig(image_size=32, pixdim=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one thread; on a busy shared machine, two threads
    contending for cores made each network call ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Oracle:
    """A perfect denoiser for inputs whose clean version is ``x0``: returns the exact target
    (epsilon, x0 or v, as the scheduler's prediction type says) for any noisy x_t."""

    def __init__(self, scheduler, x0: torch.Tensor):
        self.scheduler, self.x0 = scheduler, x0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.scheduler.alphas_cumprod.to(x_t)[t].view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        kind = self.scheduler.prediction_type
        if kind == "sample":
            return self.x0.expand_as(x_t)
        if kind == "v_prediction":
            return abar.sqrt() * eps - (1 - abar).sqrt() * self.x0
        return eps


def _slices(n=3, size=16, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("t_start", [1, 50, 250, 999])
def test_oracle_ddim_reconstructs_exactly(prediction, t_start):
    scheduler = make_scheduler("linear", prediction_type=prediction)
    for dtype in (torch.float64, torch.float32):
        x0 = _slices(dtype=dtype)
        # float32 rounding is amplified by 1/sqrt(alphas_cumprod[t]) when x0 is recovered from x_t
        atol = 1e-9 if dtype == torch.float64 else 2e-6 / float(scheduler.alphas_cumprod[t_start]) ** 0.5
        for steps in (1, 2, 10, 1000):
            recon = ddim_reconstruct(Oracle(scheduler, x0), x0, t_start, scheduler, make_noise("gaussian"),
                                     ScoreSettings(ddim_steps=steps))
            assert recon.dtype == dtype and recon.shape == x0.shape
            torch.testing.assert_close(recon, x0, atol=atol, rtol=0)


def test_ddim_timesteps_start_at_t_start_and_descend():
    assert ddim_timesteps(250, 1) == [250]
    assert ddim_timesteps(250, 10) == [250, 225, 200, 175, 150, 125, 100, 75, 50, 25]
    assert ddim_timesteps(3, 10) == [3, 2, 1, 0]  # never more steps than there are timesteps
    for t, k in [(999, 7), (20, 2), (1, 1)]:
        ts = ddim_timesteps(t, k)
        assert ts[0] == t and len(ts) == min(k, t + 1) and all(a > b for a, b in zip(ts, ts[1:]))


def test_noise_to_matches_the_forward_process():
    scheduler = make_scheduler()
    x0, eps = _slices(), _slices(seed=1)
    abar = float(scheduler.alphas_cumprod[100])
    torch.testing.assert_close(noise_to(x0, 100, scheduler, eps), abar**0.5 * x0 + (1 - abar) ** 0.5 * eps)


def test_ddpm_oracle_and_reproducible_with_seed():
    scheduler = make_scheduler()
    x0 = _slices(n=2)
    # exact up to MONAI's float32 step coefficients (beta_0 / (1 - alphas_cumprod[0]) ~ 1 +- 1e-3)
    recon = ddpm_reconstruct(Oracle(scheduler, x0), x0, 5, scheduler, make_noise("gaussian"), ScoreSettings())
    torch.testing.assert_close(recon, x0, atol=2e-3, rtol=0)

    torch.manual_seed(0)
    net = diffusion_unet(16, 1, (32, 32), (False, False)).eval()
    runs = [ddpm_reconstruct(net, x0, 3, scheduler, make_noise("simplex", image_size=16, seed=s), ScoreSettings())
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # the reverse noise alone is seeded too: same start noise, other generator -> other result
    other = ddpm_reconstruct(net, x0, 3, scheduler, make_noise("simplex", image_size=16, seed=3), ScoreSettings(),
                             generator=torch.Generator().manual_seed(99))
    assert not torch.equal(runs[0], other)


def test_every_sampler_is_registered_with_one_signature():
    assert set(SAMPLERS) == {"x0", "ddim", "ddpm", "patched", "guided", "classifier_guided"} and SAMPLER_NAMES == (*SAMPLERS, "flair")
    signatures = {name: inspect.signature(fn) for name, fn in SAMPLERS.items()}
    assert len(set(map(str, signatures.values()))) == 1, signatures
    assert list(signatures["x0"].parameters) == ["model", "x0", "t_start", "scheduler", "noise_generator", "settings",
                                                 "generator"]
    assert all(fn.__doc__.strip() for fn in SAMPLERS.values())


def test_unknown_sampler_is_refused_naming_the_registered_ones():
    with pytest.raises(InputError) as info:
        ScoreSettings(sampler="euler")
    assert info.value.source == "sampler" and "euler" in info.value.problem
    assert all(name in info.value.problem for name in SAMPLER_NAMES)


def test_reconstruct_runs_the_registered_sampler_on_every_stream(monkeypatch):
    """Dispatch goes through the registry with the common arguments, one call per level and draw."""
    calls = []

    def fake(model, x0, t_start, scheduler, noise_generator, settings, generator=None):
        calls.append((t_start, noise_generator.seed, generator.initial_seed()))
        return x0 * 0.5

    monkeypatch.setitem(SAMPLERS, "ddim", fake)
    scorer = Scorer(None, make_scheduler(), make_noise("gaussian"), ScoreSettings(t_start=[5, 9], n_draws=2))
    x = _slices()
    residual, recon = reconstruct(scorer, x, noise_streams(scorer, "s"))
    torch.testing.assert_close(residual, x * 0.5)
    torch.testing.assert_close(recon, x * 0.5)
    assert [t for t, _, _ in calls] == [5, 5, 9, 9] and all(seed == gen for _, seed, gen in calls)
    assert calls[0][1] != calls[1][1] and calls[0][1] == calls[2][1]  # draws differ, levels share them


# ----------------------------------------------------------------------------------------------
# anomaly maps


def _head(size=32) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 'healthy' slice and its brain mask (a disc)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    brain = (r2 < (0.4 * size) ** 2).float()[None, None]
    image = (0.4 + 0.2 * torch.sin(xx / 4.0) * torch.cos(yy / 5.0))[None, None] * brain
    return image, brain


def test_inserted_blob_scores_higher_than_healthy_tissue():
    scheduler = make_scheduler()
    healthy, brain = _head()
    blob = torch.zeros_like(healthy)
    blob[..., 12:17, 18:23] = 0.5
    oracle = Oracle(scheduler, healthy)  # knows only the healthy anatomy: it "heals" the blob
    maps = {}
    for name, x in (("healthy", healthy), ("blob", (healthy + blob).clamp(0, 1))):
        recon = ddim_reconstruct(oracle, x, 250, scheduler, make_noise("gaussian"), ScoreSettings(ddim_steps=10))
        maps[name] = anomaly_map(x, recon, brain)
    inside = blob > 0
    assert maps["blob"][inside].mean() > 0.3
    assert maps["blob"][~inside].mean() < 0.01
    assert maps["healthy"].max() < 1e-3
    assert maps["blob"].sum() > 100 * maps["healthy"].sum()


def test_anomaly_map_masks_filters_and_averages_draws():
    x = torch.zeros(2, 2, 16, 16)
    brain = torch.zeros(2, 1, 16, 16)
    brain[..., 2:14, 2:14] = 1
    recon = x.clone()
    recon[0, 1, 8, 8] = 1.0  # single-pixel spike: removed by the median filter
    recon[1, 0, 4:9, 4:9] = 0.6  # a patch in one channel: kept
    recon[:, :, 2, :] = 1.0  # on the brain rim: removed by the erosion
    out = anomaly_map(x, recon, brain, erode_iters=1, median_size=3, reduce="max")
    assert out.shape == (2, 1, 16, 16)
    assert out[0].max() == 0
    assert out[1, 0, 6, 6] == pytest.approx(0.6)
    assert out[..., :3, :].max() == 0
    mean = anomaly_map(x, recon, brain, reduce="mean")
    assert mean[1, 0, 6, 6] == pytest.approx(0.3)
    two = anomaly_map(x, [recon, x], brain, median_size=1)  # two draws, one with no residual
    assert two[1, 0, 6, 6] == pytest.approx(0.3)
    for bad in (dict(reduce="sum"), dict(median_size=4), dict(erode_iters=-1)):
        with pytest.raises(InputError):
            anomaly_map(x, recon, brain, **bad)


# ----------------------------------------------------------------------------------------------
# whole subjects and splits (tiny trained model)


def _reoriented_copy(src: Path, dst: Path, subject: str) -> None:
    """Write a copy of an MSD subject stored LPS with swapped in-plane axes (x <-> y) and
    anisotropic voxels, so inversion has orientation, spacing and cropping to undo."""
    for folder in ("imagesTr", "labelsTr"):
        img = nib.load(src / folder / f"{subject}.nii.gz")
        data = np.asarray(img.dataobj)
        data = np.swapaxes(data[::-1, ::-1], 0, 1)
        affine = np.array([[0, -4.0, 0, 120], [-4.5, 0, 0, 130], [0, 0, 4.0, -76], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), dst / folder / f"{subject}.nii.gz")


def test_inverted_maps_overlay_the_input(synth_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    item = next(i for i in load_subjects(data).data if np.asarray(nib.load(i["label"]).dataobj).any())
    _reoriented_copy(synth_root / "Task01_BrainTumour", data / "Task01_BrainTumour", item["subject"])
    transform = preprocess_transforms(PREPROCESS, with_label=True)
    out = preprocess_subject(item, transform)
    # the whole-tumour mask, inverted from the grid, lands on the input's own label
    back = invert_to_original(out["tumour"].float().as_tensor(), out["image"], transform)
    label = nib.load(item["label"])
    assert tuple(back.shape[1:]) == label.shape
    np.testing.assert_allclose(np.asarray(back.affine), label.affine, atol=1e-5)
    pred, truth = back[0].numpy() > 0.5, np.asarray(label.dataobj) > 0
    assert truth.sum() > 0 and 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.7


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared_score")


@pytest.fixture(scope="module")
def trained(synth_root, shared, tmp_path_factory) -> dict:
    """One tiny training run (1 epoch), reused by every scoring test below."""
    out = tmp_path_factory.mktemp("trained")
    settings = tiny(synth_root, out, shared)
    run_bundle("train", **settings)
    return settings


def test_inference_bundle_writes_maps_in_input_space(trained, synth_root):
    flow = run_bundle("inference", **trained, sampler="ddim", ddim_steps=2, t_start=20, score_threshold=0.1)
    scores = Path(trained["output_dir"]) / "scores"
    index = read_index(scores)
    split = flow.parser.get_parsed_content("prepared").split
    assert set(index["subjects"]) == set(split["validation"]) | set(split["test"])
    assert index["settings"]["sampler"] == "ddim" and index["settings"]["t_start"] == 20
    by_subject = {i["subject"]: i for i in load_subjects(synth_root).data}
    for subject, entry in index["subjects"].items():
        assert entry["files"]["score"] == f"{entry['section']}/{subject}_score.nii.gz"
        assert entry["seconds"] > 0
        source = nib.load(by_subject[subject]["image"])
        score = nib.load(scores / entry["files"]["score"])
        mask = nib.load(scores / entry["files"]["mask"])
        for written, dtype in ((score, np.float32), (mask, np.uint8)):
            assert written.shape == source.shape[:3]
            np.testing.assert_array_equal(written.affine, source.affine)
            assert written.get_data_dtype() == dtype
        values = score.get_fdata()
        brain = (np.asarray(source.dataobj) != 0).any(-1)
        assert np.isfinite(values).all() and values.min() >= 0 and values[brain].max() > 0
        assert values[~brain].mean() < values[brain].mean()
        np.testing.assert_array_equal(np.asarray(mask.dataobj), (values >= 0.1).astype(np.uint8))
        slices = np.load(scores / entry["files"]["slices"])
        assert {"image", "recon", "map", "brain", "tumour", "z"} <= set(slices.files)
    assert not [p for p in scores.parent.iterdir() if p.name.startswith(".scores")]  # no temp folders left


def _score_kwargs(trained: dict, **extra) -> dict:
    """score_split's arguments on the tiny model; ``sampler``, ``ddim_steps``, ``t_start``, ``settings`` and
    ``model_path`` go to its scorer (built here, so a refused setting raises inside the caller's check)."""
    score = {k: extra.pop(k) for k in ("sampler", "ddim_steps", "t_start") if k in extra}
    settings = extra.pop("settings", None) or ScoreSettings(**{"ddim_steps": 1, "t_start": 10, **score})
    model_path = extra.pop("model_path", Path(trained["ckpt_dir"]) / "model.pt")
    scorer = load_scorer(diffusion_unet(32, 1, (32, 32, 32)), model_path, make_scheduler(), make_noise("gaussian"),
                         settings, PREPROCESS)
    kwargs = dict(dataset_dir=trained["dataset_dir"], split=json.loads(Path(trained["split_file"]).read_text()),
                  scorer=scorer, out_dir=Path(trained["output_dir"]) / "other_scores", sections=("validation",),
                  progress=False)
    kwargs.update(extra)
    return kwargs


def test_checkpoint_from_other_config_is_refused(trained):
    with pytest.raises(Exception) as info:
        run_bundle("inference", **{**trained, "unet_channels": [32, 64, 64]})
    found = find_input_error(info.value)  # the model card names the contradiction before any weight is read
    assert found is not None and "unet_channels=[32, 64, 64] (trained with [32, 32, 32])" in found.problem
    assert found.source == str(Path(trained["ckpt_dir"]) / "model.card.json")
    Path(trained["ckpt_dir"], "model.card.json").rename(Path(trained["ckpt_dir"], "card.bak"))
    try:  # a model without a card (trained before cards), allowed explicitly: the weights themselves refuse the shape
        with pytest.raises(Exception) as info:
            run_bundle("inference", **{**trained, "unet_channels": [32, 64, 64], "allow_missing_card": True})
    finally:
        Path(trained["ckpt_dir"], "card.bak").rename(Path(trained["ckpt_dir"], "model.card.json"))
    found = find_input_error(info.value)
    assert found is not None and "does not match" in found.problem
    assert found.source == str(Path(trained["ckpt_dir"]) / "model.pt")


@pytest.mark.parametrize("change,message", [
    (dict(split={"train": ["BRATS_001"], "validation": ["BRATS_002"], "test": []}, sections=("validation", "test")),
     "no test subjects"),
    (dict(t_start=0), "t_start"),
    (dict(t_start=1000), r"\[1, 999\]"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(ddim_steps=0), "ddim_steps"),
    (dict(sections=("holdout",)), "unknown section"),
    (dict(model_path="/nonexistent/model.pt"), "checkpoint not found"),
])
def test_bad_settings_are_refused(trained, change, message):
    with pytest.raises(InputError, match=message):
        score_split(**_score_kwargs(trained, **change))


@pytest.mark.parametrize("bad,name", [
    (dict(median_3d=4), "median_3d"), (dict(residual_norm="global"), "residual_norm"),
    (dict(sampler="patched"), "patch_size"), (dict(t_start=[]), "t_start"), (dict(t_start=[100, 0]), "t_start"),
    (dict(component_quantile=1.0), "component_quantile"), (dict(min_component_voxels=-1), "min_component_voxels"),
])
def test_bad_map_settings_name_the_setting(bad, name):
    with pytest.raises(InputError) as info:
        ScoreSettings(**bad)
    assert info.value.source == name


def test_ddpm_subject_scores_repeat_with_the_seed(trained):
    kwargs = _score_kwargs(trained, sampler="ddpm", t_start=1)
    scorer = replace(kwargs["scorer"], noise_generator=make_noise("gaussian", seed=3))
    item = next(i for i in load_subjects(trained["dataset_dir"]).data if i["subject"] == kwargs["split"]["test"][0])
    transform = preprocess_transforms(PREPROCESS, with_label=True)
    runs = [score_subject(item, transform, scorer) for _ in range(2)]
    assert np.array_equal(runs[0].score, runs[1].score) and runs[0].score.max() > 0
    assert runs[0].score.shape == nib.load(item["image"]).shape[:3]
    assert runs[0].grid["map"].shape == (1, 32, 32, runs[0].grid["image"].shape[-1])


def test_calibrated_patched_ensemble_scores_and_records_reconstruction(trained):
    """Every optional map step at once, through score_split: healthy calibration from the cache's
    validation slices, patched sampler, a t_L ensemble, 3D median and the component filter."""
    cache = next(Path(trained["cache_dir"]).glob("*/cache.json")).parent
    settings = ScoreSettings(sampler="patched", patch_size=16, t_start=[5, 10], ddim_steps=1, residual_norm="intensity",
                             median_3d=3, min_component_voxels=3)
    kwargs = _score_kwargs(trained, settings=settings, sections=("validation", "test"))
    out = score_split(**{**kwargs, "calibration_cache": cache, "out_dir": Path(trained["output_dir"]) / "calibrated"})
    index = read_index(out)
    assert index["settings"]["t_start"] == [5, 10] and index["settings"]["calibration"]["residual_norm"] == "intensity"
    assert index["settings"]["calibration"]["component_threshold"] > 0
    with np.load(out / "calibration.npz") as stats:
        assert stats["mean"].shape == stats["std"].shape == (1, 42) and (stats["std"] > 0).all()
    for entry in index["subjects"].values():
        recon = entry["recon"]
        assert recon["healthy_voxels"] > 0 and recon["healthy_residual_sum"] > 0 and recon["healthy_slices"] > 0
        assert 0 < recon["ssim_sum"] <= recon["healthy_slices"]
    with pytest.raises(InputError, match="calibration_cache"):
        score_split(**kwargs)


def test_two_process_sharded_scoring_equals_single_process(trained):
    """`pipeline score --nproc 2`'s overlay: each gloo rank scores half the subjects, rank 0 merges;
    the merged folder holds the same maps and index as one process writes."""
    import os
    import subprocess
    import sys

    from test_train import REPO, as_cli

    from pipeline.bundle import config_files

    settings = {**trained, "sampler": "x0", "t_start": 10, "residual_norm": "position", "median_3d": 3}
    single = Path(trained["output_dir"]) / "single"
    run_bundle("inference", **settings, scores_dir=str(single))
    sharded = Path(trained["output_dir"]) / "sharded"
    files = "[" + ",".join(f"'{f}'" for f in config_files("multi_gpu_inference")) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           "-m", "monai.bundle", "run", "--config_file", files, *as_cli({**settings, "scores_dir": str(sharded)})]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_index(single), read_index(sharded)
    assert list(one["subjects"]) == list(two["subjects"]) and one["settings"] == two["settings"]
    for name, row in one["subjects"].items():
        assert row["files"] == two["subjects"][name]["files"] and row["recon"] == two["subjects"][name]["recon"]
        np.testing.assert_array_equal(nib.load(single / row["files"]["score"]).get_fdata(),
                                      nib.load(sharded / row["files"]["score"]).get_fdata())
    assert (sharded / "calibration.npz").is_file()
    assert not [p for p in sharded.parent.iterdir() if ".rank" in p.name]  # the shards were merged away
