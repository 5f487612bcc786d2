"""Keep freed host memory in the process, so that large CPU tensors reuse pages already mapped.

glibc's malloc serves each request above its mmap threshold with a fresh memory mapping and
unmaps it on free. The threshold starts at 128 KiB and follows the largest block freed so far, up
to 32 MiB on 64-bit systems. Free memory at the top of the heap goes back to the system once it
exceeds the trim threshold, which is twice the mmap threshold (both described in mallopt(3)).
A ViT block on the CPU allocates and frees several tensors of 5 to 25 MiB per call, so many of
them land on pages that the kernel must map and zero again. On the 2-core test machine that cost
up to 20 % of an eval forward at batch 32 (an estimate from runs with and without these
settings, see docs/benchmarks.md).

Raising both thresholds keeps that memory in the heap, at the price of a resident size that stays
near its peak. Only glibc on Linux has these settings. The entry scripts call
:func:`keep_freed_memory` once at start-up.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024

DISABLE_VARIABLE = "PRENAS_DEFAULT_MALLOC"
# Environment variables through which a user sets these thresholds by hand. They take precedence.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process.

    Does nothing, and returns False, when the C library is not glibc, when
    ``PRENAS_DEFAULT_MALLOC=1`` is set, or when one of the glibc malloc environment variables is
    set (the user's own tuning wins).

    Returns:
        True when both thresholds were set.
    """
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return False
    if any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success and 0 when it rejects a value.
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
