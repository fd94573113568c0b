"""Micro-batching: many small matrices in one pool task, so per-task costs do not dominate.

A 32x32 SVD takes about 0.1 ms; one pool task (a shared-memory segment, two pipe messages,
waking the event loop twice) costs more than that. Small requests are therefore queued here and
sent as one ``Job`` (one block, one task) per batch.

No timer: a batch leaves as soon as fewer than ``slots`` batches are running, so a lone request
goes at once, alone, and adds no latency; while the workers are busy, requests gather and the
next free slot takes them all (up to ``max_items``). The batch size follows the load.

Failures stay per request. A batch that fails as a whole (its worker crashed or timed out, one
item raised, no shared memory) raises ``BatchFailed`` in every request still waiting; each then
runs on its own with the usual retries and error mapping (``consumer.work``), so an item that
crashes its worker fails alone and the others are answered normally.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from consumer.pool import TaskError, WorkerPool
from consumer.shm import SegmentCache, ShmAllocationError
from consumer.worker import ItemOutcome, Outputs, SvdTask, prepare_job

T = TypeVar("T")

#: Turns one item's outcome and its factors (views of the block, valid only during the call)
#: into what the request awaits: ``finish(item, outputs, worker_pid, dispatched_at)``.
Finish = Callable[[ItemOutcome, Outputs, int, float], T]


class BatchFailed(Exception):
    """The batch failed as a whole; the request should run on its own."""


@dataclass(eq=False)
class _Entry(Generic[T]):
    task: SvdTask
    finish: Finish[T]
    future: asyncio.Future[T] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher(Generic[T]):
    """Queues small tasks and runs them, ``max_items`` at most per pool task."""

    def __init__(
        self,
        pool: WorkerPool,
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
        self._max_items = max_items
        self._item_max_bytes = item_max_bytes
        self._timeout_s = timeout_s
        self._slots = slots or pool.size
        self._cache = cache
        self._pending: deque[_Entry[T]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # counters, for tests and logs
        self.items = 0

    def accepts(self, task: SvdTask) -> bool:
        """Worth batching: small and dense, no test fault (those keep their per-attempt semantics).

        Sparse input is never batched: its stored bytes say nothing about its shape, and a
        large sparse matrix would hold up the small ones sharing its task.
        """
        return (
            self._max_items > 1
            and task.fault is None
            and isinstance(task.matrix, np.ndarray)
            and task.matrix.nbytes <= self._item_max_bytes
        )

    async def run(self, task: SvdTask, finish: Finish[T]) -> T:
        """``finish``'s value for ``task``; ``BatchFailed`` if its batch failed as a whole."""
        entry: _Entry[T] = _Entry(task, finish)
        self._pending.append(entry)
        self._dispatch()
        # Cancelling the caller cancels the future; its batch skips it and carries on.
        return await entry.future

    def _dispatch(self) -> None:
        while self._pending and len(self._running) < self._slots:
            batch: list[_Entry[T]] = []
            while self._pending and len(batch) < self._max_items:
                entry = self._pending.popleft()
                if not entry.future.done():  # not cancelled while queued
                    batch.append(entry)
            if not batch:
                return
            job = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(job)
            job.add_done_callback(self._done)

    def _done(self, job: asyncio.Task[None]) -> None:
        self._running.discard(job)
        self._dispatch()

    async def _run(self, batch: list[_Entry[T]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            with prepare_job([e.task for e in batch], cache=self._cache) as prepared:
                dispatched = time.time()
                outcome = await self._pool.run(prepared.job, timeout=self._timeout_s)
                for index, entry in enumerate(batch):
                    if entry.future.done():
                        continue
                    try:
                        value = entry.finish(
                            outcome.items[index], prepared.outputs(outcome, index), outcome.pid,
                            dispatched,
                        )  # fmt: skip
                    except Exception as exc:  # this request's own problem (e.g. encoding)
                        entry.future.set_exception(exc)
                    else:
                        entry.future.set_result(value)
        except (TaskError, ShmAllocationError, ValueError) as exc:
            _fail(batch, BatchFailed(f"the batch of {len(batch)} failed: {exc}"))
        except BaseException as exc:  # the pool is closed, or we are cancelled: not retryable
            _fail(batch, exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise


def _fail(batch: list[_Entry[T]], exc: BaseException) -> None:
    for entry in batch:
        if entry.future.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            entry.future.cancel()
        else:
            entry.future.set_exception(exc)
