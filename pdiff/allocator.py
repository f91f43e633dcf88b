"""Keep freed CPU memory in the process for reuse (glibc's malloc), where sampling on the CPU lost a
third of its time.

Every network evaluation allocates its activations afresh and frees them. glibc serves a block of
more than 32 MiB (a batch of 256 at 32 x 32 with 32 channels is 33.5 MB) with its own mmap and
unmaps it on free, and it hands the top of the heap back to the kernel once more than the trim
threshold is free there; the next evaluation's blocks then fault in fresh pages, which the kernel
zeroes. Sampling 2000 32 x 32 images at 35 NFE on a CPU spent 11 minutes there (system time,
against 24 of user time); benchmarks/results/sample_cost_*.json has the measurement before and
after. Telling malloc to serve
every block from the heap and never trim it makes the second evaluation reuse the first one's
memory: the process keeps its peak (which it reaches every evaluation anyway) instead of returning
and re-faulting it 2N - 1 times per batch.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse, once per process: no mmap per large
    block (M_MMAP_MAX 0), no trimming of the heap below 2 GiB free (M_TRIM_THRESHOLD). True when
    it applied; elsewhere (another C library, another OS) it does nothing and returns False."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
