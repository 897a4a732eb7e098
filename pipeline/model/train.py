"""Train stage: DiffusionModelUNet on healthy slices, driven by ``monai.engines.SupervisedTrainer``.

This module holds the pieces the bundle's ``train`` config wires together (the network and
scheduler factories live in :mod:`pipeline.model.network`): a prepare-batch that draws Gaussian,
simplex or coarse noise, an EMA of the weights, atomic checkpoints with resume (built on
:mod:`pipeline.model.checkpoint`), and the loaders.
"""

from __future__ import annotations

import math

import torch
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.engines import DiffusionPrepareBatch
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader

from pipeline.common import is_int
from pipeline.data.slice_cache import SliceDataset
from pipeline.errors import InputError
from pipeline.model.checkpoint import EpochSampler, gather, rank_and_world
from pipeline.model.noise import NoiseGenerator

# ----------------------------------------------------------------------------------------------
# batches


RANK_SEED_STRIDE = 1000
"""Seed offset between DDP ranks' noise streams (far from the +1 validation stream)."""


class NoisePrepareBatch(DiffusionPrepareBatch):
    """Draws epsilon from the run's NoiseGenerator and timesteps from its own seeded generator.

    The target follows the scheduler's prediction type (epsilon, x0 or v). Its state is
    checkpointed so a resumed run continues the same noise stream. Under DDP every rank draws its own
    streams (seed offset by :data:`RANK_SEED_STRIDE` times its rank; rank 0 keeps the run's seed):
    with one seed all ranks would noise their different slices with identical noise and timesteps.
    """

    def __init__(self, scheduler: DDPMScheduler, noise: NoiseGenerator, seed: int = 0, patch_size: int | None = None):
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        rank = rank_and_world()[0]
        if rank:
            seed, noise = seed + RANK_SEED_STRIDE * rank, noise.with_seed(noise.seed + RANK_SEED_STRIDE * rank)
        self.scheduler, self.noise, self.seed = scheduler, noise, seed
        self.patch_size = None if patch_size is None else int(patch_size)
        if self.patch_size is not None and self.patch_size < 1:
            raise InputError("patch_size", f"must be a positive number of pixels, got {patch_size!r}")
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        """As MONAI's, plus patched noising (pDDPM): with ``patch_size`` set, each sample is noised
        only inside one random square patch and stays clean elsewhere (the context the model sees
        when scoring with the patched sampler)."""
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        if self.patch_size is None:
            return images, target, args, infer_kwargs
        noise = clean_outside(images, infer_kwargs["noise"], infer_kwargs["timesteps"], self.scheduler,
                              self.random_patches(images))
        target = self.get_target(images, noise, infer_kwargs["timesteps"])
        return images, target, args, {**infer_kwargs, "noise": noise}

    def random_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) masks of one ``patch_size`` square per sample, placed by the seeded generator."""
        b, _, h, w = images.shape
        size = min(self.patch_size, h, w)
        tops = torch.randint(0, h - size + 1, (b,), generator=self.generator)
        lefts = torch.randint(0, w - size + 1, (b,), generator=self.generator)
        masks = torch.zeros(b, 1, h, w, device=images.device, dtype=images.dtype)
        for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
            masks[i, :, top:top + size, left:left + size] = 1
        return masks

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return self.noise(tuple(images.shape), device=images.device, dtype=images.dtype)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        steps = torch.randint(0, self.num_train_timesteps, (images.shape[0],), generator=self.generator)
        return steps.to(images.device)

    def get_target(self, images, noise, timesteps):
        kind = self.scheduler.prediction_type
        if kind == "sample":
            return images
        if kind == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise

    def reset(self) -> None:
        """Restart both streams (validation uses this so every epoch sees the same noise)."""
        self.generator.manual_seed(self.seed)
        self.noise.reset()

    def state_dict(self) -> dict:
        """Every rank's streams (collective under DDP, like :class:`GlobalRNG`): rank 0 saves them all."""
        return {"ranks": gather({"timesteps": self.generator.get_state(), "noise": self.noise.state_dict()})}

    def load_state_dict(self, state: dict) -> None:
        """This rank's streams (a checkpoint from before per-rank streams holds one, which every rank takes)."""
        ranks = state.get("ranks", [state])
        own = ranks[min(rank_and_world()[0], len(ranks) - 1)]
        self.generator.set_state(own["timesteps"])
        self.noise.load_state_dict(own["noise"])


def clean_outside(images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler,
                  mask: torch.Tensor) -> torch.Tensor:
    """Noise such that ``scheduler.add_noise(images, noise, t)`` equals the clean image outside ``mask``.

    MONAI's inferer always computes sqrt(abar) x0 + sqrt(1 - abar) eps; choosing
    eps = x0 (1 - sqrt(abar)) / sqrt(1 - abar) outside the patch makes that x0 there, so patched
    training runs through the stock ``DiffusionInferer``.
    """
    abar = scheduler.alphas_cumprod.to(images.device)[timesteps].view(-1, 1, 1, 1).to(images.dtype)
    context = images * (1 - abar.sqrt()) / (1 - abar).sqrt()
    return mask * noise + (1 - mask) * context


def slice_loader(dataset: SliceDataset, batch_size: int = 32, shuffle: bool = True, num_workers: int = 0,
                 seed: int = 0, pin_memory: bool = False) -> DataLoader:
    """Loader over cached slices (a :class:`SliceDataset`, the config's ``train#dataset``), in an order a
    resumed run can replay (:class:`EpochSampler`).

    The loader's own seeded generator draws the worker base seeds, so iterating it never touches the
    global torch RNG (a resumed run creates its iterators at other moments than an uninterrupted one).
    Under DDP every loader is sharded across the ranks by itself (a setting that could disagree with
    how the run was launched would let every rank go over all slices): a shuffled one by
    :class:`EpochSampler`, an ordered one (validation) in disjoint shares without padding, so every
    slice is seen once and MONAI's metric handlers gather the shares into one value.
    """
    rank, world = rank_and_world()
    if shuffle:
        sampler = EpochSampler(dataset, shuffle=True, seed=seed, distributed=world > 1)
    else:
        sampler = (MonaiDistributedSampler(dataset, even_divisible=False, num_replicas=world, rank=rank, shuffle=False)
                   if world > 1 else None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=False,
                      persistent_workers=num_workers > 0, pin_memory=bool(pin_memory),
                      generator=torch.Generator().manual_seed(int(seed)))


# ----------------------------------------------------------------------------------------------
# training length and learning rate


def total_steps(train_steps: int | None, epochs: int | None, loader: DataLoader) -> int:
    """Optimiser steps of the run: ``train_steps`` when positive (comparable across data sizes), else
    (0 or None) ``epochs`` passes over the loader. 0 exists because bundle overrides drop None values."""
    if train_steps:
        if not is_int(train_steps) or train_steps < 1:
            raise InputError("train_steps", f"must be a positive integer, or 0 to train epochs, got {train_steps!r}")
        return train_steps
    if not is_int(epochs) or epochs < 1:
        raise InputError("epochs", f"must be a positive integer (or set train_steps), got {epochs!r}")
    return epochs * len(loader)


def max_epochs(train_steps: int | None, epochs: int | None, loader: DataLoader) -> int:
    """Epochs the engine must be allowed to cover :func:`total_steps` (the last may stop early)."""
    return math.ceil(total_steps(train_steps, epochs, loader) / max(1, len(loader)))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total: int,
                  final_fraction: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_fraction`` of the peak at ``total``.

    Short runs with a large learning rate need both: warm-up keeps AdamW's first steps from
    overshooting, the decay lets the last few hundred steps settle (what the EMA then averages).
    """
    if not 0 <= final_fraction <= 1:
        raise InputError("lr_final_fraction", f"must be in [0, 1], got {final_fraction}")
    warmup, total = max(0, int(warmup_steps)), max(1, int(total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# handlers


# ----------------------------------------------------------------------------------------------
# checkpoints and the final model (the machinery lives in :mod:`pipeline.model.checkpoint`)


