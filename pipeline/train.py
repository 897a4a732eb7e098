"""Train stage: DiffusionModelUNet on healthy slices, driven by ``monai.engines.SupervisedTrainer``.

This module holds the pieces the bundle's ``train`` config wires together (the network and
scheduler factories live in :mod:`pipeline.network`): a prepare-batch that draws Gaussian,
simplex or coarse noise, an EMA of the weights, atomic checkpoints with resume (built on
:mod:`pipeline.checkpoint`), and the loaders.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, ProgressBar
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.engines import DiffusionPrepareBatch
from monai.networks.schedulers import DDPMScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from .atomic import atomic_path, remove_orphans
from .checkpoint import (CHECKPOINT_PREFIX, EpochSampler, GlobalRNG, KillSafeSaver, checkpoint_files, checkpoint_step,
                         from_rank_zero, gather, load_checkpoint, load_state, rank_and_world, replay_position)
from .common import is_int
from .errors import InputError
from .noise import NoiseGenerator
from .slice_cache import LabelledSliceDataset, SliceDataset

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


def slice_loader(cache_dir: str | os.PathLike, section: str = "train", batch_size: int = 32,
                 shuffle: bool = True, num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                 labelled: bool = False) -> DataLoader:
    """Loader over cached healthy slices, in an order a resumed run can replay (:class:`EpochSampler`).

    The loader's own seeded generator draws the worker base seeds, so iterating it never touches the
    global torch RNG (a resumed run creates its iterators at other moments than an uninterrupted one).
    Under DDP every loader is sharded across the ranks by itself (a setting that could disagree with
    how the run was launched would let every rank go over all slices): a shuffled one by
    :class:`EpochSampler`, an ordered one (validation) in disjoint shares without padding, so every
    slice is seen once and MONAI's metric handlers gather the shares into one value.
    ``labelled``: slices with their slice labels, from the labelled cache (guided training).
    """
    dataset = (LabelledSliceDataset if labelled else SliceDataset)(cache_dir, section)
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


class StopAtStep:
    """Ignite handler: end training after exactly ``steps`` optimiser steps (COMPLETED still fires).

    Also checked when an epoch starts: a run resumed from its final checkpoint (killed before
    ``model.pt`` was written) must not take one step more.
    """

    def __init__(self, steps: int):
        self.steps = int(steps)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED | Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration >= self.steps:
            engine.terminate()


# ----------------------------------------------------------------------------------------------
# handlers


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel (or any ``.module``) wrapper."""
    return module.module if hasattr(module, "module") else module


def ema_model(network: torch.nn.Module, decay: float = 0.999) -> AveragedModel:
    """Exponential moving average of the weights (what inference uses).

    PyTorch's ``AveragedModel`` rather than Ignite's ``EMAHandler``: the EMA starts from the weights
    after the first step (EMAHandler's from those at attach time, before any step), and its state
    dict is what ``model.pt`` and every checkpoint hold; switching would change every trained model
    and break resuming from existing checkpoints.
    """
    if not 0 < decay < 1:
        raise InputError("ema_decay", f"must be in (0, 1), got {decay}")
    module = unwrap(network)
    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class EMAUpdater:
    """Ignite handler: update the EMA weights after every optimiser step."""

    def __init__(self, ema: AveragedModel, network: torch.nn.Module):
        self.ema, self.network = ema, network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.ema.update_parameters(unwrap(self.network))


class TrainProgress:
    """tqdm bar per epoch showing the running loss (the progress bar users look at)."""

    def __init__(self, disable: bool = False):
        self.disable = disable

    def attach(self, engine: Engine) -> None:
        if not self.disable:
            ProgressBar(persist=True).attach(engine, output_transform=lambda out: {"loss": _loss_of(out)})


def _loss_of(output) -> float:
    item = output[0] if isinstance(output, list) else output
    loss = item["loss"]
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)


# ----------------------------------------------------------------------------------------------
# checkpoints and the final model (the machinery lives in :mod:`pipeline.checkpoint`)


class AtomicCheckpoint:
    """Crash-consistent checkpoints: a run killed at any instant and started again ends with the
    weights of a run never stopped (same seed, same device).

    Saves every ``every_n_epochs`` epochs, every ``every_n_iterations`` iterations (0: off) and at
    the end; on STARTED, resumes from the newest checkpoint in ``ckpt_dir``. A checkpoint holds
    ``objects`` (network, EMA, optimiser, LR schedule, the prepare-batch noise and timestep
    streams), the engine's position, every rank's global RNG states and the AMP scaler; the
    loader's order follows from the epoch (:class:`EpochSampler`). Attach it after the handlers
    whose effect it must capture (LR schedule, EMA, validation): on a shared event it runs after them.

    Kill safety: writes go through :class:`KillSafeSaver`; temps of dead writers are removed at
    start; the rotation list is read from the folder at start. DDP-wrapped modules are saved
    unwrapped (ignite does this), so any run can resume any other; only rank 0 writes.
    """

    OPTIONAL = ("rng", "scaler")
    """Entries older checkpoints may lack: such a resume works but is not exact."""

    def __init__(self, ckpt_dir: str | os.PathLike, objects: dict, every_n_epochs: int = 1,
                 every_n_iterations: int = 0, n_saved: int = 2, resume: bool = True):
        for name, value in (("checkpoint_every", every_n_epochs), ("checkpoint_every_iterations", every_n_iterations)):
            if not is_int(value) or value < 0:
                raise InputError(name, f"must be a whole number >= 0 (0: off), got {value!r}")
        self.ckpt_dir, self.objects = Path(ckpt_dir), objects
        self.every_n_epochs, self.every_n_iterations = every_n_epochs, every_n_iterations
        self.n_saved, self.resume = n_saved, resume
        self._saved_at: int | None = None

    def attach(self, engine: Engine) -> None:
        self.objects = {**self.objects, "trainer": engine, "rng": GlobalRNG()}  # the engine is known only here
        if getattr(engine, "scaler", None) is not None:
            self.objects["scaler"] = engine.scaler
        # every rank attaches (the RNG gather and ignite's collectives need all of them); only rank 0 writes
        self.checkpoint = Checkpoint(
            self.objects, KillSafeSaver(self.ckpt_dir, save_on_rank=0),
            filename_prefix=CHECKPOINT_PREFIX, n_saved=self.n_saved,
            global_step_transform=lambda eng, _: eng.state.iteration,
            filename_pattern="{filename_prefix}_{global_step}.{ext}",
        )
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.on_epoch)
        engine.add_event_handler(Events.COMPLETED, self.save)
        if self.every_n_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self.on_iteration)

    def on_iteration(self, engine: Engine) -> None:
        """Mid-epoch checkpoint; at an epoch's last iteration :meth:`on_epoch` saves instead, after validation."""
        if not engine.state.epoch_length or engine.state.iteration % engine.state.epoch_length:
            self.save(engine)

    def on_epoch(self, engine: Engine) -> None:
        epoch_due = self.every_n_epochs and engine.state.epoch % self.every_n_epochs == 0
        iteration_due = self.every_n_iterations and engine.state.iteration % self.every_n_iterations == 0
        if epoch_due or iteration_due:
            self.save(engine)

    def save(self, engine: Engine) -> None:
        """One checkpoint per iteration at most (an epoch's end and the run's end may coincide)."""
        if engine.state.iteration != self._saved_at:
            self.checkpoint(engine)
            self._saved_at = engine.state.iteration

    def start(self, engine: Engine) -> None:
        """Remove a dead writer's temps, then continue where the newest checkpoint left off."""
        if rank_and_world()[0] == 0:
            for path in remove_orphans(self.ckpt_dir):
                engine.logger.info(f"removed {path}, left by a writer that was killed")
        if not self.resume:
            return
        files = from_rank_zero(checkpoint_files(self.ckpt_dir))
        if files:
            self.load(engine, files[-1])  # first: a folder of another run's checkpoints stops here, untouched
            self._saved_at = engine.state.iteration
            replay_position(engine)
        self._rotate_from(files)

    def _rotate_from(self, files: list[Path]) -> None:
        """Rotate the files the folder holds now (the list of a killed run is stale); extras beyond
        ``n_saved`` go at once."""
        keep = files[-self.n_saved:] if self.n_saved else files
        if rank_and_world()[0] == 0:
            for path in files[:len(files) - len(keep)]:
                path.unlink(missing_ok=True)
        self.checkpoint.load_state_dict({"_saved": [(checkpoint_step(p), p.name) for p in keep]})

    def load(self, engine: Engine, path: Path) -> None:
        state = load_checkpoint(path)
        missing = sorted(set(self.objects) - set(state) - set(self.OPTIONAL))
        if missing:
            raise InputError(path, f"checkpoint lacks {', '.join(missing)}; was it written by this bundle?")
        for name, obj in self.objects.items():
            if name not in state:
                warnings.warn(f"{path} has no {name!r} state (written by an older version): "
                              "the resumed run will not repeat the interrupted one exactly")
            elif isinstance(obj, torch.nn.Module):
                load_state(getattr(obj, "module", obj) if isinstance(obj, DistributedDataParallel) else obj,
                           state[name], path)
            else:
                obj.load_state_dict(state[name])
        engine.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


def save_model(path: str | os.PathLike, module: torch.nn.Module, card: dict | None = None) -> None:
    """Write the (EMA) network weights atomically: the file inference loads; with ``card`` (the
    training run's bundle settings) also its model card (:mod:`pipeline.model_card`)."""
    from .model_card import write_card

    module = unwrap(module)
    if card is not None:
        write_card(path, card)  # first: a model.pt never exists without the card that describes it
    with atomic_path(path) as tmp:
        torch.save(module.state_dict(), tmp)


class SaveFinalModel:
    """Ignite handler: write ``model.pt`` (EMA weights) and its card when training completes."""

    def __init__(self, path: str | os.PathLike, module: torch.nn.Module, card: dict | None = None):
        self.path, self.module, self.card = path, module, card

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, lambda _: save_model(self.path, self.module, self.card))


class ResetOnStart:
    """Ignite handler: reset a prepare-batch at every evaluator run (stable validation noise)."""

    def __init__(self, prepare_batch: NoisePrepareBatch):
        self.prepare_batch = prepare_batch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.prepare_batch.reset())
