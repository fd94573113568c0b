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
not only its top, once the process has grown ``SVD_ALLOCATOR_KEEP_BYTES`` past its size after
the last trim; the service checks every ``SVD_ALLOCATOR_TRIM_INTERVAL_S``
(tests/faults/test_backlog_memory.py). Not at every check: pages handed back are faulted in and
zeroed again by the next copies, and trimming every 0.1 s cost a quarter of the throughput at
256x256.
Best effort: all of it is a no-op where glibc is not the allocator (musl, macOS).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Blocks from this size up are mmapped: above any request or result the limits allow (64 MiB).
MMAP_THRESHOLD = 64 * 1024 * 1024
#: The top of the heap is never trimmed by free() itself: ``HeapTrimmer`` decides.
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

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
    # mallopt returns 1 on success. Setting the mmap threshold stops glibc from adjusting the
    # trim threshold, which then stays at 128 KiB: every large buffer freed at the top of the
    # heap would be handed back at once and faulted in again by the next one.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS (``malloc_trim(0)``); True if any were."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


class HeapTrimmer:
    """Trims the heap once memory no request holds has grown ``keep_bytes`` since the last trim.

    Held is the process's resident size minus what the requests in flight hold (``live_bytes``,
    the in-flight budget's count). Growth of the rest, not glibc's count of free bytes, is the
    trigger: glibc counts pages it already handed back as free, and a steady working set reuses
    its freed buffers without growing, so it is never trimmed (and never pays the page faults
    again), while a backlog that keeps allocating is.
    """

    def __init__(self, keep_bytes: int) -> None:
        self._keep_bytes = keep_bytes
        self._floor = resident_bytes()
        self.trims = 0

    def check(self, live_bytes: int = 0, before_trim: Callable[[], object] | None = None) -> bool:
        """Trim if the memory not held by requests grew past the allowance; True if trimmed.
        ``before_trim`` runs first, when a trim is due (the service frees garbage cycles that
        may hold large buffers, so their memory is handed back too)."""
        if resident_bytes() - live_bytes - self._floor <= self._keep_bytes:
            return False
        if before_trim is not None:
            before_trim()
        release_free_memory()
        self._floor = resident_bytes() - live_bytes
        self.trims += 1
        return True
