"""Give freed activation memory back to the operating system during CPU training (glibc only).

glibc serves allocations of up to 32 MB from its heap once it has seen large blocks freed, and a
heap region stays with the process after its tensors are gone: the peak RSS of a training step was
1.0-1.5 GB above its live tensors at whole-human scGPT size (benchmarks/README.md). With a fixed mmap
threshold every large tensor is its own mapping, returned when freed, so the RSS follows the live
tensors. Equivalent to starting Python with `MALLOC_MMAP_THRESHOLD_=<bytes>`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
DEFAULT_THRESHOLD = 1 << 20


def return_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of `threshold_bytes` or more by mmap from now on; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
