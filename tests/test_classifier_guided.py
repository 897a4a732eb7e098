"""Classifier-guided counterfactuals (Wolleb et al. 2022): what the guidance computes, and the bundle workflows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import as_cli, tiny

from pipeline.bundle import run_bundle
from pipeline.cli import main
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.classifier_train import NoisyClassifierPrepareBatch, noisy_classifier
from pipeline.model.guided_train import HEALTHY, TUMOUR
from pipeline.model.network import diffusion_unet, make_scheduler
from pipeline.model.noise import make_noise
from pipeline.scoring.classifier_guided import (ClassifierGuidedModel, classifier_guided_ddim_decode,
                                                classifier_guided_output, classifier_guided_reconstruct,
                                                guided_eps_shift)
from pipeline.scoring.guided import ddim_invert
from pipeline.scoring.maps import read_index
from pipeline.scoring.samplers import _ddim_from, ddim_timesteps, predict_x0_eps, timesteps_like
from pipeline.scoring.score import SAMPLERS
from pipeline.scoring.settings import ScoreSettings


pytestmark = pytest.mark.usefixtures("one_thread")


def _random(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``net`` with every weight drawn (MONAI zero-initialises the UNet's output convolution: a fresh one returns 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.05)
    return net.eval()


def _pair(seed=0) -> ClassifierGuidedModel:
    unet = _random(diffusion_unet(16, 1, (16, 16), (False, False), num_head_channels=16, norm_num_groups=8), seed)
    return ClassifierGuidedModel(unet, _random(noisy_classifier(16, 1, (8, 8), norm_num_groups=8), seed + 1))


def _x(n=2, seed=1) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


class LinearLogit(torch.nn.Module):
    """logits (l, 0) with l = (1 + t / 1000) <w, x>: log p(healthy) = l - log(1 + e^l), whose gradient is
    (1 + t / 1000) w sigmoid(-l) in closed form."""

    def __init__(self, size=16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-0.02, 0.03, size * size).view(1, 1, size, size))

    def logit(self, x, t):
        return (1 + t.float() / 1000) * (x * self.w).flatten(1).sum(dim=1)

    def forward(self, x, t):
        return torch.stack([self.logit(x, t), torch.zeros(x.shape[0])], dim=1)


def _hand_grad(classifier: LinearLogit, x, t) -> torch.Tensor:
    scale = (1 + t.float() / 1000).view(-1, 1, 1, 1)
    return scale * classifier.w.detach() * torch.sigmoid(-classifier.logit(x, t).detach()).view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# what the guidance computes


def test_zero_scale_decode_is_the_unguided_ddim_decode():
    scheduler, pair, x = make_scheduler(prediction_type="epsilon"), _pair(), _x()
    guided = classifier_guided_ddim_decode(pair, pair.classifier, x, 100, 4, scheduler, guidance_scale=0.0)
    with torch.inference_mode():
        plain = _ddim_from(pair.unet, x, ddim_timesteps(100, 4), scheduler)
    assert torch.allclose(guided, plain, atol=1e-6, rtol=0)
    pushed = classifier_guided_ddim_decode(pair, pair.classifier, x, 100, 4, scheduler, guidance_scale=50.0)
    assert float((pushed - plain).abs().max()) > 1e-4  # a nonzero scale does move the decode


def test_zero_scale_sampler_is_inversion_then_unguided_decode():
    scheduler, pair, x0 = make_scheduler(prediction_type="epsilon"), _pair(), 0.5 + 0.1 * _x()
    settings = ScoreSettings(sampler="classifier_guided", ddim_steps=3, guidance_scale=0.0)
    counterfactual = classifier_guided_reconstruct(pair, x0, 60, scheduler, None, settings)
    with torch.inference_mode():
        plain = _ddim_from(pair.unet, ddim_invert(pair.unet, x0, 60, 3, scheduler), ddim_timesteps(60, 3), scheduler)
    assert torch.allclose(counterfactual, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [5, 400, 900])
def test_guidance_term_is_the_hand_computed_classifier_gradient(t):
    scheduler, classifier, x, s = make_scheduler(prediction_type="epsilon"), LinearLogit(), _x(3), 7.0
    steps = timesteps_like(t, x)
    abar = float(scheduler.alphas_cumprod[t])
    expected = -s * (1 - abar) ** 0.5 * _hand_grad(classifier, x, steps)
    torch.testing.assert_close(guided_eps_shift(classifier, x, steps, scheduler, s), expected)
    # towards tumour: log p(tumour) = -log(1 + e^l), gradient -(1 + t/1000) w sigmoid(l)
    towards_tumour = guided_eps_shift(classifier, x, steps, scheduler, s, target=TUMOUR)
    sig = torch.sigmoid(classifier.logit(x, steps).detach()).view(-1, 1, 1, 1)
    torch.testing.assert_close(towards_tumour, s * (1 - abar) ** 0.5 * (1 + t / 1000) * classifier.w.detach() * sig)
    with torch.inference_mode():  # as the samplers call it: gradients still flow to the classifier's input
        torch.testing.assert_close(guided_eps_shift(classifier, x, steps, scheduler, s), expected)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guided_output_shifts_the_implied_eps_by_the_guidance_term(prediction):
    scheduler, classifier, x, s, t = make_scheduler(prediction_type=prediction), LinearLogit(), _x(2), 3.0, 300
    scheduler.clip_sample = False
    unet = _pair().unet
    steps = timesteps_like(t, x)
    with torch.no_grad():
        out = unet(x, steps)
        guided = classifier_guided_output(unet, classifier, x, steps, scheduler, s)
    shift = predict_x0_eps(scheduler, guided, x, t)[1] - predict_x0_eps(scheduler, out, x, t)[1]
    abar = float(scheduler.alphas_cumprod[t])
    torch.testing.assert_close(shift, -s * (1 - abar) ** 0.5 * _hand_grad(classifier, x, steps), atol=1e-5, rtol=1e-4)
    # one guided DDIM step (steps=1) is the x0 prediction from the guided eps, by hand
    if prediction == "epsilon":
        eps = out - s * (1 - abar) ** 0.5 * _hand_grad(classifier, x, steps)
        one = classifier_guided_ddim_decode(unet, classifier, x, t, 1, scheduler, s)
        torch.testing.assert_close(one, (x - (1 - abar) ** 0.5 * eps) / abar**0.5, atol=1e-5, rtol=1e-4)


def test_sampler_is_registered_weakly_supervised_and_refuses_what_it_cannot_use():
    settings = ScoreSettings(sampler="classifier_guided")
    assert SAMPLERS["classifier_guided"] is classifier_guided_reconstruct
    assert settings.supervision == "weak slice labels" and settings.to_dict()["supervision"] == "weak slice labels"
    x0 = 0.5 + 0.1 * _x()
    with pytest.raises(Exception, match="classifier_path"):  # a plain UNet carries no classifier
        classifier_guided_reconstruct(_pair().unet, x0, 20, make_scheduler(), None, settings)
    with pytest.raises(Exception, match="prediction_type"):
        classifier_guided_reconstruct(_pair(), x0, 20, make_scheduler(prediction_type="sample"), None, settings)


def test_classifier_batches_are_noised_slices_with_their_labels():
    scheduler = make_scheduler()
    prepare = NoisyClassifierPrepareBatch(scheduler, make_noise("gaussian"), seed=4)
    images, labels = 0.5 + 0.1 * _x(4), torch.tensor([HEALTHY, TUMOUR, TUMOUR, HEALTHY])
    noisy, target, (steps,), kwargs = prepare({"image": images, "label": labels})
    assert torch.equal(target, labels) and kwargs == {}
    assert steps.shape == (4,) and 0 <= int(steps.min()) and int(steps.max()) < scheduler.num_train_timesteps
    abar = scheduler.alphas_cumprod[steps].view(-1, 1, 1, 1)
    noise = (noisy - abar.sqrt() * images) / (1 - abar).sqrt()  # what q(x_t | x0) added: unit Gaussian noise
    assert 0.8 < float(noise.std()) < 1.2
    assert noisy_classifier(16, 1, (8, 8), norm_num_groups=8)(noisy, steps).shape == (4, 2)
    with pytest.raises(Exception, match="classifier_channels"):
        noisy_classifier(16, 1, (8, 12), norm_num_groups=8)


# ----------------------------------------------------------------------------------------------
# the bundle workflows


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared_classifier_guided")


def test_classifier_workflows_train_and_score_one_subject(synth_root, shared, tmp_path):
    settings = tiny(synth_root, tmp_path, shared, image_size=16, unet_channels=[32, 32], norm_num_groups=8,
                    attention_levels=[False, False], batch_size=16, epochs=0, train_steps=2,
                    classifier_train_steps=2, classifier_batch_size=8, classifier_channels=[8, 8],
                    classifier_attention_levels=[False, False])
    flow = run_bundle("train_classifier_guided", **settings)
    assert flow.parser.get_parsed_content("classifier#prepared").cache_dir.name.startswith("labelled-")
    assert flow.parser.get_parsed_content("classifier#trainer").state.iteration == 2
    models = tmp_path / "models"
    assert (models / "model.pt").is_file() and list((models / "classifier").glob("checkpoint_*.pt"))
    noisy_classifier(16, 1, (8, 8), norm_num_groups=8).load_state_dict(load_checkpoint(models / "classifier.pt"))
    # one validation subject scored with the unconditional model and the classifier found beside it
    split = json.loads(Path(settings["split_file"]).read_text())
    one = {**split, "validation": split["validation"][:1]}
    (tmp_path / "one.json").write_text(json.dumps(one))
    score = {**settings, "split_file": str(tmp_path / "one.json"), "t_start": 20, "ddim_steps": 2,
             "score_sections": ["validation"], "residual_norm": "none", "median_3d": 1, "guidance_scale": 5.0}
    # through the CLI: `pipeline score --classifier-guided` runs the inference_classifier_guided workflow
    assert main(["score", "--classifier-guided", "--quiet", *as_cli(score)]) == 0
    assert main(["score", "--classifier-guided", "--guided", *as_cli(score)]) == 2  # one variant at a time
    assert main(["score", "--classifier-guided", "--nproc", "2", *as_cli(score)]) == 2  # one process only
    index = read_index(tmp_path / "scores")
    assert set(index["subjects"]) == set(one["validation"])
    assert index["settings"]["sampler"] == "classifier_guided"
    assert index["settings"]["supervision"] == "weak slice labels" and index["settings"]["guidance_scale"] == 5.0
