"""Keep freed host memory in the process (glibc malloc), so CPU steps do not page-fault their tensors back in.

PyTorch's CPU allocator calls malloc/free directly. With glibc's defaults large tensors (above a threshold that
adapts up to 32 MiB) are mmap'd and unmapped on free, and a large free heap top is trimmed, so memory goes back to
the operating system at the end of a step and the next step faults it in again, zero-filled page by page: on a
2-core machine that made the first forwards of every step about twice as slow as the rest. Serving every
allocation from the heap and never trimming it makes the process keep its peak (as the CUDA caching allocator
does on GPUs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 * 2**20

_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Ask glibc malloc to serve large allocations from the heap and never return freed memory to the
    operating system (once per process). Returns whether it applied (False on other C libraries)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [
        mallopt(_M_MMAP_MAX, 0),  # no mmap'd chunks: everything from the heap, reused after free
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # never give the heap's top back
        mallopt(_M_TOP_PAD, _TOP_PAD_BYTES),  # grow the heap in large steps
    ]
    _applied = all(done)
    if not _applied:
        logger.debug("mallopt refused some settings: %s", done)
    return _applied


def return_freed_host_memory() -> bool:
    """Hand the free pages of glibc's heaps back to the operating system (malloc_trim). For processes that
    do not train, such as offline planning, after a phase that freed much (the tracing inside torch.export):
    what later phases allocate then counts once, not on top of free memory the process still holds. Returns
    whether it ran (False on other C libraries, or after keep_freed_host_memory, which keeps memory on
    purpose)."""
    trim = None if _applied else _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def release_free_host_pages() -> bool:
    """Hand the free pages of glibc's heaps back to the operating system now (malloc_trim), whatever
    keep_freed_host_memory set: for a phase that allocates large, short-lived tensors of varying sizes, such as
    profiling block after block. Without it the heap that never shrinks also fragments: a block's freed 64 MiB
    weight and gradient leave a hole that the next block's small allocations nibble at, its weight no longer
    fits there and lands on the heap's top, and the process's resident memory grows by a block's tensors per
    block profiled, though only one block's are ever alive. Freed pages given back here cost one page fault each
    when reused (in a warm-up run, not in a timed one). Returns whether it ran (False on other C libraries)."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


@functools.cache
def _glibc_function(name: str) -> Any:
    """glibc's function `name` (through ctypes), or None off Linux or in C libraries without it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
