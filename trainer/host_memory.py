"""Host-memory policy for CPU runs: memory a step frees stays in the process for the next step.

glibc's malloc gives free memory at the top of its heap back to the OS once it exceeds a trim
threshold that it tunes itself (twice its mmap threshold, so at most 64 MiB). A training step frees
most of its activations at once and allocates them again in the next step, so once they outgrow that
threshold every step faults in and zeroes them afresh: forward + backward of the CSA layer of
``benchmarks/attention_scaling.py`` took 15-50 thousand minor page faults and 0.06-0.24 s of system
time per pass at 16k tokens (0-16 thousand at 8k), which made its time grow faster than its work.
Keeping freed memory is what torch's CUDA caching allocator does on the GPU; jemalloc or tcmalloc
preloaded (``LD_PRELOAD``) do the same job on the CPU where they are installed.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: bytes of free heap top kept before trimming
# Setting the trim threshold stops glibc's own tuning of the mmap threshold, so that is fixed too, at the
# highest value its tuning reaches (and the most mallopt allows): larger blocks keep their own mappings.
_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed heap memory (never trim it) and serve blocks up to 32 MiB from the
    heap. Returns False, changing nothing, where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
