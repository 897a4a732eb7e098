"""Classifier-guided counterfactuals (Wolleb et al., MICCAI 2022; MONAI's tutorial of the same name).

A slice is encoded by deterministic DDIM inversion to ``t_start`` with the unconditional diffusion model
(the plain ``train`` workflow's, healthy slices), then decoded by DDIM with eps shifted by the gradient of
a noisy-slice classifier (:mod:`pipeline.model.classifier_train`, trained with slice labels) towards
healthy (Dhariwal & Nichol 2021, Algorithm 2):

    eps_guided = eps - s sqrt(1 - abar_t) grad_x log p(y = healthy | x_t, t),   s = ``guidance_scale``.

What the decoding changes, |x - counterfactual|, is the anomaly map. Timesteps as in
:mod:`pipeline.scoring.samplers`; the inversion is :func:`pipeline.scoring.guided.ddim_invert`.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from pipeline.common import CLASSIFIER_GUIDED
from pipeline.errors import InputError
from pipeline.model.checkpoint import load_checkpoint, load_state
from pipeline.model.guided_train import HEALTHY
from pipeline.model.noise import NoiseGenerator
from pipeline.scoring.guided import check_invertible, ddim_invert
from pipeline.scoring.samplers import Model, _ddim_from, ddim_timesteps
from pipeline.scoring.settings import ScoreSettings

SAMPLER = CLASSIFIER_GUIDED


class ClassifierGuidedModel(torch.nn.Module):
    """The unconditional diffusion UNet with its noisy classifier, as one scoring ``network``.

    Called like the UNet (what every sampler calls); the classifier-guided sampler also reads
    ``classifier``. Its weights come from ``classifier_path`` here; ``load_state_dict`` goes to the UNet,
    so the scorer loads ``model.pt`` (the plain ``train`` workflow's file) as for every other sampler.
    """

    def __init__(self, unet: torch.nn.Module, classifier: torch.nn.Module,
                 classifier_path: str | os.PathLike | None = None):
        super().__init__()
        self.unet, self.classifier = unet, classifier
        if classifier_path is not None:
            load_state(classifier, load_checkpoint(classifier_path), classifier_path)
        classifier.eval()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.unet(x, timesteps, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.unet.load_state_dict(state_dict, strict=strict, assign=assign)


def classifier_of(model) -> torch.nn.Module:
    """The classifier carried by ``model`` (through wrappers that keep the model as ``module`` or ``model``)."""
    for _ in range(3):
        if isinstance(getattr(model, "classifier", None), torch.nn.Module):
            return model.classifier
        model = getattr(model, "module", None) or getattr(model, "model", None)
    raise InputError("classifier_path", f"the {SAMPLER} sampler needs a noisy classifier beside the diffusion model: "
                                        "score with the inference_classifier_guided workflow after "
                                        "train_classifier_guided")


def log_prob_grad(classifier, x: torch.Tensor, timesteps: torch.Tensor, target: int = HEALTHY) -> torch.Tensor:
    """grad_x log p(y = target | x_t, t) per slice (the batch's log-probabilities are summed: each slice's own
    gradient). Gradients are switched on here, also inside the samplers' inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x_in, timesteps.clone()), dim=-1)[:, target]
        return torch.autograd.grad(log_p.sum(), x_in)[0]


def guided_eps_shift(classifier, x: torch.Tensor, timesteps: torch.Tensor, scheduler, guidance_scale: float,
                     target: int = HEALTHY) -> torch.Tensor:
    """-s sqrt(1 - abar_t) grad_x log p(y = target | x_t, t): what classifier guidance adds to eps."""
    abar = float(scheduler.alphas_cumprod[int(timesteps[0])])
    return -float(guidance_scale) * (1.0 - abar) ** 0.5 * log_prob_grad(classifier, x, timesteps, target)


def classifier_guided_output(model, classifier, x: torch.Tensor, timesteps: torch.Tensor, scheduler,
                             guidance_scale: float, target: int = HEALTHY) -> torch.Tensor:
    """The network output whose implied eps is shifted by :func:`guided_eps_shift`, at fixed x_t.

    An eps-predicting output moves by the shift itself, a v-predicting one by shift / sqrt(abar_t)
    (eps = sqrt(1 - abar) x_t + sqrt(abar) v), so :func:`pipeline.scoring.samplers._ddim_from` decodes it unchanged.
    """
    shift = guided_eps_shift(classifier, x, timesteps, scheduler, guidance_scale, target)
    if scheduler.prediction_type == "v_prediction":
        shift = shift / float(scheduler.alphas_cumprod[int(timesteps[0])]) ** 0.5
    return model(x, timesteps) + shift


@torch.no_grad()
def classifier_guided_ddim_decode(model, classifier, x_t: torch.Tensor, t_start: int, steps: int, scheduler,
                                  guidance_scale: float, target: int = HEALTHY) -> torch.Tensor:
    """Deterministic DDIM from ``t_start`` to the clean image, eps guided by the classifier towards ``target``."""
    check_invertible(scheduler, SAMPLER, "train_classifier_guided")
    guided = partial(classifier_guided_output, model, classifier, scheduler=scheduler,
                     guidance_scale=guidance_scale, target=target)
    return _ddim_from(guided, x_t, ddim_timesteps(t_start, steps), scheduler)


def classifier_guided_reconstruct(model: Model, x0: torch.Tensor, t_start: int, scheduler,
                                  noise_generator: NoiseGenerator, settings: ScoreSettings,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Healthy counterfactual (Wolleb et al. 2022): DDIM inversion with the unconditional model, then DDIM
    decoding guided by the classifier carried by ``model`` (:class:`ClassifierGuidedModel`), ``settings.ddim_steps``
    calls each way, scale ``settings.guidance_scale``. The samplers' common signature; deterministic."""
    classifier = classifier_of(model)
    check_invertible(scheduler, SAMPLER, "train_classifier_guided")
    latent = ddim_invert(model, x0, t_start, settings.ddim_steps, scheduler)
    return classifier_guided_ddim_decode(model, classifier, latent, t_start, settings.ddim_steps, scheduler,
                                         settings.guidance_scale)
