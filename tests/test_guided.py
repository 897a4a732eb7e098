"""Guided counterfactuals (classifier-free guidance, Sanchez et al. 2022): tiny 16x16 / 32x32 runs."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_score import Oracle
from test_train import as_cli, tiny

from pipeline.bundle import run_bundle
from pipeline.cli import main
from pipeline.data.dataset import PreprocessConfig, dataset_split_file, load_subjects
from pipeline.data.slice_cache import LabelledSliceDataset, build_labelled_slice_cache
from pipeline.data.transforms import preprocess_transforms
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.guided_train import HEALTHY, NULL, TUMOUR, ClassConditionalInferer, GuidedPrepareBatch, labels_like
from pipeline.model.network import diffusion_unet, make_scheduler
from pipeline.model.noise import make_noise
from pipeline.scoring.guided import ddim_invert, guided_ddim_decode, guided_output, guided_reconstruct
from pipeline.scoring.maps import read_index
from pipeline.scoring.samplers import _ddim_from, ddim_timesteps
from pipeline.scoring.settings import SAMPLER_NAMES, ScoreSettings

PREPROCESS = PreprocessConfig(image_size=32, pixdim=(4.0, 4.0, 4.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _slices(n=2, size=16, seed=0) -> torch.Tensor:
    return 0.1 + 0.8 * torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny_conditional_unet(seed=0) -> torch.nn.Module:
    """A random class-conditional UNet whose output depends on x, t and the class: MONAI zero-initialises
    the output convolution (a fresh network returns 0), so those weights are drawn too; groups of 4
    channels, since a GroupNorm of one channel per group erases the (time + class) embedding, a
    per-channel constant, right after the block adds it."""
    torch.manual_seed(seed)
    net = diffusion_unet(16, 1, (32, 32, 32), (False, False, False), norm_num_groups=8, num_class_embeds=3).eval()
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(0, 0.05)
    return net


def _guided(steps: int, scale: float = 3.0) -> ScoreSettings:
    return ScoreSettings(sampler="guided", ddim_steps=steps, guidance_scale=scale)


class LabelledOracle(Oracle):
    """The exact denoiser for ``x0`` whatever the class (what a perfect model of these slices returns)."""

    def __call__(self, x_t, t, class_labels=None):
        copies = x_t.shape[0] // self.x0.shape[0]  # guidance sends both branches as one batch
        return Oracle(self.scheduler, self.x0.repeat(copies, 1, 1, 1))(x_t, t)


class ClassStub:
    """Output = x + c[label] + t / 1000: guidance must mix the branches exactly as the formula says."""

    c = torch.tensor([0.3, -0.7, 0.1])  # healthy, tumour, null

    def __call__(self, x, t, class_labels):
        return x + self.c[class_labels].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float() / 1000


# ----------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_inversion_then_decoding_returns_the_input_with_an_oracle(prediction):
    scheduler = make_scheduler(prediction_type=prediction)
    x0 = _slices().double()
    model = LabelledOracle(scheduler, x0)
    latent = ddim_invert(model, x0, 250, 10, scheduler, labels_like(NULL, x0))
    assert not torch.allclose(latent, x0, atol=0.1)  # it really went somewhere noisy
    back = guided_ddim_decode(model, latent, 250, 10, scheduler, guidance_scale=0.0)
    torch.testing.assert_close(back, x0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_round_trip_of_a_random_network_is_close_when_steps_are_many(prediction):
    """Deterministic DDIM inversion + unguided decoding (w = 0, null class) with a tiny random UNet:
    the only error is eps changing between neighbouring levels, first order in the step size."""
    scheduler = make_scheduler(prediction_type=prediction)
    scheduler.clip_sample = False
    net, x0 = _tiny_conditional_unet(), _slices()
    errors = {}
    for steps in (5, 50):
        latent = ddim_invert(net, x0, 50, steps, scheduler, labels_like(NULL, x0))
        assert float((latent - x0).abs().max()) > 0.2  # it really went somewhere noisy
        back = guided_ddim_decode(net, latent, 50, steps, scheduler, guidance_scale=0.0)
        errors[steps] = float((back - x0).abs().max())
    assert errors[50] < 0.01 and errors[50] < errors[5] / 5


def test_guided_sampler_refuses_an_x0_predicting_model():
    scheduler = make_scheduler(prediction_type="sample")
    with pytest.raises(Exception, match="prediction_type"):
        guided_reconstruct(_tiny_conditional_unet(), _slices(), 20, scheduler, None, _guided(steps=2))


def test_zero_guidance_is_the_unconditional_decode():
    scheduler = make_scheduler(prediction_type="epsilon")
    net, x = _tiny_conditional_unet(), torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    guided = guided_ddim_decode(net, x, 100, 4, scheduler, guidance_scale=0.0)
    with torch.inference_mode():
        plain = _ddim_from(partial(net, class_labels=labels_like(NULL, x)), x, ddim_timesteps(100, 4), scheduler)
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=0)


def test_guidance_formula_matches_a_hand_computation():
    stub, w = ClassStub(), 3.0
    x = _slices(3)
    t = torch.full((3,), 40, dtype=torch.long)
    expected = x + 0.04 + stub.c[NULL] + w * (stub.c[HEALTHY] - stub.c[NULL])
    torch.testing.assert_close(guided_output(stub, x, t, w), expected)
    towards_tumour = x + 0.04 + stub.c[NULL] + w * (stub.c[TUMOUR] - stub.c[NULL])
    torch.testing.assert_close(guided_output(stub, x, t, w, target=TUMOUR), towards_tumour)
    # one guided DDIM step (steps=1) is the x0 prediction from the guided eps, by hand
    scheduler = make_scheduler(prediction_type="epsilon")
    scheduler.clip_sample = False
    abar = float(scheduler.alphas_cumprod[40])
    eps = x + 0.04 + stub.c[NULL] + w * (stub.c[HEALTHY] - stub.c[NULL])
    torch.testing.assert_close(guided_ddim_decode(stub, x, 40, 1, scheduler, w), (x - (1 - abar) ** 0.5 * eps) / abar**0.5)


def test_guided_counterfactual_is_deterministic_and_supervision_is_labelled():
    scheduler = make_scheduler(prediction_type="epsilon")
    net, x0 = _tiny_conditional_unet(), _slices()
    a = guided_reconstruct(net, x0, 50, scheduler, None, _guided(steps=3, scale=3.0))
    torch.testing.assert_close(a, guided_reconstruct(net, x0, 50, scheduler, None, _guided(steps=3, scale=3.0)))
    assert (a - guided_reconstruct(net, x0, 50, scheduler, None, _guided(steps=3, scale=0.0))).abs().max() > 1e-3
    assert ScoreSettings(sampler="guided").to_dict()["supervision"] == "weak slice labels"
    for sampler in set(SAMPLER_NAMES) - {"guided", "classifier_guided"}:  # both learn from slice labels
        settings = ScoreSettings(sampler=sampler, patch_size=8)
        assert settings.to_dict()["supervision"] == "unsupervised"


# ----------------------------------------------------------------------------------------------
# training pieces


def test_condition_dropout_rate_is_honoured():
    scheduler = make_scheduler()
    labels = torch.ones(20000, dtype=torch.long)
    batch = GuidedPrepareBatch(scheduler, make_noise("gaussian"), seed=3, drop_prob=0.15)
    dropped = batch.drop_labels(labels)
    assert set(dropped.unique().tolist()) <= {TUMOUR, NULL}
    rate = float((dropped == NULL).float().mean())
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / len(labels)) ** 0.5
    assert torch.equal(GuidedPrepareBatch(scheduler, make_noise("gaussian"), drop_prob=0).drop_labels(labels), labels)
    assert (GuidedPrepareBatch(scheduler, make_noise("gaussian"), drop_prob=1).drop_labels(labels) == NULL).all()
    with pytest.raises(Exception, match="condition_dropout"):
        GuidedPrepareBatch(scheduler, make_noise("gaussian"), drop_prob=1.5)


def test_class_labels_reach_the_network():
    scheduler = make_scheduler()
    prepare = GuidedPrepareBatch(scheduler, make_noise("gaussian"), seed=0, drop_prob=0.0)
    batch = {"image": _slices(4), "label": torch.tensor([0, 1, 1, 0])}
    images, target, args, kwargs = prepare(batch)
    assert torch.equal(kwargs["class_labels"], batch["label"])
    seen = {}

    def network(x, timesteps, context=None, class_labels=None):
        seen["labels"] = class_labels
        return x

    ClassConditionalInferer(scheduler)(images, network, *args, **kwargs)
    assert torch.equal(seen["labels"], batch["label"])


# ----------------------------------------------------------------------------------------------
# labelled cache and the bundle workflows


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared_guided")


def test_labelled_cache_labels_slices_from_training_subjects_only(synth_root, shared):
    split = dataset_split_file(synth_root, shared / "split.json")
    cache = build_labelled_slice_cache(synth_root, shared / "cache", split, PREPROCESS, workers=1, progress=False)
    assert cache.name.startswith("labelled-") and build_labelled_slice_cache(
        synth_root, shared / "cache", split, PREPROCESS, workers=1, progress=False) == cache  # reused
    items = {i["subject"]: i for i in load_subjects(synth_root).data}
    transform = preprocess_transforms(PREPROCESS, with_label=True)
    for section in ("train", "validation"):
        data = LabelledSliceDataset(cache, section)
        subjects = {row["subject"] for row in data.index}
        assert subjects <= set(split[section]) and not subjects & set(split["test"])
        for subject in subjects:  # each slice label from that subject's own ground truth
            out = transform(dict(items[subject]))
            tumour = np.asarray(out["tumour"][0]).reshape(-1, out["tumour"].shape[-1]).any(axis=0)
            rows = [(i, row) for i, row in enumerate(data.index) if row["subject"] == subject]
            for i, row in rows:
                assert int(data[i]["label"]) == row["label"] == int(tumour[row["z"]])
                np.testing.assert_allclose(data[i]["image"].numpy(), np.asarray(out["image"][..., row["z"]]), atol=1e-6)
    train_labels = LabelledSliceDataset(cache, "train").labels
    assert {0, 1} <= set(train_labels.tolist())  # healthy and tumour slices both kept


def test_guided_workflows_train_and_score_end_to_end(synth_root, shared, tmp_path):
    settings = tiny(synth_root, tmp_path, shared, image_size=16, unet_channels=[32, 32], norm_num_groups=8,
                    attention_levels=[False, False], batch_size=32, epochs=0, train_steps=3)
    flow = run_bundle("train_guided", **settings)
    assert flow.parser.get_parsed_content("prepared").cache_dir.name.startswith("labelled-")
    weights = load_checkpoint(tmp_path / "models" / "model.pt")
    assert any(k.startswith("class_embedding") for k in weights)
    # scoring through the CLI: `pipeline score --guided` runs the inference_guided workflow
    score = {**settings, "t_start": 20, "ddim_steps": 2, "score_sections": ["validation"], "residual_norm": "none",
             "median_3d": 1, "guidance_scale": 3.0}
    assert main(["score", "--guided", "--quiet", *as_cli(score)]) == 0
    assert main(["score", "--guided", "--nproc", "2", *as_cli(score)]) == 2  # one process only
    index = read_index(tmp_path / "scores")
    assert index["settings"]["sampler"] == "guided" and index["settings"]["supervision"] == "weak slice labels"
    assert index["settings"]["guidance_scale"] == 3.0 and index["settings"]["prediction_type"] == "epsilon"
    split = json.loads(Path(settings["split_file"]).read_text())
    assert set(index["subjects"]) == set(split["validation"])
