"""Score stage: partial-diffusion reconstruction -> residual anomaly maps -> NIfTI in the input's space.

A slice is noised to step ``t_L`` and denoised back to 0 by a model trained only on healthy
slices; what the model cannot reproduce (a tumour it "heals") shows up in ``|x - reconstruction|``.

* Samplers live in :mod:`pipeline.scoring.samplers` (one plain function each, one signature; the guided
  ones in :mod:`pipeline.scoring.guided` and :mod:`pipeline.scoring.classifier_guided`) and are looked up by name in :data:`SAMPLERS`; residual
  post-processing lives in :mod:`pipeline.scoring.postprocess`, the files written in :mod:`pipeline.scoring.maps`.
  This module runs them over subjects.
* All settings of how a map is made are one :class:`pipeline.scoring.settings.ScoreSettings` (the bundle builds it); what a
  run scores with (model, scheduler, noise, settings, calibration) is one :class:`Scorer`.
* Noise is seeded per subject, noise level and draw (from the run's seed and the subject id), so
  a subject scores the same alone or inside a split, in any order.
* Healthy calibration: residual normalisation and the small-component filter need to know what
  residuals look like on healthy tissue; they are measured on the healthy slices of the
  validation subjects (the slice cache), never on test.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from tqdm.auto import tqdm

from pipeline.atomic import atomic_dir
from pipeline.common import BASELINE, CLASSIFIER_GUIDED, GUIDED, SECTIONS  # BASELINE: FLAIR intensity (Meissen et al. 2021), no model
from pipeline.data.dataset import PreprocessConfig, load_subjects
from pipeline.data.slice_cache import SliceDataset
from pipeline.data.transforms import preprocess_transforms
from pipeline.errors import InputError
from pipeline.model.checkpoint import load_checkpoint, load_state, rank_and_world
from pipeline.model.noise import NoiseGenerator
from pipeline.scoring.classifier_guided import classifier_guided_reconstruct
from pipeline.scoring.guided import guided_reconstruct
from pipeline.scoring.maps import (SubjectScore, axial_slices, invert_to_original, merge_shards, preprocess_subject,
                                   save_subject, to_volume, write_index)
from pipeline.scoring.memory import SliceCost, memory_budget, with_amp
from pipeline.scoring.postprocess import (HealthyResidualStats, erode, map_from_residual, postprocess_volume,
                                          rectify, smooth_signed,
                                          reduce_channels)
from pipeline.scoring.samplers import Model, ddim_reconstruct, ddpm_reconstruct, patched_reconstruct, x0_reconstruct
from pipeline.scoring.settings import AUTO_BATCH, ScoreSettings

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "x0": x0_reconstruct, "ddim": ddim_reconstruct, "ddpm": ddpm_reconstruct, "patched": patched_reconstruct,
    GUIDED: guided_reconstruct, CLASSIFIER_GUIDED: classifier_guided_reconstruct}
"""Sampler name -> function, all with the signature ``fn(model, x0, t_start, scheduler, noise_generator,
settings, generator=None)`` (:mod:`pipeline.scoring.samplers`). Kept here rather than in samplers.py: the guided sampler builds on samplers.py, so only a
module that imports both can list them all without an import cycle or a lazy import."""


# ----------------------------------------------------------------------------------------------
# residuals and maps


def draw_seed(base_seed: int, subject: str, draw: int) -> int:
    """Seed for one subject and noise draw: independent of which other subjects are scored."""
    digest = hashlib.sha256(f"{int(base_seed)}:{subject}:{int(draw)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def noise_streams(scorer: Scorer, key: str) -> list[tuple[int, NoiseGenerator, torch.Generator]]:
    """One (noise level, noise generator, torch generator) per level and draw, seeded from ``key``.

    Every level of a t_L ensemble reuses the draw's seed (common random numbers), so levels differ
    only by how far they noise. The streams advance over the batches of one subject.
    """
    settings, noise = scorer.settings, scorer.noise_generator
    streams = []
    for t in settings.levels:
        for d in range(settings.n_draws):
            seed = draw_seed(noise.seed, key, d)
            streams.append((t, noise.with_seed(seed), torch.Generator(device=scorer.device).manual_seed(seed)))
    return streams


def reconstruct(scorer: Scorer, x: torch.Tensor, streams) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel residual |x - recon| averaged over noise levels and draws, mean reconstruction).

    With ``residual_smooth`` k > 1 the signed difference is averaged over k x k pixels before it is rectified
    (:func:`pipeline.scoring.postprocess.smooth_signed`); ``residual_sign: positive`` keeps only x > recon.

    ``streams`` comes from :func:`noise_streams`. The baseline "reconstructs" its FLAIR channel as
    black: its residual is the FLAIR intensity itself.
    """
    settings = scorer.settings
    if settings.sampler == BASELINE:
        flair = x[:, scorer.flair_index:scorer.flair_index + 1]
        return flair.clone(), torch.zeros_like(flair)
    sampler = SAMPLERS[settings.sampler]
    residual, recon_sum = torch.zeros_like(x), torch.zeros_like(x)
    for t, noise, generator in streams:
        recon = sampler(scorer.model, x, t, scorer.scheduler, noise, settings, generator)
        residual += rectify(smooth_signed(x - recon, settings.residual_smooth), settings.residual_sign)
        recon_sum += recon
    return residual / len(streams), recon_sum / len(streams)


def anomaly_map(x: torch.Tensor, recon: torch.Tensor | Sequence[torch.Tensor], brain: torch.Tensor,
                erode_iters: int = 1, median_size: int = 3, reduce: str = "max") -> torch.Tensor:
    """|x - recon| reduced over channels, averaged over reconstructions (noise draws), inside the
    eroded brain, median-filtered: :func:`pipeline.scoring.postprocess.map_from_residual` for ready reconstructions."""
    settings = ScoreSettings(erode_iters=erode_iters, median_size=median_size, reduce=reduce)
    recons = [recon] if isinstance(recon, torch.Tensor) else list(recon)
    residual = torch.stack([(x - r).abs() for r in recons]).mean(dim=0)
    return map_from_residual(residual, x, brain, settings)


# ----------------------------------------------------------------------------------------------
# what a run scores with; healthy calibration (validation subjects' healthy slices)


@dataclass
class Calibration:
    """What healthy validation slices say about residuals: normalisation statistics and the
    map level above which small components are removed."""

    stats: HealthyResidualStats | None = None
    component_threshold: float | None = None

    def to_dict(self) -> dict:
        return {"residual_norm": self.stats.mode if self.stats else "none",
                "component_threshold": self.component_threshold}


@dataclass(frozen=True, eq=False)
class Scorer:
    """What a run scores with, fixed once built (:func:`load_scorer`): the model (None for the
    baseline) and its scheduler, the noise, the settings, the preprocessing the model was trained
    on, where to compute, and the healthy calibration. ``model_path`` is recorded in the index."""

    model: Model | None
    scheduler: Any
    noise_generator: NoiseGenerator
    settings: ScoreSettings = ScoreSettings()
    preprocess: PreprocessConfig = PreprocessConfig()
    device: str | torch.device = "cpu"
    calibration: Calibration = field(default_factory=Calibration)
    model_path: str | None = None

    @property
    def flair_index(self) -> int:
        """The baseline's channel (FLAIR among the modalities); 0 for the samplers."""
        return flair_channel(self.preprocess) if self.settings.sampler == BASELINE else 0


def flair_channel(preprocess: PreprocessConfig) -> int:
    """Index of FLAIR among the selected modalities (the baseline's channel)."""
    if "FLAIR" not in preprocess.modalities:
        raise InputError("sampler", f"the FLAIR baseline needs FLAIR among the modalities, got {list(preprocess.modalities)}")
    return list(preprocess.modalities).index("FLAIR")


def calibrate(scorer: Scorer, cache_dir: str | os.PathLike | None, progress: bool = True) -> Calibration:
    """Reconstruct the cached healthy validation slices with ``scorer`` and measure their residuals."""
    settings = scorer.settings
    if not settings.needs_calibration:
        return Calibration()
    if cache_dir is None:
        raise InputError("residual_norm", "residual normalisation and the component filter need the slice cache "
                                          "of healthy validation slices (calibration_cache)")
    dataset = SliceDataset(cache_dir, "validation")
    if len(dataset) == 0:
        raise InputError(Path(cache_dir) / "validation_images.npy", "no healthy validation slices to calibrate on")
    x_all = torch.from_numpy(np.array(dataset.images, dtype=np.float32))
    streams = noise_streams(scorer, "calibration")
    residuals = []
    for i in tqdm(range(0, len(x_all), settings.batch_size), desc="calibrate on healthy validation slices",
                  disable=not progress):
        x = x_all[i:i + settings.batch_size].to(scorer.device)
        residuals.append(reconstruct(scorer, x, streams)[0].cpu())
    residual = torch.cat(residuals)
    brain = (x_all > 0).any(dim=1, keepdim=True).float()
    stats = HealthyResidualStats.fit(settings.residual_norm, residual, x_all, brain) \
        if settings.residual_norm != "none" else None
    maps = map_from_residual(residual, x_all, brain, settings, stats)
    inside = erode(brain, settings.erode_iters) > 0
    threshold = float(torch.quantile(maps[inside][::max(1, int(inside.sum()) // 1_000_000)],
                                     float(settings.component_quantile)))
    return Calibration(stats=stats, component_threshold=threshold)


# ----------------------------------------------------------------------------------------------
# one subject


def score_subject(item: dict, transform, scorer: Scorer) -> SubjectScore:
    """Anomaly map of one subject, in the original image space (same shape and affine as its image).

    ``transform`` is ``preprocess_transforms(cfg, with_label=...)``; only slices holding brain go
    through the sampler, in batches. The map volume is then inverted through ``transform``.
    """
    start = time.perf_counter()
    settings, flair = scorer.settings, scorer.flair_index
    data = preprocess_subject(item, transform)
    image, brain = data["image"], data["brain"]
    z = torch.nonzero(torch.as_tensor(brain)[0].flatten(0, 1).any(dim=0)).flatten()
    x_all, brain_all = axial_slices(image, z), axial_slices(brain, z)
    streams = noise_streams(scorer, item["subject"])
    maps, recons, residuals = [], [], []
    for i in range(0, len(z), settings.batch_size):
        x = x_all[i:i + settings.batch_size].to(scorer.device)
        residual, recon = reconstruct(scorer, x, streams)
        maps.append(map_from_residual(residual, x if settings.sampler != BASELINE else x[:, flair:flair + 1],
                                      brain_all[i:i + settings.batch_size].to(scorer.device), settings,
                                      scorer.calibration.stats).cpu())
        recons.append(recon.cpu())
        residuals.append(residual.cpu())
    grid_map = postprocess_volume(to_volume(maps, z, (1, *image.shape[1:])), settings,
                                  scorer.calibration.component_threshold, torch.as_tensor(brain))
    recon_all, residual_all = torch.cat(recons), torch.cat(residuals)  # the checks refuse a brain-free image
    recon_volume = to_volume(recons, z, (recon_all.shape[1], *image.shape[1:]))
    grid = {"image": image.as_tensor().numpy(), "recon": recon_volume.numpy(),
            "map": grid_map.numpy(), "brain": brain.as_tensor().numpy()}
    for key in ("label", "tumour"):
        if key in data:
            grid[key] = data[key].as_tensor().numpy()
    stats = reconstruction_stats(x_all, recon_all, residual_all, brain_all,
                                 axial_slices(data["tumour"], z) if "tumour" in data else None, settings)
    score = invert_to_original(grid_map, image, transform)
    return SubjectScore(subject=item["subject"], source=str(item["image"]),
                        score=score.as_tensor()[0].numpy().astype(np.float32),
                        affine=np.asarray(score.affine, dtype=np.float64), grid=grid,
                        seconds=time.perf_counter() - start, recon_stats=stats)


def reconstruction_stats(x: torch.Tensor, recon: torch.Tensor, residual: torch.Tensor, brain: torch.Tensor,
                         tumour: torch.Tensor | None, settings: ScoreSettings) -> dict:
    """Threshold-free figures of how well healthy anatomy is reconstructed, as sums over the
    subject (the evaluation pools them): raw residual (reduced over channels like the map) on
    healthy and on tumour brain voxels, and PSNR / SSIM (data range 1) over tumour-free brain slices."""
    reduced = reduce_channels(residual, settings.reduce)
    inside = brain > 0
    sick = tumour > 0 if tumour is not None else torch.zeros_like(inside)
    healthy_voxels, tumour_voxels = inside & ~sick, inside & sick
    clean = ~sick.flatten(1).any(dim=1)
    stats = {"healthy_residual_sum": float(reduced[healthy_voxels].sum()), "healthy_voxels": int(healthy_voxels.sum()),
             "tumour_residual_sum": float(reduced[tumour_voxels].sum()), "tumour_voxels": int(tumour_voxels.sum()),
             "psnr_sum": 0.0, "ssim_sum": 0.0, "healthy_slices": 0}
    if settings.sampler != BASELINE and clean.any():  # the baseline reconstructs nothing: no PSNR / SSIM
        stats["healthy_slices"] = int(clean.sum())
        target, output = x[clean], recon[clean].clamp(0, float(x.max()))
        stats["psnr_sum"] = float(PSNRMetric(max_val=1.0, reduction="none")(output, target).sum())
        stats["ssim_sum"] = float(SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7, reduction="none")(output, target).sum())
    return stats


# ----------------------------------------------------------------------------------------------
# a split (the bundle's inference entry point)


def load_model(network: torch.nn.Module, model_path: str | os.PathLike) -> torch.nn.Module:
    """EMA weights from ``model_path`` into ``network`` (eval mode); a mismatch names the file."""
    load_state(network, load_checkpoint(model_path), model_path)
    return network.eval()


def load_scorer(network: torch.nn.Module, model_path: str | os.PathLike, scheduler, noise_generator: NoiseGenerator,
                settings: ScoreSettings = ScoreSettings(), preprocess: PreprocessConfig = PreprocessConfig(),
                device: str | torch.device = "cpu", amp: bool = False, memory_gb: float | None = None) -> Scorer:
    """The run's :class:`Scorer`, not yet calibrated: noise levels checked against the scheduler,
    then the weights loaded (none for the baseline, which needs FLAIR among the modalities instead).
    ``amp``: the network runs under autocast on a GPU (:func:`pipeline.scoring.memory.with_amp`);
    ``memory_gb``: the budget of ``batch_size`` ``auto`` (:func:`with_auto_batch_size`)."""
    settings.check_levels(scheduler.num_train_timesteps)
    baseline = settings.sampler == BASELINE
    if baseline:
        flair_channel(preprocess)  # refused before anything runs
    model = None if baseline else with_amp(load_model(network, model_path), amp, device)
    scorer = Scorer(model, scheduler, noise_generator, settings, preprocess, torch.device(device),
                    model_path=None if baseline else str(model_path))
    return with_auto_batch_size(scorer, memory_gb)


def with_auto_batch_size(scorer: Scorer, memory_gb: float | None = None) -> Scorer:
    """``batch_size: auto`` replaced by the largest batch whose sampler call fits the memory budget, measured
    on one network call per slice (:mod:`pipeline.scoring.memory`; ddpm and multi-step samplers call the
    network one batch at a time too). The maps do not depend on the batch size."""
    if scorer.settings.batch_size != AUTO_BATCH:
        return scorer
    settings = scorer.settings
    single = replace(settings, batch_size=1, t_start=settings.levels[0], n_draws=1, ddim_steps=1,
                     sampler="ddim" if settings.sampler == "ddpm" else settings.sampler)
    probe = replace(scorer, settings=single)
    size = int(scorer.preprocess.image_size)

    def call(n: int):  # its own generator: the probe leaves the global random state alone
        generator = torch.Generator(device=scorer.device).manual_seed(0)
        x = torch.rand((n, scorer.preprocess.channels, size, size), device=scorer.device, generator=generator)
        return reconstruct(probe, x, noise_streams(probe, "memory probe"))

    batch = SliceCost.measure(call).largest_batch(memory_budget(scorer.device, memory_gb))
    return replace(scorer, settings=replace(settings, batch_size=batch))


def _check_sections(sections, split: dict) -> list[str]:
    sections = [sections] if isinstance(sections, str) else list(sections)
    for section in sections:
        if section not in SECTIONS:
            raise InputError("score_sections", f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        if not split.get(section):
            raise InputError("split", f"no {section} subjects")
    return sections


def _subject_jobs(dataset_dir: str | os.PathLike, split: dict, sections) -> list[tuple[str, dict]]:
    """(section, subject item) pairs to score, in split order; every name must be in the dataset."""
    sections = _check_sections(sections, split)
    by_subject = {item["subject"]: item for item in load_subjects(dataset_dir).data}
    unknown = sorted({s for section in sections for s in split[section]} - set(by_subject))
    if unknown:
        raise InputError("split", f"names subjects not in the dataset: {', '.join(unknown[:5])}")
    return [(section, by_subject[name]) for section in sections for name in split[section]]


def score_split(dataset_dir: str | os.PathLike, split: dict, scorer: Scorer, out_dir: str | os.PathLike,
                sections: Sequence[str] = ("validation", "test"), threshold: float | None = None,
                calibration_cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Score every subject of ``sections``; write ``out_dir/<section>/`` maps and ``out_dir/index.json``.

    ``scorer`` comes from :func:`load_scorer`; it is calibrated here on ``calibration_cache``, the
    slice cache whose healthy validation slices calibrate residual normalisation and the component
    filter (needed only when those are on). ``out_dir`` appears only once complete (a failure
    leaves the previous scores, if any, intact). Returns ``out_dir``.
    """
    jobs = _subject_jobs(dataset_dir, split, sections)
    scorer = replace(scorer, calibration=calibrate(scorer, calibration_cache, progress))
    rank, world = rank_and_world()
    progress = progress and rank == 0
    out_dir = Path(out_dir)
    if world == 1:
        with atomic_dir(out_dir) as tmp:
            _write_scores(scorer, tmp, jobs, threshold, progress)
        return out_dir
    part = out_dir.with_name(f".{out_dir.name}.rank{rank}")  # each rank writes its own share, atomically
    with atomic_dir(part) as tmp:
        _write_scores(scorer, tmp, jobs[rank::world], threshold, progress)
    _barrier()
    if rank == 0:
        merge_shards([out_dir.with_name(f".{out_dir.name}.rank{r}") for r in range(world)], out_dir,
                     [item["subject"] for _, item in jobs])
    _barrier()
    return out_dir


def _index_settings(scorer: Scorer, threshold: float | None) -> dict:
    """What made the maps, as the index records it."""
    return {**scorer.settings.to_dict(), "threshold": threshold, "model_path": scorer.model_path,
            "noise": repr(scorer.noise_generator), "prediction_type": str(scorer.scheduler.prediction_type),
            "preprocess": scorer.preprocess.to_dict(), "calibration": scorer.calibration.to_dict()}


def _write_scores(scorer: Scorer, folder: Path, jobs: list[tuple[str, dict]], threshold: float | None,
                  progress: bool) -> None:
    """Score ``jobs`` ((section, subject item) pairs) into ``folder``: maps, index.json, calibration."""
    subjects = {}
    for section, item in tqdm(jobs, desc="score", unit="subject", disable=not progress):
        transform = preprocess_transforms(scorer.preprocess, with_label=bool(item.get("label")))
        result = score_subject(item, transform, scorer)
        files = save_subject(result, folder / section, threshold)
        subjects[result.subject] = {"section": section, "seconds": round(result.seconds, 3),
                                    "files": {k: f"{section}/{v}" for k, v in files.items()},
                                    "recon": result.recon_stats}
    if scorer.calibration.stats is not None:
        np.savez(folder / "calibration.npz", **scorer.calibration.stats.to_arrays())
    write_index(folder, _index_settings(scorer, threshold), subjects)


def _barrier() -> None:
    torch.distributed.barrier()
