"""Memory and precision of scoring: ``score_batch_size: auto`` and autocast when ``amp`` is on.

``auto`` is measured, not guessed: one sampler call on one slice and on two, with every tensor the call
allocates counted while it is alive (:class:`LiveTensorBytes`: the same count on CPU, which keeps no
allocator statistics, and on a GPU), gives the bytes each slice adds and the fixed part. The batch is
the largest whose call fits the budget: ``score_memory_gb`` when given, else on a GPU its free memory
(``torch.cuda.mem_get_info``) and on CPU :data:`CPU_DEFAULT_GB`. :data:`HEADROOM` covers what the count
misses: convolution workspaces and allocator slack. On the project's 2-core CPU, one x0 call of the
default 4-channel UNet at the batch auto chose grew peak resident memory by 1.45 GB for a 2 GB budget at
128 px (batch 47), 0.72 GB for 1 GB at 64 px (143) and 0.88 GB for 1 GB at 32 px (574); with 1.5 instead of
2.0 the 64 px call took 1.18 GB of its 1 GB. The budget is for the batches: the model and one subject's
volumes come on top.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.errors import InputError

HEADROOM = 2.0
CPU_DEFAULT_GB = 4.0
GPU_FREE_FRACTION = 0.9
MAX_AUTO_BATCH = 1024
"""Beyond this a batch gains nothing (a slice cache of one subject rarely holds more than 200 slices)."""


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage created inside the block while it is alive; ``peak`` is the most
    at one time. Storage shared by views and in-place results counts once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def peak_bytes(call: Callable[[], object]) -> int:
    """Most tensor bytes alive at once while ``call`` runs (what it returns is dropped first)."""
    with LiveTensorBytes() as counter:
        call()
    return counter.peak


def memory_budget(device: torch.device, memory_gb: float | None = None) -> int:
    """Bytes the scoring batches may take: ``memory_gb`` if given (on a GPU at most its free memory), else a
    share of the GPU's free memory, or :data:`CPU_DEFAULT_GB` on CPU."""
    if memory_gb is not None and (isinstance(memory_gb, bool) or not isinstance(memory_gb, (int, float))
                                  or memory_gb <= 0):
        raise InputError("score_memory_gb", f"must be a positive number of GB (or null), got {memory_gb!r}")
    given = None if memory_gb is None else int(float(memory_gb) * 2**30)
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0] * GPU_FREE_FRACTION)
        return free if given is None else min(given, free)
    return int(CPU_DEFAULT_GB * 2**30) if given is None else given


@dataclass(frozen=True)
class SliceCost:
    """Bytes of one scoring call: ``fixed`` whatever the batch, ``per_slice`` for each slice in it."""

    fixed: int
    per_slice: int

    @classmethod
    def measure(cls, call: Callable[[int], object]) -> SliceCost:
        """From ``call(n)`` (one scoring call on ``n`` slices) run on one slice and on two."""
        one, two = peak_bytes(lambda: call(1)), peak_bytes(lambda: call(2))
        per_slice = max(1, two - one)
        return cls(fixed=max(0, one - per_slice), per_slice=per_slice)

    def largest_batch(self, budget: int) -> int:
        """The most slices whose call, with :data:`HEADROOM`, fits ``budget`` (at least 1)."""
        fits = int((budget / HEADROOM - self.fixed) // self.per_slice)
        return max(1, min(MAX_AUTO_BATCH, fits))


@dataclass(frozen=True)
class AutocastModel:
    """The network called under autocast, its output back in float32: only the network runs in low
    precision, the samplers' arithmetic (noise schedules, residuals) stays float32."""

    model: Callable
    device_type: str = "cuda"
    dtype: torch.dtype = torch.float16

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs).float()


def with_amp(model: Callable | None, amp: bool, device: torch.device | str) -> Callable | None:
    """``model`` under float16 autocast when ``amp`` is on and it runs on a GPU; unchanged otherwise (MONAI's
    trainer treats ``amp`` the same way: CUDA only, so a model scores in the precision it trained in)."""
    if model is None or not amp or torch.device(device).type != "cuda":
        return model
    return AutocastModel(model)
