"""Micro-batching: many small requests in one pool task, so per-task costs do not dominate.

A 32x32 SVD takes about 0.1 ms; one pool task (a shared-memory block, two pipe messages,
waking the event loop twice) costs more than that. Small requests are therefore queued here and
sent as one ``Job`` (one block, one task) per batch.

No timer: a batch leaves as soon as fewer than ``slots`` batches are running, so a lone request
goes at once, alone, and adds no latency; while the workers are busy, requests gather and the
next free slot takes them all (up to ``max_items``). The batch size follows the load.

Failures stay per request. An item the worker refused is that request's answer. A batch that
fails as a whole (its worker crashed or timed out, no shared memory) raises ``BatchFailed`` in
every request still waiting; each then runs on its own with the usual retries and error
mapping (consumer/dispatch.py), so an item that crashes its worker fails alone and the others
are answered normally.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from consumer.jobs import (
    Answered,
    ItemOutcome,
    PreparedJob,
    Record,
    WorkerContext,
    prepare_job,
    release_view,
)
from consumer.pool import TaskError, WorkerPool
from consumer.shm import SegmentCache, ShmAllocationError
from consumer.tasks import TaskSet


class BatchFailed(Exception):
    """The batch failed as a whole; the request should run on its own."""


@dataclass(eq=False)
class Delivery:
    """One item's outcome; an answer's bytes stay in the job's block until ``release()``."""

    outcome: ItemOutcome
    pid: int
    value: memoryview | None = None
    job: PreparedJob | None = None

    def release(self) -> None:
        """Give the item's share of the block back (idempotent)."""
        job, self.job = self.job, None
        if self.value is not None:
            release_view(self.value)
            self.value = None
        if job is not None:
            job.release()


def deliveries(
    prepared: PreparedJob, outcomes: tuple[ItemOutcome, ...], pid: int
) -> list[Delivery]:
    """Each item's delivery; every answer holds the block until it is released."""
    out: list[Delivery] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Answered):
            prepared.hold()
            out.append(Delivery(outcome, pid, prepared.answer(index, outcome), prepared))
        else:
            out.append(Delivery(outcome, pid))
    return out


async def run_job(
    pool: WorkerPool,
    records: list[Record],
    context: WorkerContext,
    *,
    timeout_s: float,
    attempt: int = 1,
    cache: SegmentCache | None = None,
) -> list[Delivery]:
    """Run ``records`` as one job: the deliveries in order, or the pool's error for the job."""
    with prepare_job(
        records, context, attempt=attempt, cache=cache, dispatched_at=time.time()
    ) as prepared:
        outcome = await pool.run(prepared.job, timeout=timeout_s)
        return deliveries(prepared, outcome.items, outcome.pid)


@dataclass(eq=False)
class _Entry:
    record: Record
    future: asyncio.Future[Delivery] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    """Queues small records and runs them, ``max_items`` at most per pool task."""

    def __init__(
        self,
        pool: WorkerPool,
        context: WorkerContext,
        *,
        max_items: int,
        item_max_bytes: int,
        timeout_s: float,
        slots: int | None = None,
        cache: SegmentCache | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self._pool = pool
        self._context = context
        self._max_items = max_items
        self._item_max_bytes = item_max_bytes
        self._timeout_s = timeout_s
        self._slots = slots or pool.size
        self._cache = cache
        self._pending: deque[_Entry] = deque()
        self._running = TaskSet()
        self.batches = 0  # counters, for tests and logs
        self.items = 0

    def accepts(self, record: Record) -> bool:
        """Worth batching: a small dense matrix with a small answer (a reduced SVD's factors
        take about twice the matrix), no test fault (those keep their per-attempt semantics).

        Sparse input is not batched: its stored bytes say nothing about its shape, and a large
        sparse matrix would hold up the small ones sharing its task. (A JSON request's format
        is only known once decoded: a small sparse one may share a batch.)
        """
        return (
            self._max_items > 1
            and record.fault is None
            and not record.sparse
            and not record.stored_bytes  # fetched and computed at length: alone
            and len(record.value) <= self._item_max_bytes
            and record.answer_bytes <= 4 * self._item_max_bytes
        )

    async def run(self, record: Record) -> Delivery:
        """``record``'s delivery; ``BatchFailed`` if its batch failed as a whole."""
        entry = _Entry(record)
        self._pending.append(entry)
        self._dispatch()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # Cancelled after its batch delivered: the block's share would never come back.
            if entry.future.done() and not entry.future.cancelled():
                entry.future.result().release()
            entry.future.cancel()  # still queued: its batch skips it
            raise

    def _dispatch(self) -> None:
        while self._pending and len(self._running) < self._slots:
            batch: list[_Entry] = []
            while self._pending and len(batch) < self._max_items:
                entry = self._pending.popleft()
                if not entry.future.done():  # not cancelled while queued
                    batch.append(entry)
            if not batch:
                return
            job = self._running.spawn(self._run(batch), name=f"batch of {len(batch)}")
            job.add_done_callback(self._done)  # after the set's own: it no longer counts this one

    def _done(self, job: asyncio.Task[None]) -> None:
        self._dispatch()

    async def _run(self, batch: list[_Entry]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await run_job(
                self._pool, [e.record for e in batch], self._context,
                timeout_s=self._timeout_s, cache=self._cache,
            )  # fmt: skip
        except (TaskError, ShmAllocationError) as exc:
            _fail(batch, BatchFailed(f"the batch of {len(batch)} failed: {exc}"))
        except BaseException as exc:  # the pool is closed, or we are cancelled: not retryable
            _fail(batch, exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
        else:
            for entry, delivery in zip(batch, results, strict=True):
                if entry.future.done():  # cancelled while its batch ran
                    delivery.release()
                else:
                    entry.future.set_result(delivery)


def _fail(batch: list[_Entry], exc: BaseException) -> None:
    for entry in batch:
        if entry.future.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            entry.future.cancel()
        else:
            entry.future.set_exception(exc)
