"""Score stage: partial-diffusion reconstruction -> residual anomaly maps -> NIfTI in the input's space.

A slice is noised to step ``t_L`` and denoised back to 0 by a model trained only on healthy
slices; what the model cannot reproduce (a tumour it "heals") shows up in ``|x - reconstruction|``.

* Samplers live in :mod:`pipeline.samplers` (one plain function each), residual post-processing in
  :mod:`pipeline.postprocess`; this module runs them over subjects and writes the results.
* All settings of how a map is made are one :class:`ScoreSettings` (the bundle builds it).
* Noise is seeded per subject, noise level and draw (from the run's seed and the subject id), so
  a subject scores the same alone or inside a split, in any order.
* Healthy calibration: residual normalisation and the small-component filter need to know what
  residuals look like on healthy tissue; they are measured on the healthy slices of the
  validation subjects (the slice cache), never on test.
* Maps are built on the preprocessed grid, then put back into the original image space by
  inverting the preprocessing (``monai.transforms.Invertd``) and saved with the input's affine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import PSNRMetric, SSIMMetric
from monai.transforms import Invertd
from tqdm.auto import tqdm

from .atomic import atomic_dir, atomic_path, write_json
from .data import SECTIONS, PreprocessConfig, SliceDataset, describe_failure, load_subjects
from .data import preprocess_transforms
from .errors import InputError
from .noise import NoiseGenerator
from .postprocess import (RESIDUAL_NORMS, HealthyResidualStats, erode, median_filter, median_filter_3d,
                          reduce_channels, remove_small_components)
from .samplers import (Model, ddim_reconstruct, ddim_timesteps, ddpm_reconstruct, noise_to,  # noqa: F401 (re-export)
                       patched_reconstruct, predict_x0_eps, x0_reconstruct)
from .guided import guided_reconstruct
from .train import load_checkpoint, load_state, rank_and_world

SAMPLERS = ("x0", "ddim", "ddpm", "patched", "flair", "guided")
GUIDED = "guided"  # weakly supervised counterfactuals (pipeline.guided): needs a class-conditional model
SUPERVISION = {GUIDED: "weak slice labels"}  # every other sampler: "unsupervised"
BASELINE = "flair"  # FLAIR-intensity threshold baseline (Meissen et al. 2021): no model, map = intensity
REDUCTIONS = ("max", "mean")
INDEX_FORMAT = 2
REPORT_SLICES = 4


# ----------------------------------------------------------------------------------------------
# settings


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ScoreSettings:
    """How an anomaly map is made, checked once when built.

    ``sampler``: ``x0`` (the fast sampler: one call, the model's x0 prediction from x_t),
    ``ddim`` (``ddim_steps`` calls; 1 computes the same as ``x0``), ``guided`` (counterfactual of a
    class-conditional model: DDIM inversion to ``t_start`` and decoding guided towards healthy with
    scale ``guidance_scale``, ``ddim_steps`` calls each way; trained with slice labels),
    ``ddpm`` (AnoDDPM, every step), ``patched`` (pDDPM: one ``patch_size`` patch noised at a time,
    DDIM in ``ddim_steps`` calls) or ``flair`` (the baseline: map = FLAIR intensity, no model).
    ``t_start``: one noise level or several (a t_L ensemble: residuals averaged over levels and
    ``n_draws`` noise draws). Map: channel residuals -> optional healthy-residual z-score
    (``residual_norm``) -> reduce over channels -> eroded brain mask -> 2D median -> 3D median
    (``median_3d``, 1 = off) -> small components (< ``min_component_voxels``) above the
    ``component_quantile`` of healthy validation maps clamped away.
    """

    sampler: str = "ddim"
    t_start: int | tuple[int, ...] = 250
    ddim_steps: int = 10
    n_draws: int = 1
    patch_size: int | None = None
    batch_size: int = 64
    erode_iters: int = 1
    median_size: int = 3
    median_3d: int = 1
    reduce: str = "max"
    residual_norm: str = "none"
    min_component_voxels: int = 0
    component_quantile: float = 0.99
    guidance_scale: float = 3.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise InputError("sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        levels = self.t_start if isinstance(self.t_start, (list, tuple)) else [self.t_start]
        if not levels:
            raise InputError("t_start", "needs at least one noise level")
        object.__setattr__(self, "t_start", tuple(_check_int("t_start", t, 1) for t in levels)
                           if isinstance(self.t_start, (list, tuple)) else _check_int("t_start", self.t_start, 1))
        for name, low in (("ddim_steps", 1), ("n_draws", 1), ("batch_size", 1), ("erode_iters", 0),
                          ("median_3d", 1), ("min_component_voxels", 0)):
            _check_int("score_batch_size" if name == "batch_size" else name, getattr(self, name), low)
        if self.patch_size is not None:
            _check_int("patch_size", self.patch_size, 1)
        elif self.sampler == "patched":
            raise InputError("patch_size", "the patched sampler needs a patch size in pixels")
        for name in ("median_size", "median_3d"):
            value = getattr(self, name)
            if int(value) != value or value < 1 or value % 2 == 0:
                raise InputError(name, f"must be an odd integer >= 1, got {value!r}")
        if self.reduce not in REDUCTIONS:
            raise InputError("map_reduce", f"unknown channel reduction {self.reduce!r}; choose one of {', '.join(REDUCTIONS)}")
        if self.residual_norm not in RESIDUAL_NORMS:
            raise InputError("residual_norm", f"unknown normalisation {self.residual_norm!r}; "
                                              f"choose one of {', '.join(RESIDUAL_NORMS)}")
        if not 0 < float(self.component_quantile) < 1:
            raise InputError("component_quantile", f"must be in (0, 1), got {self.component_quantile!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise InputError("guidance_scale", f"must be a number, got {self.guidance_scale!r}")

    @property
    def supervision(self) -> str:
        """What the method learned from: the leaderboard must not rank weakly supervised entries as unsupervised."""
        return SUPERVISION.get(self.sampler, "unsupervised")

    @property
    def levels(self) -> tuple[int, ...]:
        return self.t_start if isinstance(self.t_start, tuple) else (self.t_start,)

    @property
    def needs_calibration(self) -> bool:
        return self.sampler != BASELINE and (self.residual_norm != "none" or self.min_component_voxels > 1)

    def check_levels(self, num_train_timesteps: int) -> None:
        if max(self.levels) > num_train_timesteps - 1:
            raise InputError("t_start", f"must be in [1, {num_train_timesteps - 1}] (num_train_timesteps="
                                        f"{num_train_timesteps}), got {max(self.levels)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["t_start"] = list(self.levels) if isinstance(self.t_start, tuple) else self.t_start
        d["supervision"] = self.supervision
        return d


# ----------------------------------------------------------------------------------------------
# residuals and maps


def draw_seed(base_seed: int, subject: str, draw: int) -> int:
    """Seed for one subject and noise draw: independent of which other subjects are scored."""
    digest = hashlib.sha256(f"{int(base_seed)}:{subject}:{int(draw)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _reconstruct(model: Model, x: torch.Tensor, t_start: int, scheduler, noise: NoiseGenerator,
                 generator: torch.Generator, settings: ScoreSettings) -> torch.Tensor:
    if settings.sampler == "ddpm":
        return ddpm_reconstruct(model, x, t_start, scheduler, noise, generator)
    if settings.sampler == "x0":
        return x0_reconstruct(model, x, t_start, scheduler, noise)
    if settings.sampler == "patched":
        return patched_reconstruct(model, x, t_start, scheduler, noise, settings.ddim_steps, settings.patch_size)
    if settings.sampler == GUIDED:
        return guided_reconstruct(model, x, t_start, scheduler, settings.ddim_steps, settings.guidance_scale)
    return ddim_reconstruct(model, x, t_start, scheduler, noise, settings.ddim_steps)


def noise_streams(noise_generator: NoiseGenerator, key: str, settings: ScoreSettings,
                  device: str | torch.device = "cpu") -> list[tuple[int, NoiseGenerator, torch.Generator]]:
    """One (noise level, noise generator, torch generator) per level and draw, seeded from ``key``.

    Every level of a t_L ensemble reuses the draw's seed (common random numbers), so levels differ
    only by how far they noise. The streams advance over the batches of one subject.
    """
    streams = []
    for t in settings.levels:
        for d in range(settings.n_draws):
            seed = draw_seed(noise_generator.seed, key, d)
            streams.append((t, noise_generator.with_seed(seed), torch.Generator(device=device).manual_seed(seed)))
    return streams


def reconstruct(model: Model | None, x: torch.Tensor, scheduler, streams, settings: ScoreSettings,
                flair_channel: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel residual |x - recon| averaged over noise levels and draws, mean reconstruction).

    ``streams`` comes from :func:`noise_streams`. The baseline "reconstructs" its FLAIR channel as
    black: its residual is the FLAIR intensity itself.
    """
    if settings.sampler == BASELINE:
        flair = x[:, flair_channel:flair_channel + 1]
        return flair.clone(), torch.zeros_like(flair)
    residual, recon_sum = torch.zeros_like(x), torch.zeros_like(x)
    for t, noise, generator in streams:
        recon = _reconstruct(model, x, t, scheduler, noise, generator, settings)
        residual += (x - recon).abs()
        recon_sum += recon
    return residual / len(streams), recon_sum / len(streams)


def map_from_residual(residual: torch.Tensor, x: torch.Tensor, brain: torch.Tensor, settings: ScoreSettings,
                      stats: HealthyResidualStats | None = None) -> torch.Tensor:
    """Per-channel residual (B, C, H, W) -> (B, 1, H, W) map: optional z-score against healthy
    statistics, channel reduction, eroded-brain mask, 2D median filter. Zero outside the eroded brain."""
    if stats is not None:
        residual = stats.normalise(residual, x)
    reduced = reduce_channels(residual, settings.reduce)
    mask = erode(brain, settings.erode_iters)
    return median_filter(reduced * mask, settings.median_size) * mask


def anomaly_map(x: torch.Tensor, recon: torch.Tensor | Sequence[torch.Tensor], brain: torch.Tensor,
                erode_iters: int = 1, median_size: int = 3, reduce: str = "max") -> torch.Tensor:
    """|x - recon| reduced over channels, averaged over reconstructions (noise draws), inside the
    eroded brain, median-filtered: :func:`map_from_residual` for ready reconstructions."""
    settings = ScoreSettings(erode_iters=erode_iters, median_size=median_size, reduce=reduce)
    recons = [recon] if isinstance(recon, torch.Tensor) else list(recon)
    residual = torch.stack([(x - r).abs() for r in recons]).mean(dim=0)
    return map_from_residual(residual, x, brain, settings)


# ----------------------------------------------------------------------------------------------
# healthy calibration (validation subjects' healthy slices)


@dataclass
class Calibration:
    """What healthy validation slices say about residuals: normalisation statistics and the
    map level above which small components are removed."""

    stats: HealthyResidualStats | None = None
    component_threshold: float | None = None

    def to_dict(self) -> dict:
        return {"residual_norm": self.stats.mode if self.stats else "none",
                "component_threshold": self.component_threshold}


def calibrate(model: Model, cache_dir: str | os.PathLike, scheduler, noise_generator: NoiseGenerator,
              settings: ScoreSettings, device: str | torch.device = "cpu", progress: bool = True) -> Calibration:
    """Reconstruct the cached healthy validation slices with ``settings`` and measure their residuals."""
    if not settings.needs_calibration:
        return Calibration()
    dataset = SliceDataset(cache_dir, "validation")
    if len(dataset) == 0:
        raise InputError(Path(cache_dir) / "validation_images.npy", "no healthy validation slices to calibrate on")
    x_all = torch.from_numpy(np.array(dataset.images, dtype=np.float32))
    streams = noise_streams(noise_generator, "calibration", settings, device)
    residuals = []
    for i in tqdm(range(0, len(x_all), settings.batch_size), desc="calibrate on healthy validation slices",
                  disable=not progress):
        x = x_all[i:i + settings.batch_size].to(device)
        residuals.append(reconstruct(model, x, scheduler, streams, settings)[0].cpu())
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


@dataclass
class SubjectScore:
    """One subject's result: the map in the original image space plus the preprocessed-grid arrays.

    ``grid`` holds (C or 1, H, W, D) arrays: image, recon (mean over draws), map, brain, and,
    when the subject has a label, label (0-3) and tumour (whole tumour, binary). ``recon_stats``
    holds the threshold-free reconstruction figures (sums, so they pool over subjects).
    """

    subject: str
    source: str
    score: np.ndarray
    affine: np.ndarray
    grid: dict
    seconds: float
    recon_stats: dict = field(default_factory=dict)


def preprocess_subject(item: dict, transform) -> dict:
    """Run the preprocessing; any failure becomes one line naming the file."""
    try:
        return transform(dict(item))
    except Exception as err:  # noqa: BLE001 - converted to InputError naming the file
        raise InputError(None, describe_failure(item, err)) from None


def _slices(volume: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(C, H, W, D) volume -> (len(z), C, H, W) axial slices."""
    return torch.as_tensor(volume)[..., z].permute(3, 0, 1, 2).float()


def flair_channel(preprocess: PreprocessConfig) -> int:
    """Index of FLAIR among the selected modalities (the baseline's channel)."""
    if "FLAIR" not in preprocess.modalities:
        raise InputError("sampler", f"the FLAIR baseline needs FLAIR among the modalities, got {list(preprocess.modalities)}")
    return list(preprocess.modalities).index("FLAIR")


def score_subject(item: dict, transform, model: Model | None, scheduler, noise_generator: NoiseGenerator,
                  settings: ScoreSettings = ScoreSettings(), device: str | torch.device = "cpu",
                  calibration: Calibration = Calibration(), flair_index: int = 0) -> SubjectScore:
    """Anomaly map of one subject, in the original image space (same shape and affine as its image).

    ``transform`` is ``preprocess_transforms(cfg, with_label=...)``; only slices holding brain go
    through the sampler, in batches. The map volume is then inverted through ``transform``.
    """
    start = time.perf_counter()
    data = preprocess_subject(item, transform)
    image, brain = data["image"], data["brain"]
    z = torch.nonzero(torch.as_tensor(brain)[0].flatten(0, 1).any(dim=0)).flatten()
    x_all, brain_all = _slices(image, z), _slices(brain, z)
    streams = noise_streams(noise_generator, item["subject"], settings, device)
    maps, recons, residuals = [], [], []
    for i in range(0, len(z), settings.batch_size):
        x = x_all[i:i + settings.batch_size].to(device)
        residual, recon = reconstruct(model, x, scheduler, streams, settings, flair_index)
        maps.append(map_from_residual(residual, x if settings.sampler != BASELINE else x[:, flair_index:flair_index + 1],
                                      brain_all[i:i + settings.batch_size].to(device), settings, calibration.stats).cpu())
        recons.append(recon.cpu())
        residuals.append(residual.cpu())
    grid_map = _postprocess_volume(_to_volume(maps, z, (1, *image.shape[1:])), settings, calibration)
    recon_all, residual_all = torch.cat(recons), torch.cat(residuals)  # the checks refuse a brain-free image
    recon_volume = _to_volume(recons, z, (recon_all.shape[1], *image.shape[1:]))
    grid = {"image": image.as_tensor().numpy(), "recon": recon_volume.numpy(),
            "map": grid_map.numpy(), "brain": brain.as_tensor().numpy()}
    for key in ("label", "tumour"):
        if key in data:
            grid[key] = data[key].as_tensor().numpy()
    stats = reconstruction_stats(x_all, recon_all, residual_all, brain_all,
                                 _slices(data["tumour"], z) if "tumour" in data else None, settings)
    score = invert_to_original(grid_map, image, transform)
    return SubjectScore(subject=item["subject"], source=str(item["image"]),
                        score=score.as_tensor()[0].numpy().astype(np.float32),
                        affine=np.asarray(score.affine, dtype=np.float64), grid=grid,
                        seconds=time.perf_counter() - start, recon_stats=stats)


def _postprocess_volume(volume: torch.Tensor, settings: ScoreSettings, calibration: Calibration) -> torch.Tensor:
    """3D steps on the (1, H, W, D) grid map: median over the volume, then small-component removal."""
    volume = median_filter_3d(volume, settings.median_3d)
    if settings.min_component_voxels > 1 and calibration.component_threshold is not None:
        volume = torch.from_numpy(remove_small_components(volume[0].numpy(), calibration.component_threshold,
                                                          settings.min_component_voxels))[None]
    return volume


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


def _to_volume(chunks: list[torch.Tensor], z: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Batches of (B, C, H, W) slices at depths ``z`` -> (C, H, W, D) volume, zero elsewhere."""
    volume = torch.zeros(shape, dtype=torch.float32)
    if chunks:
        volume[..., z] = torch.cat(chunks).permute(1, 2, 3, 0)
    return volume


def invert_to_original(grid_volume: torch.Tensor, image: MetaTensor, transform) -> MetaTensor:
    """Undo the preprocessing's spatial steps on a (1, H, W, D) volume, using the image's trace.

    Resizing and resampling are inverted with linear interpolation (the map is continuous).
    The non-spatial custom transforms record nothing, so only the spatial steps are replayed.
    """
    invert = Invertd(keys="score", transform=transform, orig_keys="image", nearest_interp=False)
    return invert({"image": image, "score": MetaTensor(grid_volume)})["score"]


# ----------------------------------------------------------------------------------------------
# writing


def report_slices(grid: dict, n: int = REPORT_SLICES) -> list[int]:
    """Axial slices worth showing: the most tumour, or the most brain when there is no tumour."""
    area = grid["tumour"][0].sum(axis=(0, 1)) if "tumour" in grid else np.zeros(grid["brain"].shape[-1])
    if not area.any():
        area = grid["brain"][0].sum(axis=(0, 1))
    return sorted(int(i) for i in np.argsort(-area.astype(np.int64), kind="stable")[:n])


def save_subject(result: SubjectScore, out_dir: str | os.PathLike, threshold: float | None = None) -> dict:
    """Write ``<subject>_score.nii.gz`` (float32), optionally ``<subject>_mask.nii.gz`` (uint8,
    score > threshold, as the metrics count a prediction), and ``<subject>_slices.npz`` (a few preprocessed-grid slices for the report).

    The NIfTI files reuse the input's header and affine, so they overlay it in any viewer.
    Returns the file names written.
    """
    out_dir = Path(out_dir)
    reference = nib.load(result.source)
    if not np.allclose(reference.affine, result.affine, atol=1e-4) or reference.shape[:3] != result.score.shape:
        raise RuntimeError(f"inverted map of {result.subject} does not match its image grid "
                           f"({result.score.shape} vs {reference.shape[:3]})")
    files = {"score": f"{result.subject}_score.nii.gz"}
    _save_nifti(out_dir / files["score"], result.score.astype(np.float32), reference, "anomaly score")
    if threshold is not None:
        files["mask"] = f"{result.subject}_mask.nii.gz"
        _save_nifti(out_dir / files["mask"], (result.score > threshold).astype(np.uint8), reference,
                    f"anomaly mask, score > {threshold:g}")
    files["slices"] = f"{result.subject}_slices.npz"
    z = report_slices(result.grid)
    with atomic_path(out_dir / files["slices"], suffix=".npz") as tmp:
        np.savez_compressed(tmp, z=np.asarray(z), **{k: v[..., z] for k, v in result.grid.items()})
    return files


def _save_nifti(path: Path, data: np.ndarray, reference: nib.Nifti1Image, description: str) -> None:
    """Same header (qform/sform codes, units) as the input, but the input's display window dropped."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    image = type(reference)(data, reference.affine, header=header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 0
    image.header["descrip"] = description.encode()[:79]
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, str(tmp))


# ----------------------------------------------------------------------------------------------
# a split (the bundle's inference entry point)


def load_model(network: torch.nn.Module, model_path: str | os.PathLike) -> torch.nn.Module:
    """EMA weights from ``model_path`` into ``network`` (eval mode); a mismatch names the file."""
    load_state(network, load_checkpoint(model_path), model_path)
    return network.eval()


def _check_sections(sections, split: dict) -> list[str]:
    sections = [sections] if isinstance(sections, str) else list(sections)
    for section in sections:
        if section not in SECTIONS:
            raise InputError("score_sections", f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        if not split.get(section):
            raise InputError("split", f"no {section} subjects")
    return sections


def score_split(dataset_dir: str | os.PathLike, split: dict, preprocess: PreprocessConfig,
                model_path: str | os.PathLike, network: torch.nn.Module, scheduler,
                noise_generator: NoiseGenerator, out_dir: str | os.PathLike,
                settings: ScoreSettings = ScoreSettings(), sections: Sequence[str] = ("validation", "test"),
                device: str | torch.device = "cpu", threshold: float | None = None,
                calibration_cache: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Score every subject of ``sections``; write ``out_dir/<section>/`` maps and ``out_dir/index.json``.

    ``calibration_cache`` is the slice cache whose healthy validation slices calibrate residual
    normalisation and the component filter (needed only when those are on). ``out_dir`` appears
    only once complete (a failure leaves the previous scores, if any, intact). Returns ``out_dir``.
    """
    settings.check_levels(scheduler.num_train_timesteps)
    sections = _check_sections(sections, split)
    by_subject = {item["subject"]: item for item in load_subjects(dataset_dir).data}
    unknown = sorted({s for section in sections for s in split[section]} - set(by_subject))
    if unknown:
        raise InputError("split", f"names subjects not in the dataset: {', '.join(unknown[:5])}")
    baseline = settings.sampler == BASELINE
    flair_index = flair_channel(preprocess) if baseline else 0
    model = None if baseline else load_model(network, model_path)
    if settings.needs_calibration and calibration_cache is None:
        raise InputError("residual_norm", "residual normalisation and the component filter need the slice cache "
                                          "of healthy validation slices (calibration_cache)")
    calibration = calibrate(model, calibration_cache, scheduler, noise_generator, settings, device, progress) \
        if settings.needs_calibration else Calibration()
    index_settings = {**settings.to_dict(), "threshold": threshold, "model_path": None if baseline else str(model_path),
                      "noise": repr(noise_generator), "prediction_type": str(scheduler.prediction_type),
                      "preprocess": preprocess.to_dict(), "calibration": calibration.to_dict()}
    rank, world = rank_and_world()
    jobs = [(section, by_subject[name]) for section in sections for name in split[section]]
    score = dict(preprocess=preprocess, model=model, scheduler=scheduler, noise_generator=noise_generator,
                 settings=settings, device=device, calibration=calibration, flair_index=flair_index,
                 threshold=threshold, progress=progress and rank == 0)
    out_dir = Path(out_dir)
    if world == 1:
        with atomic_dir(out_dir) as tmp:
            _write_scores(tmp, jobs, index_settings, **score)
        return out_dir
    part = out_dir.with_name(f".{out_dir.name}.rank{rank}")  # each rank writes its own share, atomically
    with atomic_dir(part) as tmp:
        _write_scores(tmp, jobs[rank::world], index_settings, **score)
    _barrier()
    if rank == 0:
        merge_shards([out_dir.with_name(f".{out_dir.name}.rank{r}") for r in range(world)], out_dir,
                     [item["subject"] for _, item in jobs])
    _barrier()
    return out_dir


def _write_scores(folder: Path, jobs: list[tuple[str, dict]], index_settings: dict, calibration: Calibration,
                  preprocess, model, scheduler, noise_generator, settings, device, flair_index, threshold,
                  progress) -> None:
    """Score ``jobs`` ((section, subject item) pairs) into ``folder``: maps, index.json, calibration."""
    subjects = {}
    for section, item in tqdm(jobs, desc="score", unit="subject", disable=not progress):
        transform = preprocess_transforms(preprocess, with_label=bool(item.get("label")))
        result = score_subject(item, transform, model, scheduler, noise_generator, settings, device,
                               calibration, flair_index)
        files = save_subject(result, folder / section, threshold)
        subjects[result.subject] = {"section": section, "seconds": round(result.seconds, 3),
                                    "files": {k: f"{section}/{v}" for k, v in files.items()},
                                    "recon": result.recon_stats}
    if calibration.stats is not None:
        np.savez(folder / "calibration.npz", **calibration.stats.to_arrays())
    write_json(folder / "index.json", {"format": INDEX_FORMAT, "settings": index_settings, "subjects": subjects})


def _barrier() -> None:
    torch.distributed.barrier()


def merge_shards(parts: Sequence[Path], out_dir: Path, order: Sequence[str]) -> Path:
    """Merge the ranks' score folders into ``out_dir`` (atomically): files moved, one index in the
    single-process subject order, the parts removed."""
    indexes = [read_index(part) for part in parts]
    subjects = {name: row for index in indexes for name, row in index["subjects"].items()}
    with atomic_dir(out_dir) as tmp:
        for part in parts:
            for path in sorted(part.rglob("*")):
                if path.is_file() and path.name != "index.json":
                    target = tmp / path.relative_to(part)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
        write_json(tmp / "index.json", {**indexes[0], "subjects": {name: subjects[name] for name in order}})
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return out_dir


def read_index(scores_dir: str | os.PathLike) -> dict:
    """The ``index.json`` a :func:`score_split` run wrote (what the metrics stage reads)."""
    path = Path(scores_dir) / "index.json"
    if not path.is_file():
        raise InputError(path, "scores index not found; run the inference workflow first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"malformed JSON ({err})") from None
