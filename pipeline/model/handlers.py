"""Ignite handlers the bundle's ``train`` config attaches: step limit, EMA, progress, atomic checkpoints, final model.

Kept apart from :mod:`pipeline.model.train` (batches, loaders, schedules) because they act on the
engine's events rather than on the data; the checkpoint machinery is in :mod:`pipeline.model.checkpoint`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, ProgressBar
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.atomic import atomic_path, remove_orphans
from pipeline.common import is_int
from pipeline.errors import InputError
from pipeline.model.checkpoint import (CHECKPOINT_PREFIX, GlobalRNG, KillSafeSaver, checkpoint_files, checkpoint_step,
                                       from_rank_zero, load_checkpoint, load_state, rank_and_world, replay_position)
from pipeline.model.model_card import as_json_data
from pipeline.model.train import NoisePrepareBatch


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


class RunProvenance:
    """What a training run is: its data (the slice cache key, a hash of the dataset's content, the split and the
    preprocessing) and its settings (the model card's plus the optimisation's). Saved in every checkpoint; a
    checkpoint of another run is refused on resume instead of silently continued (``resume: false`` starts
    afresh in the same folder)."""

    def __init__(self, data: str | os.PathLike, settings: dict):
        self.expected = {"data": Path(data).name, "settings": as_json_data(settings)}

    def state_dict(self) -> dict:
        return dict(self.expected)

    def differences(self, state: dict) -> list[str]:
        found = {"data": state.get("data"), **{f"settings.{k}": v for k, v in (state.get("settings") or {}).items()}}
        wanted = {"data": self.expected["data"], **{f"settings.{k}": v for k, v in self.expected["settings"].items()}}
        return [f"{key} {found.get(key)!r} (this run: {wanted.get(key)!r})" for key in sorted(set(found) | set(wanted))
                if found.get(key) != wanted.get(key)]

    def load_state_dict(self, state: dict) -> None:
        diff = self.differences(state)
        if diff:
            raise InputError("ckpt_dir", "holds checkpoints of another training run: " + "; ".join(diff[:4])
                             + ("; ..." if len(diff) > 4 else "")
                             + ". Use another ckpt_dir, or --resume false to start afresh there")


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

    OPTIONAL = ("rng", "scaler", "provenance")
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
        files = from_rank_zero(checkpoint_files(self.ckpt_dir))
        if not self.resume:  # afresh: the old run's checkpoints go, so a later resume cannot pick one of them
            if rank_and_world()[0] == 0:
                for path in files:
                    path.unlink(missing_ok=True)
                    engine.logger.info(f"resume false: removed {path}")
            return
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
        if "provenance" in self.objects and "provenance" in state:  # before any weight is touched
            try:
                self.objects["provenance"].load_state_dict(state["provenance"])
            except InputError as err:
                raise InputError(path, str(err).split(": ", 1)[1]) from None
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
    training run's bundle settings) also its model card (:mod:`pipeline.model.model_card`)."""
    from pipeline.model.model_card import write_card

    module = unwrap(module)
    if card is not None:
        write_card(path, card)  # first: a model.pt never exists without the card that describes it
    with atomic_path(path) as tmp:
        torch.save(module.state_dict(), tmp)


class SaveFinalModel:
    """Ignite handler: write ``model.pt`` (EMA weights) and its card when training completes; with
    ``bundle_root`` (and the weights inside it) also refresh the bundle's ``large_files.yml``
    (:mod:`pipeline.model.large_files`: their sha256, ``url`` as given)."""

    def __init__(self, path: str | os.PathLike, module: torch.nn.Module, card: dict | None = None,
                 bundle_root: str | os.PathLike | None = None, url: str = ""):
        self.path, self.module, self.card = path, module, card
        self.bundle_root, self.url = bundle_root, url

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, lambda _: self.save())

    def save(self) -> None:
        from pipeline.model.large_files import write_large_files

        save_model(self.path, self.module, self.card)
        if self.bundle_root is not None:
            write_large_files(self.bundle_root, self.path, self.url)


class ResetOnStart:
    """Ignite handler: reset a prepare-batch at every evaluator run (stable validation noise)."""

    def __init__(self, prepare_batch: NoisePrepareBatch):
        self.prepare_batch = prepare_batch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.prepare_batch.reset())
