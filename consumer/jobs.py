"""The job protocol between the parent and a pool worker, and the parent's side of a job's block.

A ``Job`` is a list of items, each one Kafka record as received, in one shared-memory block: the
parent copies each record's value (and its headers, packed) into the block once and reserves
room for the encoded answer; the worker decodes, validates, computes and writes the answer there
(consumer/processing.py); the parent publishes those bytes. Micro-batching many small requests
per task is a change of how many items the parent puts in, not of the API.

Messages on the worker's pipe: the worker first sends ``Ready``; then, for each ``Job`` it
receives, exactly one ``JobOutcome`` or ``JobFailure``; ``None`` from the parent means "exit".
What crosses the pipe is small and built by our own processes: region indexes, names, numbers,
and the answer's headers the worker built. No received byte crosses it (tests/unit/test_no_pickle.py).
Its dataclasses have no ``__slots__`` on purpose: pickle copies a plain instance's ``__dict__`` in C,
while slots go through dataclasses' Python ``__getstate__``, three times slower per item.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from consumer.shm import ArraySpec, BlockDescriptor, SegmentCache, ShmBlock
from objectstore.settings import StoreSettings
from schemas.limits import DecodeLimits

#: Test-only faults a job item may carry; the consumer sets them only when its settings enable
#: test faults. "*_once" fire only on a job's first attempt, so a retry succeeds.
FAULTS = frozenset({"segfault", "kill", "hang", "raise", "segfault_once", "kill_once"})

# Failure kinds of a whole job (an item's own failures are ``Refused`` items), for the
# parent's mapping to error codes.
KIND_RESOURCES = "resources"  # out of memory: may pass later, retryable
KIND_INTERNAL = "internal"  # anything else: a bug, not retryable

Header = tuple[str, bytes | None]


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs besides the records: the contract's limits and who it is."""

    limits: DecodeLimits
    instance_id: str
    host: str
    # The object store of stored payloads (None: none configured), and the size above which a
    # version 2 request's factors go there instead of into its answer's record.
    store: StoreSettings | None = None
    store_results_above: int = 0


@dataclass(frozen=True)
class JobItem:
    """One record of a job: region indexes in the block, and what the record carries besides."""

    value: int  # the record's value, as received
    headers: int  # the record's headers, packed (``pack_headers``)
    answer: int  # room for the encoded answer's value
    timestamp_ms: int  # the record's timestamp, -1 if it has none
    fault: str | None = None
    origin: str = ""  # "topic/partition/offset": names the record's stored result


@dataclass(frozen=True)
class Job:
    """A list of items sharing one block. ``attempt`` counts from 1 across retries."""

    block: BlockDescriptor
    items: tuple[JobItem, ...]
    context: WorkerContext
    attempt: int = 1
    dispatched_at: float = 0.0  # epoch seconds, for the result's queue wait


@dataclass(frozen=True)
class Answered:
    """A result, encoded in the item's answer region: ``value_bytes`` long, with ``headers``."""

    request_id: str
    reply_topic: str | None
    created_at_ms: int | None
    value_bytes: int
    headers: tuple[tuple[str, bytes], ...]
    compute_ms: float
    queue_wait_ms: float
    # The stored request's object, deleted once this answer is acknowledged; the stored
    # factors' object, for the log.
    request_object: str | None = None
    result_object: str | None = None


@dataclass(frozen=True)
class Refused:
    """An item answered with an error: ``code`` and ``message`` for the error result.

    ``computed`` says whether a compute attempt was made (the dead letter's attempts count);
    ``again`` that a later attempt may pass (out of memory), so the parent tries again.
    ``request_id`` and ``reply_topic`` are the request's, or recovered from a record that did
    not decode (None when nothing could be found).
    """

    code: str
    message: str
    retryable: bool
    request_id: str | None
    reply_topic: str | None
    created_at_ms: int | None
    computed: bool
    again: bool = False


@dataclass(frozen=True)
class NeedsRoom:
    """The answer needs more room than was reserved: run the item again with ``answer_bytes``.
    Only a JSON request's room is estimated before it is decoded; the worker computed nothing."""

    answer_bytes: int


ItemOutcome = Answered | Refused | NeedsRoom


@dataclass(frozen=True)
class JobOutcome:
    """Every item's outcome, in order. ``worker_ms`` spans attach to detach, inside the worker."""

    items: tuple[ItemOutcome, ...]
    pid: int
    worker_ms: float
    blas_threads: int


@dataclass(frozen=True)
class JobFailure:
    """A job that failed as a whole (its block could not be read, say). The worker survives it."""

    kind: str
    error_type: str
    message: str
    retryable: bool
    traceback: str


@dataclass(frozen=True)
class Ready:
    """First message of a worker: initialized and waiting for jobs."""

    pid: int
    blas_threads: int


# --- the headers of a record, packed into its block --------------------------------------------

_COUNT = struct.Struct("<I")
_LENGTHS = struct.Struct("<Ii")  # name bytes, value bytes (-1: a null value)


def pack_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    """The record's headers as bytes for the block: a count, then each name and value."""
    parts = [_COUNT.pack(len(headers))]
    for name, value in headers:
        raw = name.encode("utf-8", "surrogateescape")
        parts.append(_LENGTHS.pack(len(raw), -1 if value is None else len(value)))
        parts.append(raw)
        if value is not None:
            parts.append(bytes(value))
    return b"".join(parts)


def unpack_headers(packed: memoryview) -> list[Header]:
    """``pack_headers`` undone (in the worker, from the block the parent wrote)."""
    (count,) = _COUNT.unpack_from(packed, 0)
    offset = _COUNT.size
    headers: list[Header] = []
    for _ in range(count):
        name_bytes, value_bytes = _LENGTHS.unpack_from(packed, offset)
        offset += _LENGTHS.size
        name = bytes(packed[offset : offset + name_bytes]).decode("utf-8", "surrogateescape")
        offset += name_bytes
        value = None
        if value_bytes >= 0:
            value = bytes(packed[offset : offset + value_bytes])
            offset += value_bytes
        headers.append((name, value))
    return headers


# --- parent side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """What the parent puts in a job for one record."""

    value: bytes
    headers: Sequence[tuple[str, bytes | None]]
    timestamp_ms: int | None
    answer_bytes: int  # room reserved for the answer's value
    fault: str | None = None
    sparse: bool = False  # known sparse (from a binary request's header)
    stored_bytes: int = 0  # payload bytes the worker reads from and writes to the store
    origin: str = ""  # "topic/partition/offset"


class PreparedJob:
    """A job and the block it lives in; closing it gives the block back.

    Use as a context manager around ``pool.run`` and the reading of the answers, so the block
    is given back on every path (including a crash, a timeout or a cancellation). ``hold()``
    keeps it past the ``with`` for answers still being published: each holder calls
    ``release()``, and the block goes back when the last one has.
    """

    def __init__(self, block: ShmBlock, job: Job) -> None:
        self.block = block
        self.job = job
        self._holders = 0
        self._reuse = True
        self._exited = False

    def answer(self, index: int, outcome: Answered) -> memoryview:
        """The bytes of item ``index``'s answer value, in the block (valid until closed)."""
        return self.block.view(self.job.items[index].answer, outcome.value_bytes)

    def hold(self) -> None:
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        self._close_when_free()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A job that failed may have had its worker killed (timeout, cancellation): a process
        # being killed can still write for a moment, so its segment never serves another job.
        self._reuse = exc_type is None
        self._exited = True
        self._close_when_free()

    def _close_when_free(self) -> None:
        if self._exited and self._holders <= 0:
            self.block.close(reuse=self._reuse)


def prepare_job(
    records: Sequence[Record],
    context: WorkerContext,
    *,
    attempt: int = 1,
    cache: SegmentCache | None = None,
    dispatched_at: float = 0.0,
) -> PreparedJob:
    """Lay out one block for the records and copy each value and its headers in, once."""
    if not records:
        raise ValueError("a job needs at least one record")
    packed = [pack_headers(record.headers) for record in records]
    specs: list[ArraySpec] = []
    items: list[JobItem] = []
    for record, headers in zip(records, packed, strict=True):
        first = len(specs)
        specs += [
            ArraySpec.raw(len(record.value)),
            ArraySpec.raw(len(headers)),
            ArraySpec.raw(record.answer_bytes),
        ]
        stamp = -1 if record.timestamp_ms is None else record.timestamp_ms
        items.append(JobItem(first, first + 1, first + 2, stamp, record.fault, record.origin))
    block = ShmBlock(specs, cache)
    try:
        for record, headers, item in zip(records, packed, items, strict=True):
            block.write(item.value, record.value)
            block.write(item.headers, headers)
    except BaseException:
        block.close()
        raise
    job = Job(block.descriptor, tuple(items), context, attempt, dispatched_at)
    return PreparedJob(block, job)


def release_view(view: memoryview) -> None:
    """Let go of a view of a block, so the block's segment can serve another job."""
    with contextlib.suppress(BufferError):  # a derived view still alive: the segment is dropped
        view.release()
