"""Model card: the settings a trained model depends on, written beside its weights.

``model.pt`` stays a plain state dict (what MONAI's ``ckpt_export`` and model-zoo tools load);
``model.card.json`` beside it records the bundle settings that must be the same at scoring time
for the weights to mean anything: the noise (type and parameters), the diffusion schedule and
prediction type, the preprocessing (modalities, image size, voxel size, field of view, intensity
scaling) and the network shape, plus the code version and training length for the record.

Scoring reads the card by default (:func:`apply_card`: a setting the user did not give is taken
from the card) and refuses a contradicting one (:func:`check_card`, also run by the inference
config itself, so ``python -m monai.bundle run`` is protected too): a simplex model scored with
Gaussian noise, or a 4-channel model fed FLAIR only, is an error, not a quiet wrong number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.common import read_json
from pipeline.errors import InputError

CARD_FORMAT = 1
ENFORCED = ("noise", "simplex_octaves", "simplex_persistence", "simplex_feature_size", "coarse_resolution",
            "schedule", "num_train_timesteps", "prediction_type", "modalities", "image_size", "pixdim", "fov_mm",
            "intensity", "unet_channels", "attention_levels", "num_res_blocks", "num_head_channels",
            "norm_num_groups")
"""Bundle config ids that must agree between training and scoring."""
RECORDED = ("train_steps", "epochs", "batch_size", "learning_rate", "ema_decay", "seed", "split_seed")
"""Recorded for people reading the card; scoring with other values is fine."""


def card_path(model_path: str | os.PathLike) -> Path:
    """``models/model.pt`` -> ``models/model.card.json``."""
    path = Path(model_path)
    return path.with_name(path.stem + ".card.json")


def as_json_data(value):
    """Comparable JSON data (tuples as lists): what a card or a checkpoint holds, so a saved and a fresh copy
    of the same settings compare equal."""
    return json.loads(json.dumps(value, default=list))


def _normalised(key: str, value):
    """The value as compared: modalities by their canonical names, numbers as floats, pixdim as 3."""
    if key == "modalities":
        from pipeline.data.dataset import normalise_modalities

        return normalise_modalities(value)
    value = as_json_data(value)
    if key == "pixdim":
        return [float(v) for v in (value if isinstance(value, list) else [value] * 3)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def write_card(model_path: str | os.PathLike, settings: dict) -> Path:
    """Write the card of ``model_path`` from the training run's bundle settings."""
    from pipeline import __version__

    missing = [k for k in ENFORCED if k not in settings]
    if missing:
        raise InputError("model card", f"training settings lack {', '.join(missing)}")
    card = {"format": CARD_FORMAT, "code_version": __version__, "model": Path(model_path).name,
            "settings": {k: as_json_data(settings[k]) for k in ENFORCED},
            "training": {k: as_json_data(settings[k]) for k in RECORDED if k in settings}}
    path = card_path(model_path)
    write_json(path, card)
    return path


def read_card(model_path: str | os.PathLike) -> dict | None:
    """The card's enforced settings, or None when the model has no card (trained before cards)."""
    path = card_path(model_path)
    if not path.is_file():
        return None
    card = read_json(path, "model card")
    if not isinstance(card, dict) or not isinstance(card.get("settings"), dict):
        raise InputError(path, "not a model card (needs a 'settings' mapping)")
    return card["settings"]


def _conflicts(card: dict, given: dict) -> list[str]:
    return [f"{key}={given[key]!r} (trained with {card[key]!r})" for key in ENFORCED
            if key in card and key in given and _normalised(key, given[key]) != _normalised(key, card[key])]


def _checked(model_path: str | os.PathLike, settings: dict, what: str) -> dict | None:
    """The card's settings (None without a card), after refusing ``settings`` that contradict it."""
    card = read_card(model_path)
    bad = _conflicts(card, settings) if card is not None else []
    if bad:
        raise InputError(card_path(model_path), f"{what}: {'; '.join(bad)}")
    return card


def _refuse_missing(model_path: str | os.PathLike, allow_missing: bool) -> None:
    """A model file without its card would be scored with whatever settings are given (the bundle's defaults,
    silently): refused unless the user says they know the settings."""
    if not allow_missing and Path(model_path).is_file():
        raise InputError(model_path, f"has no model card ({card_path(model_path).name} beside it), so the settings it "
                                     "was trained with are unknown; copy the card with the model, or give the "
                                     "settings yourself and --allow-missing-card true")


def apply_card(model_path: str | os.PathLike, overrides: dict) -> dict:
    """``overrides`` completed with the card's settings; a contradicting override is refused, and so is a model
    without a card unless ``overrides`` says ``allow_missing_card``."""
    card = _checked(model_path, overrides, "the model was trained otherwise; remove or fix")
    if card is None:
        _refuse_missing(model_path, bool(overrides.get("allow_missing_card", False)))
        return overrides
    return {**{k: v for k, v in card.items() if k in ENFORCED}, **overrides}


def check_card(model_path: str | os.PathLike, settings: dict, needs_model: bool = True,
               allow_missing: bool = False) -> bool:
    """Refuse scoring ``model_path`` with settings its card contradicts, or without a card unless
    ``allow_missing`` (True when a card was checked)."""
    if not needs_model:
        return False
    card = _checked(model_path, settings, "scoring settings contradict the model card")
    if card is None:
        _refuse_missing(model_path, allow_missing)
    return card is not None
