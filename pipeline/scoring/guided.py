"""Weakly supervised counterfactuals with classifier-free guidance (Sanchez et al. 2022).

A class-conditional DiffusionModelUNet learns healthy (0) and tumour (1) slices from slice-level
labels; with probability ``drop_prob`` a training label is replaced by the null class (2), so the
same network also learns the unconditional model (Ho & Salimans 2021). To score, a slice is encoded
by deterministic DDIM inversion up to ``t_start`` with the null condition, then decoded back with
guidance towards "healthy": eps = eps(x, null) + w (eps(x, healthy) - eps(x, null)). What the
decoding changes, |x - counterfactual|, is the anomaly map.

Timesteps follow :mod:`pipeline.scoring.samplers` (MONAI indexing, ``alphas_cumprod[t]`` at step ``t``).
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.common import GUIDED
from pipeline.errors import InputError
from pipeline.model.guided_train import HEALTHY, NULL, labels_like
from pipeline.model.noise import NoiseGenerator
from pipeline.scoring.samplers import Model, _ddim_from, ddim_timesteps, predict_x0_eps, timesteps_like
from pipeline.scoring.settings import ScoreSettings


@torch.inference_mode()
def ddim_invert(model, x0: torch.Tensor, t_start: int, steps: int, scheduler,
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion (eta = 0): encode clean slices up to ``t_start`` in ``steps`` calls.

    Hand-written: ``DDIMScheduler.reversed_step`` strides over the whole schedule, not up to ``t_L``.
    The mirror of DDIM decoding over the same timesteps (``ddim_timesteps`` ascending): each step
    predicts (x0, eps) at the current level and re-noises them to the next one. The network is
    evaluated at the level it comes from (step 0 for the clean input, whose x0 is known exactly), so
    decoding returns the input up to the change of eps between neighbouring levels, which shrinks
    with the step size (exact for a model that knows x0). ``labels``: the class labels of a class-conditional
    model (the null class for classifier-free guidance); None for an unconditional one.
    """
    condition = {} if labels is None else {"class_labels": labels}
    x, t_prev = x0, 0
    for i, t in enumerate(reversed(ddim_timesteps(t_start, steps))):
        x0_hat, eps_hat = predict_x0_eps(scheduler, model(x, timesteps_like(t_prev, x), **condition), x, t_prev)
        if i == 0:
            x0_hat = x0  # the input is clean, not x at step 0: keep it, only eps is predicted
        abar = float(scheduler.alphas_cumprod[t])
        x, t_prev = abar**0.5 * x0_hat + (1.0 - abar) ** 0.5 * eps_hat, t
    return x


def guided_output(model, x: torch.Tensor, timesteps: torch.Tensor, guidance_scale: float,
                  target: int = HEALTHY, null: int = NULL) -> torch.Tensor:
    """Classifier-free guidance: out(x, null) + w (out(x, target) - out(x, null)), both in one batch.

    Applied to the raw network output: eps, x0 and v are affine in it at fixed x_t and the weights
    sum to 1, so this equals guiding eps whatever the prediction type.
    """
    both = model(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                 class_labels=torch.cat([labels_like(null, x), labels_like(target, x)]))
    uncond, cond = both.chunk(2)
    return uncond + float(guidance_scale) * (cond - uncond)


@torch.inference_mode()
def guided_ddim_decode(model, x_t: torch.Tensor, t_start: int, steps: int, scheduler, guidance_scale: float,
                       target: int = HEALTHY) -> torch.Tensor:
    """Deterministic DDIM from ``t_start`` to the clean image with classifier-free guidance towards ``target``."""
    guided = partial(guided_output, model, guidance_scale=guidance_scale, target=target)
    return _ddim_from(guided, x_t, ddim_timesteps(t_start, steps), scheduler)


def check_invertible(scheduler, sampler: str, workflow: str) -> None:
    """Refuse an x0-predicting model: its implied eps, (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar), amplifies its
    error by up to 1/sqrt(1 - abar_0) = 100 near the clean end, and DDIM inversion does not come back."""
    if scheduler.prediction_type == "sample":
        raise InputError("prediction_type", f"the {sampler} sampler needs a model trained to predict epsilon or v "
                                            "(DDIM inversion of an x0-predicting model does not return the input); "
                                            f"train with the {workflow} workflow (prediction_type: epsilon)")


@torch.inference_mode()
def guided_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler, noise_generator: NoiseGenerator,
                       settings: ScoreSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Healthy counterfactual (Sanchez et al. 2022): DDIM inversion with the null condition, then
    DDIM decoding guided towards healthy, ``settings.ddim_steps`` calls each way with guidance scale
    ``settings.guidance_scale``. The samplers' common signature; deterministic: no noise is drawn.
    An x0-predicting model is refused (:func:`check_invertible`).
    """
    check_invertible(scheduler, GUIDED, "train_guided")
    latent = ddim_invert(model, x0, t_start, settings.ddim_steps, scheduler, labels_like(NULL, x0))
    return guided_ddim_decode(model, latent, t_start, settings.ddim_steps, scheduler, settings.guidance_scale)
