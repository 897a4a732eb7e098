"""Checkpoint and resume machinery: what lets a killed training run continue as if never stopped.

Checkpoint files and their loading, every rank's global RNG states, a saver whose writes a kill
cannot leave half done, and a loader order that a resumed run can replay from the epoch alone.
:class:`pipeline.model.handlers.AtomicCheckpoint` wires these into the trainer.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine
from ignite.handlers import DiskSaver
from torch.utils.data import DistributedSampler

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}_(\d+)\.pt$")


def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``ckpt_dir``, oldest first (by iteration number in the file name)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)), key=checkpoint_step)


def checkpoint_step(path: str | os.PathLike) -> int:
    """Iteration a checkpoint was taken at, from its file name."""
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle/zip/unpickler errors all mean "corrupt"
        if _is_torchscript(path):
            raise InputError(path, "is a TorchScript module (what ckpt_export writes), not a checkpoint: score the "
                                   "model.pt it was exported from, or load it with torch.jit.load") from None
        raise InputError(path, f"corrupt or unreadable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds compiled ``code/`` and ``constants.pkl``; a torch.save checkpoint holds neither."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in f"/{n}" or n.endswith("constants.pkl") for n in archive.namelist())


def load_state(module, state: dict, source: str | os.PathLike) -> None:
    """Load a state dict, explaining an architecture mismatch in one line."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        missing = [ln.strip() for ln in str(err).splitlines() if ln.strip()][:2]
        raise InputError(source, f"checkpoint does not match this {type(module).__name__} "
                                 f"(different architecture or settings): {' '.join(missing)[:300]}") from None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (1 outside ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank_zero(value):
    """Rank 0's ``value`` on every rank (collective), so all ranks act on one view of the folder."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's ``value`` in rank order (collective: all ranks call it, rank 0 writes the result)."""
    world = rank_and_world()[1]
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def rng_state() -> dict:
    """This process's global RNG states (torch CPU and CUDA, numpy, Python) as tensors and numbers,
    so checkpoints keep loading with ``weights_only=True``."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping) -> None:
    """Continue the global RNG streams saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                         "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}})
    saved = state["python"]
    random.setstate((saved["version"], tuple(saved["internal"].tolist()), saved["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class GlobalRNG:
    """Checkpoint entry for the global RNGs of every rank: each rank continues its own streams."""

    def state_dict(self) -> dict:
        return {"ranks": gather(rng_state())}

    def load_state_dict(self, state: Mapping) -> None:
        rank, world = rank_and_world()
        ranks = state["ranks"]
        if len(ranks) != world:
            warnings.warn(f"the checkpoint holds the RNG states of {len(ranks)} processes and this run has {world}: "
                          "it continues, but cannot repeat the interrupted run exactly")
        if rank < len(ranks):
            set_rng_state(ranks[rank])


class KillSafeSaver(DiskSaver):
    """ignite ``DiskSaver`` for checkpoints that a kill at any instant leaves consistent.

    Each file is written to a temp file named after its writer (:func:`pipeline.atomic.atomic_path`)
    and renamed into place, so a later start can tell a dead writer's leftovers; removing a file
    that is already gone (a kill fell between a rotation and the list that recorded it) is no error.
    """

    def __init__(self, dirname: str | os.PathLike, save_on_rank: int = 0, **kwargs):
        super().__init__(str(dirname), atomic=True, require_empty=False, save_on_rank=save_on_rank, **kwargs)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with atomic_path(path) as tmp:
            func(checkpoint, tmp, **self.kwargs)

    def remove(self, filename: str) -> None:
        if rank_and_world()[0] == self.save_on_rank:
            (self.dirname / filename).unlink(missing_ok=True)


def replay_position(engine: Engine) -> None:
    """Make a run resumed mid-epoch start at the first batch the interrupted run had not trained on.

    ignite counts the epoch's remaining iterations but would draw them from the start of a fresh
    loader pass; :class:`EpochSampler` skips the consumed samples instead (no RNG involved).
    """
    length = engine.state.epoch_length
    done = engine.state.iteration % length if length else 0
    if not done:
        return
    loader = engine.state.dataloader
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSampler) and getattr(loader, "batch_size", None):
        sampler.start_at(engine.state.epoch + 1, done * loader.batch_size)
    else:
        warnings.warn("resuming mid-epoch with a loader whose order cannot be replayed (not an EpochSampler): "
                      "the rest of this epoch sees other batches than the interrupted run would have")


class EpochSampler(DistributedSampler):
    """Shuffled order that is a pure function of (seed, epoch), sharded across ranks when distributed.

    A resumed run replays the same order from nothing but the epoch (MONAI's trainer calls
    ``set_epoch`` at every epoch start), and :meth:`start_at` lets a run resumed mid-epoch begin
    with the first batch the killed run had not yet trained on.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, distributed: bool = False):
        replicas, rank = (None, None) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._starts: dict[int, int] = {}

    def start_at(self, epoch: int, position: int) -> None:
        """In ``epoch``, begin ``position`` samples into this rank's order (other epochs stay whole)."""
        self._starts = {int(epoch): int(position)}

    def __iter__(self):
        return itertools.islice(super().__iter__(), self._starts.get(self.epoch, 0), None)
