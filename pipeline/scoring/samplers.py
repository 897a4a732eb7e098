"""Partial-diffusion samplers: one plain function per sampler (k-diffusion style).

Every sampler has the signature ``fn(model, x0, t_start, scheduler, noise_generator, settings,
generator=None)``: it takes a batch of clean slices ``x0`` (B, C, H, W), noises it to ``t_start``
and returns the model's reconstruction. A model trained only on healthy slices "heals" what it has
not seen. ``settings`` is the run's :class:`pipeline.scoring.settings.ScoreSettings`; each sampler reads only
its own fields (``ddim_steps``, ``patch_size``, ``guidance_scale``). ``generator`` drives the
reverse-step noise of the ancestral sampler and is ignored by the deterministic ones.

* :func:`ddpm_reconstruct` - ancestral DDPM over every step (the AnoDDPM protocol, ``t_start + 1``
  network calls).
* :func:`ddim_reconstruct` - deterministic DDIM in ``ddim_steps`` calls.
* :func:`x0_reconstruct` - the fast sampler: one network call per slice, the model's x0 prediction
  from ``x_t`` (what DDIM with one step computes).
* :func:`patched_reconstruct` - patched noising (pDDPM, Behrendt et al. 2023): one patch at a
  time is noised while the rest of the slice stays clean as context; the reconstruction of each
  patch is stitched back together.
* ``guided`` lives in :mod:`pipeline.scoring.guided` (it builds on the DDIM pieces here), so the name ->
  function registry, ``pipeline.scoring.score.SAMPLERS``, sits in the module that imports both.

Timesteps use MONAI's indexing: ``add_noise(x0, eps, t)`` gives ``x_t`` with ``alphas_cumprod[t]``
and ``scheduler.step(..., t, ...)`` goes from ``x_t`` to ``x_{t-1}``, ``x_{-1}`` being the clean image.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.errors import InputError
from pipeline.model.noise import NoiseGenerator
from pipeline.scoring.settings import ScoreSettings

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps_like(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)


def noise_to(x0: torch.Tensor, t_start: int, scheduler, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse clean slices to step ``t_start`` in one jump (q(x_t | x_0))."""
    return scheduler.add_noise(x0, noise, timesteps_like(t_start, x0))


def draw_noise(noise_generator: NoiseGenerator, x0: torch.Tensor) -> torch.Tensor:
    return noise_generator(tuple(x0.shape), device=x0.device, dtype=x0.dtype)


def predict_x0_eps(scheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network output, whichever target (epsilon, x0, v) it was trained on.

    Hand-written because MONAI's schedulers compute it only inside ``step``, while the fast sampler,
    partial DDIM and DDIM inversion need it alone. x0_hat is clipped like ``DDPMScheduler.step``
    does, so all samplers treat the model alike.
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


@torch.inference_mode()
def ddpm_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                     settings: ScoreSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """AnoDDPM (Wyatt et al. 2022): noise to ``t_start``, then ancestral DDPM over every step ``t_start, ..., 0``.

    Hand-written rather than MONAI's ``DiffusionInferer.sample``, which runs the scheduler's whole
    timestep list from pure noise. The forward noise comes from ``noise_generator`` (Gaussian or
    simplex); the variance noise of each reverse step is Gaussian, drawn by ``scheduler.step`` from
    ``generator`` (seeded from the noise generator's seed when not given), so runs repeat exactly on
    the same device.
    """
    if generator is None:
        generator = torch.Generator(device=x0.device).manual_seed(noise_generator.seed)
    x = noise_to(x0, t_start, scheduler, draw_noise(noise_generator, x0))
    for t in range(int(t_start), -1, -1):
        x, _ = scheduler.step(model(x, timesteps_like(t, x)), t, x, generator)
    return x


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``t_start`` down (exclusive of the clean end).

    The last step jumps straight to x0, so ``steps=1`` is a single x0 prediction. Repeated
    timesteps (more steps than ``t_start + 1``) are dropped.
    """
    ts = torch.linspace(float(t_start), 0.0, int(steps) + 1)[:-1].round().long()
    return torch.unique_consecutive(ts).tolist()


def _ddim_from(model: Model, x: torch.Tensor, ts: list[int], scheduler,
               keep: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``x`` at ``ts[0]`` down to the x0 prediction at ``ts[-1]``.

    Hand-written because MONAI's ``DDIMScheduler`` spaces its timesteps over the whole schedule
    from the last step, while partial diffusion starts at ``t_L`` (see :func:`ddim_timesteps`).
    ``keep(x, t)`` may overwrite part of the state before each network call (patched noising
    puts the clean context back at the current noise level).
    """
    for i, t in enumerate(ts):
        if keep is not None:
            x = keep(x, t)
        x0_hat, eps_hat = predict_x0_eps(scheduler, model(x, timesteps_like(t, x)), x, t)
        if i + 1 == len(ts):
            return x0_hat
        abar_prev = float(scheduler.alphas_cumprod[ts[i + 1]])
        x = abar_prev**0.5 * x0_hat + (1.0 - abar_prev) ** 0.5 * eps_hat
    raise ValueError("ddim needs at least one timestep")


@torch.inference_mode()
def ddim_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                     settings: ScoreSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eta = 0) from ``t_start`` to the clean image in ``settings.ddim_steps`` evaluations.

    Only the starting noise is random; with a perfect model the input comes back exactly.
    """
    x = noise_to(x0, t_start, scheduler, draw_noise(noise_generator, x0))
    return _ddim_from(model, x, ddim_timesteps(t_start, settings.ddim_steps), scheduler)


@torch.inference_mode()
def x0_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                   settings: ScoreSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast sampler (one-step DDIM): noise to ``t_start`` and take the model's x0 prediction, one network evaluation."""
    x = noise_to(x0, t_start, scheduler, draw_noise(noise_generator, x0))
    return predict_x0_eps(scheduler, model(x, timesteps_like(t_start, x)), x, int(t_start))[0]


# ----------------------------------------------------------------------------------------------
# patched noising (pDDPM)


def patch_grid(size: int, patch: int) -> list[int]:
    """Start offsets of patches of ``patch`` px tiling ``size`` px; the last one is shifted inwards
    so every pixel is covered even when ``patch`` does not divide ``size``."""
    if not 1 <= int(patch) <= int(size):
        raise InputError("patch_size", f"must be in [1, {size}] pixels, got {patch!r}")
    starts = list(range(0, size - patch + 1, patch))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def patch_masks(height: int, width: int, patch: int, device=None) -> torch.Tensor:
    """(P, 1, H, W) binary masks, one per patch of the tiling (row-major)."""
    masks = []
    for top in patch_grid(height, patch):
        for left in patch_grid(width, patch):
            m = torch.zeros(1, height, width, device=device)
            m[:, top:top + patch, left:left + patch] = 1
            masks.append(m)
    return torch.stack(masks)


def noise_patch(x0: torch.Tensor, noise: torch.Tensor, t: int, scheduler, mask: torch.Tensor) -> torch.Tensor:
    """x_t inside ``mask`` (q(x_t | x0) with ``noise``), the clean x0 outside: the pDDPM input."""
    return mask * noise_to(x0, t, scheduler, noise) + (1 - mask) * x0


@torch.inference_mode()
def patched_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                        settings: ScoreSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """pDDPM (Behrendt et al. 2023): for each ``settings.patch_size`` patch of a tiling, noise only that
    patch to ``t_start`` (context stays clean), denoise with DDIM in ``settings.ddim_steps`` calls and
    keep the reconstruction inside the patch.

    All patches of all slices go through the network as one batch of ``B * P`` images. Between
    DDIM steps the context is reset to the clean input, as in training (see ``NoisePrepareBatch``).
    Where tiles overlap (a patch size that does not divide the image), reconstructions are averaged.
    """
    b, c, h, w = x0.shape
    masks = patch_masks(h, w, int(settings.patch_size), device=x0.device)  # (P, 1, H, W)
    n = masks.shape[0]
    xs = x0.repeat_interleave(n, dim=0)  # (B * P, C, H, W): slice-major, patch-minor
    ms = masks.repeat(b, 1, 1, 1)
    noise = draw_noise(noise_generator, x0).repeat_interleave(n, dim=0)
    x = noise_patch(xs, noise, t_start, scheduler, ms)

    def keep_context(state: torch.Tensor, _t: int) -> torch.Tensor:
        return ms * state + (1 - ms) * xs

    recon = _ddim_from(model, x, ddim_timesteps(t_start, settings.ddim_steps), scheduler, keep_context)
    weighted = (recon * ms).view(b, n, c, h, w).sum(dim=1)
    coverage = ms.view(b, n, 1, h, w).sum(dim=1)
    return weighted / coverage
