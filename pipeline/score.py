"""Score stage: partial-diffusion reconstruction -> residual anomaly maps -> NIfTI in the input's space.

A slice is noised to step ``t_L`` and denoised back to 0 by a model trained only on healthy
slices; what the model cannot reproduce (a tumour it "heals") shows up in ``|x - reconstruction|``.

* Samplers are plain functions on a batch of slices ``x0`` (B, C, H, W) in [0, 1], k-diffusion
  style: :func:`ddpm_reconstruct` (every step, the AnoDDPM protocol) and :func:`ddim_reconstruct`
  (deterministic, a few steps).
* Timesteps use MONAI's indexing: ``add_noise(x0, eps, t)`` gives ``x_t`` with ``alphas_cumprod[t]``
  and ``scheduler.step(..., t, ...)`` goes from ``x_t`` to ``x_{t-1}``, ``x_{-1}`` being the clean image.
  So DDPM from ``t_L`` runs ``t_L + 1`` network evaluations (steps ``t_L, ..., 0``).
* Noise is seeded per subject and draw (from the run's seed and the subject id), so a subject
  scores the same alone or inside a split, in any order.
* Maps are built on the preprocessed grid, then put back into the original image space by
  inverting the preprocessing (``monai.transforms.Invertd``) and saved with the input's affine.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Invertd
from tqdm.auto import tqdm

from .atomic import atomic_dir, atomic_path, write_json
from .data import SECTIONS, PreprocessConfig, describe_failure, load_subjects, preprocess_transforms
from .errors import InputError
from .noise import NoiseGenerator
from .train import load_checkpoint, load_state

SAMPLERS = ("ddim", "ddpm", "flair")
BASELINE = "flair"  # FLAIR-intensity threshold baseline (Meissen et al. 2021): no model, map = intensity
REDUCTIONS = ("max", "mean")
INDEX_FORMAT = 1
REPORT_SLICES = 4

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# samplers


def _timesteps(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def noise_to(x0: torch.Tensor, t_start: int, scheduler, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse clean slices to step ``t_start`` in one jump (q(x_t | x_0))."""
    return scheduler.add_noise(x0, noise, _timesteps(t_start, x0))


def predict_x0_eps(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network output, whichever target (epsilon, x0, v) it was trained on.

    x0_hat is clipped like ``DDPMScheduler.step`` does, so both samplers treat the model alike.
    """
    abar = float(scheduler.alphas_cumprod[t])
    a, s = abar**0.5, (1.0 - abar) ** 0.5
    kind = scheduler.prediction_type
    if kind == "epsilon":
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif kind == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / s
    elif kind == "v_prediction":
        x0 = a * x_t - s * model_output
        eps = s * x_t + a * model_output
    else:
        raise InputError("prediction_type", f"unknown prediction type {kind!r}")
    if getattr(scheduler, "clip_sample", False):
        x0 = x0.clamp(*scheduler.clip_sample_values)
    return x0, eps


def _noise(noise_generator: NoiseGenerator, x0: torch.Tensor) -> torch.Tensor:
    return noise_generator(tuple(x0.shape), device=x0.device, dtype=x0.dtype)


@torch.inference_mode()
def ddpm_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """AnoDDPM: noise to ``t_start``, then ancestral DDPM over every step ``t_start, ..., 0``.

    The forward noise comes from ``noise_generator`` (Gaussian or simplex); the variance noise of
    each reverse step is Gaussian, drawn by ``scheduler.step`` from ``generator`` (seeded from the
    noise generator's seed when not given), so runs repeat exactly on the same device.
    """
    if generator is None:
        generator = torch.Generator(device=x0.device).manual_seed(noise_generator.seed)
    x = noise_to(x0, t_start, scheduler, _noise(noise_generator, x0))
    for t in range(int(t_start), -1, -1):
        x, _ = scheduler.step(model(x, _timesteps(t, x)), t, x, generator)
    return x


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``t_start`` down (exclusive of the clean end).

    The last step jumps straight to x0, so ``steps=1`` is a single x0 prediction. Repeated
    timesteps (more steps than ``t_start + 1``) are dropped.
    """
    ts = torch.linspace(float(t_start), 0.0, int(steps) + 1)[:-1].round().long()
    return torch.unique_consecutive(ts).tolist()


@torch.inference_mode()
def ddim_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                     steps: int = 10) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``t_start`` to the clean image in ``steps`` evaluations.

    Only the starting noise is random; with a perfect model the input comes back exactly.
    """
    x = noise_to(x0, t_start, scheduler, _noise(noise_generator, x0))
    ts = ddim_timesteps(t_start, steps)
    for i, t in enumerate(ts):
        x0_hat, eps_hat = predict_x0_eps(scheduler, model(x, _timesteps(t, x)), x, t)
        if i + 1 == len(ts):
            return x0_hat
        abar_prev = float(scheduler.alphas_cumprod[ts[i + 1]])
        x = abar_prev**0.5 * x0_hat + (1.0 - abar_prev) ** 0.5 * eps_hat
    return x  # not reached: ts is never empty


# ----------------------------------------------------------------------------------------------
# anomaly maps


def erode(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """Binary erosion of (B, 1, H, W) masks by a 3x3 square, per slice: drops the brain rim, where
    reconstructions of the skull-stripped edge are poor in healthy tissue too."""
    out = mask.float()
    for _ in range(int(iterations)):
        out = -F.max_pool2d(-out, kernel_size=3, stride=1, padding=1)
    return out


def median_filter(maps: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Per-slice median filter of (B, 1, H, W) maps (edge-replicated), vectorised over the batch."""
    if size <= 1:
        return maps
    b, c, h, w = maps.shape
    padded = F.pad(maps, (size // 2,) * 4, mode="replicate")
    windows = F.unfold(padded, kernel_size=size)  # (B, C * size * size, H * W)
    return windows.view(b, c, size * size, h * w).median(dim=2).values.view(b, c, h, w)


def anomaly_map(x: torch.Tensor, recon: torch.Tensor | Sequence[torch.Tensor], brain: torch.Tensor,
                erode_iters: int = 1, median_size: int = 3, reduce: str = "max") -> torch.Tensor:
    """|x - recon| reduced over channels, averaged over noise draws, inside the eroded brain, median-filtered.

    ``x`` (B, C, H, W); ``recon`` one reconstruction or a sequence (one per noise draw);
    ``brain`` (B, 1, H, W). Returns (B, 1, H, W), zero outside the eroded brain.
    """
    _check_map_settings(erode_iters, median_size, reduce)
    recons = [recon] if isinstance(recon, torch.Tensor) else list(recon)
    residuals = []
    for r in recons:
        diff = (x - r).abs()
        residuals.append(diff.amax(dim=1, keepdim=True) if reduce == "max" else diff.mean(dim=1, keepdim=True))
    mask = erode(brain, erode_iters)
    maps = median_filter(torch.stack(residuals).mean(dim=0) * mask, median_size)
    return maps * mask


def _check_map_settings(erode_iters, median_size, reduce) -> None:
    if reduce not in REDUCTIONS:
        raise InputError("map_reduce", f"unknown channel reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if int(erode_iters) != erode_iters or erode_iters < 0:
        raise InputError("erode_iters", f"must be an integer >= 0, got {erode_iters!r}")
    if int(median_size) != median_size or median_size < 1 or median_size % 2 == 0:
        raise InputError("median_size", f"must be an odd integer >= 1, got {median_size!r}")


# ----------------------------------------------------------------------------------------------
# one subject


@dataclass
class SubjectScore:
    """One subject's result: the map in the original image space plus the preprocessed-grid arrays.

    ``grid`` holds (C or 1, H, W, D) arrays: image, recon (mean over draws), map, brain, and,
    when the subject has a label, label (0-3) and tumour (whole tumour, binary).
    """

    subject: str
    source: str
    score: np.ndarray
    affine: np.ndarray
    grid: dict
    seconds: float


def check_settings(sampler: str, t_start: int, ddim_steps: int, n_draws: int, batch_size: int,
                   num_train_timesteps: int) -> None:
    """Refuse sampler settings that would fail deep inside the loop or silently mean nothing."""
    if sampler not in SAMPLERS:
        raise InputError("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    for name, value, low in (("t_start", t_start, 1), ("ddim_steps", ddim_steps, 1), ("n_draws", n_draws, 1),
                             ("score_batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    if t_start > num_train_timesteps - 1:
        raise InputError("t_start", f"must be in [1, {num_train_timesteps - 1}] (num_train_timesteps="
                                    f"{num_train_timesteps}), got {t_start}")


def draw_seed(base_seed: int, subject: str, draw: int) -> int:
    """Seed for one subject and noise draw: independent of which other subjects are scored."""
    digest = hashlib.sha256(f"{int(base_seed)}:{subject}:{int(draw)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _reconstruct(model, x, sampler, t_start, scheduler, noise, generator, ddim_steps):
    if sampler == BASELINE:  # "reconstruct" as black: the residual is the FLAIR intensity itself
        return torch.zeros_like(x)
    if sampler == "ddpm":
        return ddpm_reconstruct(model, x, t_start, scheduler, noise, generator)
    return ddim_reconstruct(model, x, t_start, scheduler, noise, ddim_steps)


def preprocess_subject(item: dict, transform) -> dict:
    """Run the preprocessing; any failure becomes one line naming the file."""
    try:
        return transform(dict(item))
    except Exception as err:  # noqa: BLE001 - converted to InputError naming the file
        raise InputError(None, describe_failure(item, err)) from None


def _slices(volume: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(C, H, W, D) volume -> (len(z), C, H, W) axial slices."""
    return torch.as_tensor(volume)[..., z].permute(3, 0, 1, 2).float()


def score_subject(item: dict, transform, model: Model, scheduler, noise_generator: NoiseGenerator,
                  sampler: str = "ddim", t_start: int = 250, ddim_steps: int = 10, n_draws: int = 1,
                  batch_size: int = 64, device: str | torch.device = "cpu", erode_iters: int = 1,
                  median_size: int = 3, reduce: str = "max") -> SubjectScore:
    """Anomaly map of one subject, in the original image space (same shape and affine as its image).

    ``transform`` is ``preprocess_transforms(cfg, with_label=...)``; only slices holding brain go
    through the sampler, in batches. The map volume is then inverted through ``transform``.
    """
    check_settings(sampler, t_start, ddim_steps, n_draws, batch_size, scheduler.num_train_timesteps)
    _check_map_settings(erode_iters, median_size, reduce)
    start = time.perf_counter()
    data = preprocess_subject(item, transform)
    image, brain = data["image"], data["brain"]
    z = torch.nonzero(torch.as_tensor(brain)[0].flatten(0, 1).any(dim=0)).flatten()
    x_all, brain_all = _slices(image, z), _slices(brain, z)
    noises = [noise_generator.with_seed(draw_seed(noise_generator.seed, item["subject"], d)) for d in range(n_draws)]
    generators = [torch.Generator(device=device).manual_seed(n.seed) for n in noises]
    maps, recons = [], []
    for i in range(0, len(z), batch_size):
        x = x_all[i:i + batch_size].to(device)
        b = brain_all[i:i + batch_size].to(device)
        rs = [_reconstruct(model, x, sampler, t_start, scheduler, n, g, ddim_steps) for n, g in zip(noises, generators)]
        maps.append(anomaly_map(x, rs, b, erode_iters, median_size, reduce).cpu())
        recons.append(torch.stack(rs).mean(dim=0).cpu())
    grid_map = _to_volume(maps, z, (1, *image.shape[1:]))
    grid = {"image": image.as_tensor().numpy(), "recon": _to_volume(recons, z, tuple(image.shape)).numpy(),
            "map": grid_map.numpy(), "brain": brain.as_tensor().numpy()}
    for key in ("label", "tumour"):
        if key in data:
            grid[key] = data[key].as_tensor().numpy()
    score = invert_to_original(grid_map, image, transform)
    return SubjectScore(subject=item["subject"], source=str(item["image"]),
                        score=score.as_tensor()[0].numpy().astype(np.float32),
                        affine=np.asarray(score.affine, dtype=np.float64), grid=grid,
                        seconds=time.perf_counter() - start)


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


def score_split(dataset_dir: str | os.PathLike, split: dict, preprocess: PreprocessConfig,
                model_path: str | os.PathLike, network: torch.nn.Module, scheduler,
                noise_generator: NoiseGenerator, out_dir: str | os.PathLike,
                sections: Sequence[str] = ("validation", "test"), sampler: str = "ddim", t_start: int = 250,
                ddim_steps: int = 10, n_draws: int = 1, batch_size: int = 64,
                device: str | torch.device = "cpu", erode_iters: int = 1, median_size: int = 3,
                reduce: str = "max", threshold: float | None = None, progress: bool = True) -> Path:
    """Score every subject of ``sections``; write ``out_dir/<section>/`` maps and ``out_dir/index.json``.

    ``out_dir`` appears only once complete (a failure leaves the previous scores, if any, intact).
    Returns ``out_dir``.
    """
    check_settings(sampler, t_start, ddim_steps, n_draws, batch_size, scheduler.num_train_timesteps)
    _check_map_settings(erode_iters, median_size, reduce)
    sections = [sections] if isinstance(sections, str) else list(sections)
    for section in sections:
        if section not in SECTIONS:
            raise InputError("score_sections", f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        if not split.get(section):
            raise InputError("split", f"no {section} subjects")
    by_subject = {item["subject"]: item for item in load_subjects(dataset_dir).data}
    unknown = sorted({s for section in sections for s in split[section]} - set(by_subject))
    if unknown:
        raise InputError("split", f"names subjects not in the dataset: {', '.join(unknown[:5])}")
    if sampler == BASELINE and tuple(preprocess.modalities) != ("FLAIR",):
        raise InputError("sampler", f"the FLAIR baseline needs modalities [FLAIR], got {list(preprocess.modalities)}")
    model = None if sampler == BASELINE else load_model(network, model_path)
    settings = {"sampler": sampler, "t_start": int(t_start), "ddim_steps": int(ddim_steps), "n_draws": int(n_draws),
                "erode_iters": int(erode_iters), "median_size": int(median_size), "reduce": reduce,
                "threshold": threshold, "model_path": None if sampler == BASELINE else str(model_path), "noise": repr(noise_generator),
                "prediction_type": str(scheduler.prediction_type), "preprocess": preprocess.to_dict()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        subjects = {}
        for section in sections:
            items = [by_subject[s] for s in split[section]]
            for item in tqdm(items, desc=f"score {section}", unit="subject", disable=not progress):
                transform = preprocess_transforms(preprocess, with_label=bool(item.get("label")))
                result = score_subject(item, transform, model, scheduler, noise_generator, sampler, t_start,
                                       ddim_steps, n_draws, batch_size, device, erode_iters, median_size, reduce)
                files = save_subject(result, tmp / section, threshold)
                subjects[result.subject] = {"section": section, "seconds": round(result.seconds, 3),
                                            "files": {k: f"{section}/{v}" for k, v in files.items()}}
        write_json(tmp / "index.json", {"format": INDEX_FORMAT, "settings": settings, "subjects": subjects})
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
