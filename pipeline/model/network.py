"""The model: a 2D DiffusionModelUNet and its DDPM scheduler, built from validated settings.

What the bundle's ``network_def`` and ``scheduler`` name (model-zoo convention: one place defines the
network); :func:`traced_diffusion_unet` is the same network traced for ``ckpt_export``.
"""

from __future__ import annotations

import warnings
from typing import Sequence
from unittest import mock

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets import diffusion_model_unet as _dmu
from monai.networks.schedulers import DDPMScheduler

from pipeline.errors import InputError

SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "cosine": "cosine"}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def diffusion_unet(
    image_size: int,
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int = 1,
    num_head_channels: int = 32,
    norm_num_groups: int = 32,
    num_class_embeds: int | None = None,
) -> DiffusionModelUNet:
    """2D DiffusionModelUNet, refusing image sizes its down/up-sampling path cannot take.

    ``num_class_embeds``: a class-conditional network (a learned embedding per class added to the
    timestep embedding; :mod:`pipeline.scoring.guided`); None, the default, is the unconditional one.
    """
    factor = 2 ** (len(channels) - 1)
    if int(image_size) % factor:
        raise InputError("image_size", f"{image_size} is not divisible by {factor}, which a UNet with "
                                       f"{len(channels)} levels needs; use e.g. {int(image_size) // factor * factor or factor}")
    if len(attention_levels) != len(channels):
        raise InputError("attention_levels", f"needs one entry per level ({len(channels)}), got {list(attention_levels)}")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise InputError("unet_channels", f"{list(channels)}: {bad} not divisible by norm_num_groups={norm_num_groups}")
    attended = [c for c, a in zip(channels, attention_levels) if a] + [channels[-1]]  # the middle block attends
    bad = sorted({c for c in attended if c % num_head_channels})
    if bad:
        raise InputError("unet_channels", f"{list(channels)}: {bad} (attention levels and the middle block) not "
                                          f"divisible by num_head_channels={num_head_channels}")
    try:
        return DiffusionModelUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
            attention_levels=tuple(attention_levels), num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
            num_class_embeds=None if num_class_embeds is None else int(num_class_embeds),
        )
    except (ValueError, TypeError) as err:  # any other combination MONAI refuses: one line naming the settings
        raise InputError("network", f"DiffusionModelUNet refuses unet_channels={list(channels)}, attention_levels="
                                    f"{list(attention_levels)}, num_head_channels={num_head_channels}, "
                                    f"norm_num_groups={norm_num_groups}: {err}") from None


def traced_diffusion_unet(image_size: int, in_channels: int = 1, **kwargs) -> torch.jit.ScriptModule:
    """:func:`diffusion_unet` traced to TorchScript, for ``python -m monai.bundle ckpt_export``.

    DiffusionModelUNet cannot be scripted (MONAI's attention and upsample blocks), and
    ckpt_export's ``--use_trace`` feeds the network one tensor while the UNet takes ``(x, timesteps)``.
    Exporting with ``--network_def#_target_ pipeline.model.network.traced_diffusion_unet`` makes
    ``network_def`` this traced module instead; ckpt_export loads the checkpoint into it (same
    parameter names) and saves it. The timestep embedding is scripted inside the trace, so no device
    is baked into the exported model; batch size stays free.
    """
    net = diffusion_unet(image_size, in_channels, **kwargs).eval()
    x = torch.zeros(1, int(in_channels), int(image_size), int(image_size))
    timesteps = torch.zeros(1, dtype=torch.long)
    embedding = torch.jit.script(_dmu.get_timestep_embedding)  # traced, torch.arange would pin the device
    with torch.no_grad(), warnings.catch_warnings(), mock.patch.object(_dmu, "get_timestep_embedding", embedding):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # GroupNorm's batch-size check only
        # check_trace would trace twice more to compare; tests/test_export.py compares outputs instead
        return torch.jit.trace(net, (x, timesteps), check_trace=False)


def make_scheduler(schedule: str = "linear", num_train_timesteps: int = 1000,
                   prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPMScheduler with a named beta schedule and prediction target, validated up front."""
    if schedule not in SCHEDULES:
        raise InputError("schedule", f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError("prediction_type", f"unknown prediction type {prediction_type!r}; "
                                            f"choose one of {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=SCHEDULES[schedule],
                         prediction_type=prediction_type)
