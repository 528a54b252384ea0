"""Host memory on Linux: keep the memory a CPU training step frees for the next step.

glibc's malloc serves large blocks (from 128 KB, a threshold it raises up to 32 MB as blocks are
freed) with mmap and hands them back with munmap, and it returns the top of its heap to the
system once more than twice that threshold is free there. A CPU training step allocates and
frees the same large tensors every step (gradients, activations), so either rule can make every
step fault in fresh zeroed pages for them. Which one bites depends on the order of the process's
allocations: in bench/bench_async_save.py, a background save's thread was enough to turn it on
for every step of the run, 1.16x the step time (99.5 against 85.3 ms; compare_commits.py
46e5051 HEAD). With both thresholds fixed high, freed blocks stay in the heap and are reused.
The price: memory freed stays with the process, up to its peak use (what torch's CUDA caching
allocator does on a GPU). A MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in the environment
(glibc's own tunables) is left to rule.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before it is returned

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Fix glibc malloc's mmap and trim thresholds high, once per process; whether they are set."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A glibc that caps the mmap threshold (at 32 MB) refuses a larger one: then take the cap.
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    return mapped and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
