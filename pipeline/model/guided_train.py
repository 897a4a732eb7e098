"""Class-conditional training for guided counterfactuals (Sanchez et al. 2022; Ho & Salimans 2021).

A DiffusionModelUNet with a class embedding learns healthy (0) and tumour (1) slices from slice-level
labels; with probability ``drop_prob`` a training label is replaced by the null class (2), so the same
network also learns the unconditional model. Scoring with it lives in :mod:`pipeline.scoring.guided`.
"""

from __future__ import annotations

from functools import partial

import torch
from monai.inferers import DiffusionInferer

from pipeline.errors import InputError
from pipeline.model.train import NoisePrepareBatch

HEALTHY, TUMOUR, NULL = 0, 1, 2
NUM_CLASSES = 3  # healthy, tumour and the null (empty) condition


def labels_like(label: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(label), device=x.device, dtype=torch.long)


class GuidedPrepareBatch(NoisePrepareBatch):
    """:class:`NoisePrepareBatch` plus the slice labels as ``class_labels``, each replaced by the
    null class with probability ``drop_prob`` (condition dropout).

    The dropout draws come from the seeded timestep generator, so they are checkpointed with it and
    a resumed run continues the same stream.
    """

    def __init__(self, scheduler, noise, seed: int = 0, patch_size: int | None = None, drop_prob: float = 0.15,
                 null_class: int = NULL):
        super().__init__(scheduler, noise, seed, patch_size)
        if not 0 <= float(drop_prob) <= 1:
            raise InputError("condition_dropout", f"must be in [0, 1], got {drop_prob!r}")
        self.drop_prob, self.null_class = float(drop_prob), int(null_class)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        labels = self.drop_labels(torch.as_tensor(batchdata["label"]).long().flatten())
        return images, target, args, {**infer_kwargs, "class_labels": labels.to(images.device)}

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with each one replaced by the null class with probability ``drop_prob``."""
        drop = torch.rand(labels.shape[0], generator=self.generator) < self.drop_prob
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)


class ClassConditionalInferer(DiffusionInferer):
    """MONAI's DiffusionInferer passes only ``condition`` (as cross-attention context) to the network;
    this one also forwards the prepare-batch's ``class_labels`` (the class embedding's input)."""

    def __call__(self, inputs, diffusion_model, noise, timesteps, class_labels=None, **kwargs):  # type: ignore[override]
        model = diffusion_model if class_labels is None else partial(diffusion_model, class_labels=class_labels)
        return super().__call__(inputs, model, noise, timesteps, **kwargs)
