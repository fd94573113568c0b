"""glibc's allocator, tuned for a process that copies megabyte buffers all day.

Every answer is copied about seven times on its way out (aiokafka builds a produce request by
joining bytes: batch, record, array, struct, size prefix), and every request once or twice on
the way in. Two glibc defaults make that slow or fat:

- Blocks over the mmap threshold are mmapped and unmapped on free, so each copy of a large
  buffer pays page faults and the kernel zeroing fresh pages: a 1 MB copy took 563 us instead of
  51 us, and the parent spent 40% of its time there at 256x256 (docs/performance.md).
- Served from the heap instead, freed memory mostly stays with the process: on a 1 GiB backlog
  of 2 MiB requests the service held 130 MiB more than its in-flight budget accounts for.

So large buffers come from the heap (the threshold is raised to ``MMAP_THRESHOLD``), and
``release_free_memory`` (``malloc_trim``) hands the free pages back, from the whole heap and
not only its top, every ``SVD_ALLOCATOR_TRIM_INTERVAL_S`` (tests/faults/test_backlog_memory.py).
Best effort: both are no-ops where glibc is not the allocator (musl, macOS).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Blocks from this size up are mmapped: above any request or result the limits allow (64 MiB).
MMAP_THRESHOLD = 64 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h

_libc: Any = None  # None: not looked up yet; False: not glibc


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            libc: Any = ctypes.CDLL(None)
            libc.mallopt  # noqa: B018 (attribute check: glibc only)
            libc.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            libc = False
        _libc = libc
    return _libc or None


def tune() -> bool:
    """Serve large blocks from the heap. False where the allocator is not glibc's."""
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (``malloc_trim(0)``); True if any were."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
