"""Model card: a trained model remembers the settings it depends on, and scoring follows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import InputError
from pipeline.model.handlers import save_model
from pipeline.model.model_card import ENFORCED, apply_card, card_path, check_card, read_card
from pipeline.model.network import diffusion_unet

TRAINED = {"noise": "simplex", "simplex_octaves": 6, "simplex_persistence": 0.8, "simplex_feature_size": None,
           "coarse_resolution": None, "schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "sample",
           "modalities": ["FLAIR", "T2w"], "image_size": 16, "pixdim": [4.0, 4.0, 4.0], "fov_mm": 200.0,
           "intensity": "median", "unet_channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
           "num_head_channels": 8, "norm_num_groups": 8, "train_steps": 3, "seed": 0}


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "models" / "model.pt"
    save_model(path, diffusion_unet(16, 2, (8, 16), (False, False), num_head_channels=8, norm_num_groups=8), TRAINED)
    return path


def test_card_is_written_beside_the_weights(model):
    card = json.loads(card_path(model).read_text())
    assert card_path(model).name == "model.card.json" and set(card["settings"]) == set(ENFORCED)
    assert card["settings"]["noise"] == "simplex" and card["training"]["train_steps"] == 3
    assert isinstance(torch.load(model, weights_only=True), dict)  # model.pt stays a plain state dict


def test_scoring_without_a_noise_setting_uses_the_trained_noise(model):
    settings = apply_card(model, {"sampler": "x0", "t_start": 100})
    assert settings["noise"] == "simplex" and settings["modalities"] == ["FLAIR", "T2w"]
    assert settings["sampler"] == "x0" and settings["image_size"] == 16


@pytest.mark.parametrize("override", [{"noise": "gaussian"}, {"modalities": "FLAIR"}, {"image_size": 32},
                                      {"prediction_type": "epsilon"}, {"unet_channels": [16, 32]}])
def test_a_contradicting_override_is_refused(model, override):
    with pytest.raises(InputError, match="trained with") as err:
        apply_card(model, override)
    assert err.value.source == str(card_path(model))
    with pytest.raises(InputError, match="contradict the model card"):
        check_card(model, {**TRAINED, **override})


def test_equal_values_in_other_spellings_are_accepted(model):
    same = {"modalities": "FLAIR,T2w", "pixdim": 4, "fov_mm": 200, "noise": "simplex"}
    assert apply_card(model, same)["pixdim"] == 4
    assert check_card(model, {**TRAINED, **same})


def test_a_model_without_its_card_is_refused_unless_allowed_and_the_baseline_is_not_checked(tmp_path, model):
    assert read_card(tmp_path / "old.pt") is None and apply_card(tmp_path / "old.pt", {"noise": "x"}) == {"noise": "x"}
    assert not check_card(model, {"noise": "gaussian"}, needs_model=False)  # the FLAIR baseline loads no model
    bare = tmp_path / "copied" / "model.pt"
    bare.parent.mkdir()
    bare.write_bytes(Path(model).read_bytes())  # the weights copied without model.card.json
    for call in (lambda: apply_card(bare, {"noise": "gaussian"}), lambda: check_card(bare, {"noise": "gaussian"})):
        with pytest.raises(InputError, match="has no model card") as err:
            call()
        assert err.value.source == str(bare)
    assert apply_card(bare, {"noise": "gaussian", "allow_missing_card": True})["noise"] == "gaussian"
    assert not check_card(bare, {"noise": "gaussian"}, allow_missing=True)
    card_path(model).write_text("{not json")
    with pytest.raises(InputError, match="unreadable model card"):
        read_card(model)


def test_bundle_scoring_follows_the_card_of_a_simplex_model(synth_root, tmp_path):
    """Trained with simplex noise, scored with no noise setting: simplex; with --noise gaussian: refused."""
    from test_train import tiny

    from pipeline.bundle import make_workflow, run_bundle
    from pipeline.errors import find_input_error

    settings = tiny(synth_root, tmp_path / "run", tmp_path / "shared", noise="simplex", modalities=["FLAIR", "T2w"])
    run_bundle("train", **settings)
    scoring = {k: v for k, v in settings.items() if k not in ("noise", "modalities", "epochs", "train_steps")}
    flow = make_workflow("inference", **scoring)
    assert flow.parser.get_parsed_content("noise_generator").noise_type == "simplex"
    assert list(flow.parser.get_parsed_content("preprocess").modalities) == ["FLAIR", "T2w"]
    with pytest.raises(Exception) as info:
        make_workflow("inference", **scoring, noise="gaussian")
    found = find_input_error(info.value)
    assert found is not None and "noise='gaussian' (trained with 'simplex')" in found.problem


def test_multi_process_scoring_takes_the_card_too(model, monkeypatch):
    """`pipeline score --nproc N` fills the settings from the card before torchrun starts the ranks."""
    import subprocess

    from pipeline.cli import workflows

    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kwargs: launched.append(cmd) or 0)
    workflows.run_torchrun("multi_gpu_inference", 2, {"model_path": str(model), "sampler": "x0"})
    args = launched[0]
    assert args[args.index("--noise") + 1] == "simplex" and args[args.index("--image_size") + 1] == "16"
    with pytest.raises(InputError, match="trained with"):
        workflows.run_torchrun("multi_gpu_inference", 2, {"model_path": str(model), "noise": "gaussian"})
