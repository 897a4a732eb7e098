"""Noisy-slice classifier for classifier-guided counterfactuals (Wolleb et al. 2022; Dhariwal & Nichol 2021).

MONAI's ``DiffusionModelEncoder`` (the diffusion UNet's encoder with a fully connected head, as in MONAI's
classifier-guidance tutorial) learns p(tumour | x_t, t) from slice labels (weak supervision). Its slices are
noised to a random timestep each with the diffusion model's own schedule and noise, so its gradient means
something at every level the guided decoding visits. The unconditional diffusion model it guides is the
plain ``train`` workflow's ``model.pt``; the classifier goes beside it (``classifier.pt``, its checkpoints
in ``ckpt_dir/classifier``). Scoring with both lives in :mod:`pipeline.scoring.classifier_guided`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder  # not re-exported by monai.networks.nets

from pipeline.errors import InputError
from pipeline.model.train import NoisePrepareBatch

NUM_CLASSES = 2  # healthy (0) and tumour (1), as pipeline.model.guided_train.HEALTHY / TUMOUR


def noisy_classifier(image_size: int, in_channels: int = 1, channels: Sequence[int] = (32, 64, 64),
                     attention_levels: Sequence[bool] | None = None, num_res_blocks: int = 1,
                     num_head_channels: int = 32, norm_num_groups: int = 32) -> DiffusionModelEncoder:
    """A timestep-aware 2D classifier of healthy / tumour slices (logits, shape (B, 2)); settings MONAI
    refuses are one line naming them. ``attention_levels``: None, no attention at any level."""
    attention_levels = (False,) * len(channels) if attention_levels is None else attention_levels
    try:
        return DiffusionModelEncoder(
            spatial_dims=2, in_channels=int(in_channels), out_channels=NUM_CLASSES,
            input_shape=(int(image_size), int(image_size)), channels=tuple(channels),
            attention_levels=tuple(attention_levels), num_res_blocks=(int(num_res_blocks),) * len(channels),
            num_head_channels=int(num_head_channels), norm_num_groups=int(norm_num_groups))
    except (ValueError, TypeError) as err:
        raise InputError("classifier_channels", f"DiffusionModelEncoder refuses classifier_channels={list(channels)}, "
                                                f"classifier_attention_levels={list(attention_levels)}, "
                                                f"norm_num_groups={norm_num_groups}: {err}") from None


class NoisyClassifierPrepareBatch(NoisePrepareBatch):
    """Slices noised to random timesteps (q(x_t | x0) with the run's scheduler and noise) and their slice labels.

    Returns what ``SupervisedTrainer`` hands to ``SimpleInferer``: the classifier is called as
    ``network(x_t, timesteps)`` and its logits compared with the labels. The noise and timestep streams
    are the parent's, seeded and checkpointed, so a resumed run continues them.
    """

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        images = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking)
        noise, timesteps = self.get_noise(images), self.get_timesteps(images)
        labels = torch.as_tensor(batchdata["label"]).long().flatten().to(images.device)
        return self.scheduler.add_noise(images, noise, timesteps), labels, (timesteps,), {}
