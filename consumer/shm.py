"""Shared-memory blocks: matrices in and factors out without pickling them through pipes.

The parent lays out one block per job in a POSIX shared-memory segment, sized for the input
matrices and the pre-computed output regions, and copies each input in once. Only a
``BlockDescriptor`` (segment name plus array layouts, a few hundred bytes) crosses the process
boundary; the worker attaches, computes into the output regions and detaches. The parent owns
the segment and gives it back on every path: success, error, worker crash, timeout,
cancellation.

Segments are reused (``SegmentCache``): creating one (open, reserve, the kernel zeroing every
page, the resource tracker's round trip) and faulting its pages into the parent's mapping cost
17.7 ms per 1024x1024 job and most of the parent's time at 32x32, against ~4 ms to copy in and
out of a segment already mapped (docs/performance.md). A block given back while a numpy view
of it is still alive is never reused: the segment is unlinked instead, so a stale view can never
see another job's data.

Why not ``multiprocessing.shared_memory.SharedMemory``: on Python 3.11 every instance, also a
mere attach, registers the segment with the resource tracker, and its ``close()`` raises
``BufferError`` from ``__del__`` when a numpy view outlives it. Pool workers share the parent's
tracker (forkserver and spawn pass its fd down), whose bookkeeping is a set of names: a worker
that unregisters after attaching, as is often advised, erases the parent's registration, and
the parent's own unlink then makes the tracker die on a ``KeyError``. So this module maps the
segments itself, and only the parent talks to the tracker: it registers at creation (so the
tracker unlinks the segment if the parent is killed before it could) and unregisters at unlink.
The worker never touches the tracker.

Linux only: a POSIX shared-memory object is a file in ``/dev/shm`` (glibc's ``shm_open`` does
exactly this). Containers: Docker's default ``/dev/shm`` is 64 MiB, too small for a few
in-flight 16 MB matrices with their factors; set ``--shm-size``. Space is reserved at creation,
so a full ``/dev/shm`` raises ``ShmAllocationError`` here rather than SIGBUS on first write.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "svd-"
#: Region offsets are multiples of this: a cache line, and enough for any SIMD load.
ALIGNMENT = 64

#: Segments are created in multiples of this, so a reused one fits jobs of a similar size.
GRANULE = 64 * 1024

_counter = itertools.count()
_TRACKER_TYPE = "shared_memory"


class ShmAllocationError(MemoryError):
    """No room in /dev/shm for a new block (transient: retry later, or enlarge /dev/shm)."""


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """An array to reserve room for."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, shape: tuple[int, ...], dtype: npt.DTypeLike) -> ArraySpec:
        return cls(tuple(int(d) for d in shape), np.dtype(dtype).str)

    @classmethod
    def raw(cls, nbytes: int) -> ArraySpec:
        """Room for ``nbytes`` plain bytes (``of`` for a byte array, without numpy's dtype
        lookup: the service reserves three of these per request)."""
        return cls((nbytes,), "|u1")


@dataclass(frozen=True)  # no slots: it crosses the pipe (see consumer/jobs.py)
class ArrayLayout:
    """Where an array lives in a block: byte offset, shape and dtype (``numpy.dtype.str``)."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)  # no slots: it crosses the pipe (see consumer/jobs.py)
class BlockDescriptor:
    """What the worker needs to attach a block: small and picklable."""

    name: str
    size: int
    arrays: tuple[ArrayLayout, ...]


def segment_prefix(pid: int | None = None) -> str:
    """Name prefix of the segments created by process ``pid`` (default: this one)."""
    return f"{NAME_PREFIX}{os.getpid() if pid is None else pid}-"


def plan_layout(specs: Sequence[ArraySpec]) -> tuple[tuple[ArrayLayout, ...], int]:
    """Aligned offsets for ``specs``, in order, and the total size (at least 1 byte)."""
    layouts: list[ArrayLayout] = []
    offset = 0
    for spec in specs:
        layout = ArrayLayout(offset, spec.shape, spec.dtype)
        layouts.append(layout)
        offset = _align(offset + layout.nbytes)
    return tuple(layouts), max(offset, 1)


class _Mapped:
    """A mapping of a segment and numpy views of its regions."""

    def __init__(self, descriptor: BlockDescriptor, mapping: mmap.mmap) -> None:
        self._descriptor = descriptor
        self._mmap: mmap.mmap | None = mapping

    @property
    def descriptor(self) -> BlockDescriptor:
        return self._descriptor

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def array(self, index: int, shape: tuple[int, ...] | None = None) -> npt.NDArray[Any]:
        """A view of region ``index``, or of its leading elements reshaped to ``shape``.

        A smaller ``shape`` reads outputs shorter than reserved (an algorithm that returns
        fewer triplets than asked). Views must not be used after ``close()``.
        """
        if self._mmap is None:
            raise ValueError(f"shared-memory block {self._descriptor.name} is closed")
        layout = self._descriptor.arrays[index]
        shape = layout.shape if shape is None else shape
        dtype = np.dtype(layout.dtype)
        count = math.prod(shape)
        if count * dtype.itemsize > layout.nbytes:
            raise ValueError(f"shape {shape} does not fit region {index} {layout.shape}")
        # frombuffer, not ndarray(buffer=...): only frombuffer holds a buffer export on the
        # mmap, so unmapping under a live view fails (BufferError) instead of the view
        # pointing at unmapped memory (SIGSEGV on the next access), and a cache can tell a
        # segment still in use by a view (``_exported``).
        flat = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=layout.offset)
        return flat.reshape(shape)

    def view(self, index: int, length: int | None = None) -> memoryview:
        """The bytes of region ``index`` (its first ``length``). Release the view when done
        (``memoryview.release``): a block whose mapping a view still uses is never reused."""
        if self._mmap is None:
            raise ValueError(f"shared-memory block {self._descriptor.name} is closed")
        layout = self._descriptor.arrays[index]
        length = layout.nbytes if length is None else length
        if not 0 <= length <= layout.nbytes:
            raise ValueError(f"{length} bytes do not fit region {index} ({layout.nbytes} bytes)")
        with memoryview(self._mmap) as whole:
            return whole[layout.offset : layout.offset + length]

    def write(self, index: int, data: bytes | memoryview) -> None:
        """Copy ``data`` to the start of region ``index`` (no view of the mapping is kept)."""
        if self._mmap is None:
            raise ValueError(f"shared-memory block {self._descriptor.name} is closed")
        layout = self._descriptor.arrays[index]
        size = memoryview(data).nbytes
        if size > layout.nbytes:
            raise ValueError(f"{size} bytes do not fit region {index} ({layout.nbytes} bytes)")
        self._mmap[layout.offset : layout.offset + size] = data

    def _unmap(self) -> None:
        mapping, self._mmap = self._mmap, None
        if mapping is None:
            return
        # BufferError: a view is still alive somewhere (e.g. in a traceback's frame). The
        # mapping is then released with the last view; only the segment's name could leak.
        with contextlib.suppress(BufferError):
            mapping.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class ShmBlock(_Mapped):
    """A block owned by the parent. ``close()`` gives its segment back; it is idempotent.

    With a ``SegmentCache`` the segment may come from an earlier job and go back for a later
    one; without, it is created here and unlinked at ``close()``.
    """

    def __init__(self, specs: Sequence[ArraySpec], cache: SegmentCache | None = None) -> None:
        layouts, size = plan_layout(specs)
        segment = cache.take(size) if cache is not None else _Segment.create(size)
        super().__init__(BlockDescriptor(segment.name, size, layouts), segment.mapping)
        self._segment: _Segment | None = segment
        self._cache = cache

    def close(self, *, reuse: bool = True) -> None:
        """Give the segment back to the cache, or (``reuse=False``, or no cache) unlink it."""
        segment, self._segment = self._segment, None
        self._mmap = None  # no new views; live ones keep the mapping (see _exported)
        if segment is None:
            return
        if self._cache is not None and reuse:
            self._cache.give_back(segment)
        else:
            segment.destroy()

    def __repr__(self) -> str:
        state = "closed" if self._segment is None else "open"
        return f"<ShmBlock {self._descriptor.name} {self._descriptor.size} bytes {state}>"


class _Segment:
    """A named segment, registered with the resource tracker, and the parent's mapping of it."""

    def __init__(self, name: str, capacity: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.capacity = capacity
        self.mapping = mapping
        self._destroyed = False

    @classmethod
    def create(cls, size: int) -> _Segment:
        capacity = -(-size // GRANULE) * GRANULE
        name, mapping = _create_segment(capacity)
        return cls(name, capacity, mapping)

    def destroy(self) -> None:
        """Unmap (or leave the mapping to its last view), unlink, unregister. Idempotent."""
        if self._destroyed:
            return  # a second unregister would kill the tracker (KeyError)
        self._destroyed = True
        with contextlib.suppress(BufferError):
            self.mapping.close()
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / self.name).unlink()
        resource_tracker.unregister(_tracker_name(self.name), _TRACKER_TYPE)


class SegmentCache:
    """Idle segments kept for the next jobs, up to ``max_bytes`` and ``max_segments``.

    ``take`` returns the smallest idle segment that fits a block without wasting more than
    its size again, else a new one; ``give_back`` keeps a segment for reuse, evicting the
    least recently used ones beyond the limits. A segment that a numpy view still uses is
    destroyed instead of kept. ``close()`` destroys the idle ones; segments given back after
    it are destroyed too. The parent's own memory accounting: idle segments are held on top of
    the in-flight budget, so ``max_bytes`` bounds that overhead.
    """

    def __init__(self, max_bytes: int, max_segments: int = 16) -> None:
        self._max_bytes = max_bytes
        self._max_segments = max_segments
        self._idle: list[_Segment] = []  # least recently used first
        self._closed = False
        self.created = 0  # counters, for tests and benchmarks
        self.reused = 0

    @property
    def idle_bytes(self) -> int:
        return sum(segment.capacity for segment in self._idle)

    @property
    def idle_names(self) -> list[str]:
        return [segment.name for segment in self._idle]

    def take(self, size: int) -> _Segment:
        fitting = [s for s in self._idle if size <= s.capacity <= 2 * size + GRANULE]
        if fitting:
            best = min(fitting, key=lambda s: s.capacity)
            self._idle.remove(best)
            self.reused += 1
            return best
        self.created += 1
        return _Segment.create(size)

    def give_back(self, segment: _Segment) -> None:
        if self._closed or segment.capacity > self._max_bytes or _exported(segment.mapping):
            segment.destroy()
            return
        self._idle.append(segment)
        while len(self._idle) > self._max_segments or self.idle_bytes > self._max_bytes:
            self._idle.pop(0).destroy()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for segment in idle:
            segment.destroy()


def _exported(mapping: mmap.mmap) -> bool:
    """True while a buffer (a numpy view) of ``mapping`` is alive.

    ``mmap`` has no public count of its exports, but ``resize`` refuses with BufferError while
    there are any; resizing a shared mapping to its own size is otherwise a no-op (~3 us).
    """
    try:
        mapping.resize(len(mapping))
    except BufferError:
        return True
    return False


class AttachedBlock(_Mapped):
    """A worker's mapping of a parent's segment. ``close()`` unmaps; it never unlinks."""

    def __init__(self, descriptor: BlockDescriptor) -> None:
        fd = os.open(SHM_DIR / descriptor.name, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < descriptor.size:
                raise ValueError(
                    f"segment {descriptor.name} has {actual} bytes, expected {descriptor.size}"
                )
            # Populated at once: the pages are already in memory (the parent wrote the inputs),
            # and one pass in the kernel costs half the page faults it saves.
            mapping = mmap.mmap(fd, descriptor.size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        finally:
            os.close(fd)
        super().__init__(descriptor, mapping)

    def close(self) -> None:
        self._unmap()


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _create_segment(size: int) -> tuple[str, mmap.mmap]:
    prefix = segment_prefix()
    while True:
        name = f"{prefix}{next(_counter)}"
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Left behind by an earlier process with the same pid that was killed.
            continue
        resource_tracker.register(_tracker_name(name), _TRACKER_TYPE)
        try:
            _reserve(fd, size)
            return name, mmap.mmap(fd, size)
        except BaseException:
            path.unlink(missing_ok=True)
            resource_tracker.unregister(_tracker_name(name), _TRACKER_TYPE)
            raise
        finally:
            os.close(fd)


def _reserve(fd: int, size: int) -> None:
    """Allocate the pages now: tmpfs would otherwise fail on first touch with SIGBUS."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise ShmAllocationError(
                f"cannot reserve {size} bytes in {SHM_DIR}: {exc.strerror}"
            ) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _tracker_name(name: str) -> str:
    # The tracker's cleanup is shm_unlink, which takes the POSIX "/name" form.
    return "/" + name


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT
