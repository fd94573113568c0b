"""The table of requests awaiting an answer, and the bounded memory of finished ones.

Both are bounded: the table by ``max_pending`` slots (a caller awaits a free slot; nothing queues
outside the table), the memory of finished ids by size and age. The memory is only for telling a
duplicate or a late answer apart from another client's answer: request ids are uuid4 and never
reused, so an id that is not pending is dropped whichever it is, and forgetting one is harmless.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from producer_sdk.errors import SvdTimeout

T = TypeVar("T")


class Finished(StrEnum):
    """How a request left the table."""

    ANSWERED = "answered"
    EXPIRED = "expired"
    ABANDONED = "abandoned"  # the caller cancelled, or the client closed
    FAILED = "failed"  # it never reached Kafka


class Disposition(StrEnum):
    """What became of an incoming answer."""

    RESOLVED = "resolved"
    DUPLICATE = "duplicate"  # its request was answered already (at-least-once redelivery)
    LATE = "late"  # its request had timed out, been cancelled or failed
    UNKNOWN = "unknown"  # not ours (another client's), or finished too long ago to remember


class SeenIds:
    """Recently finished request ids: at most ``max_size``, each kept at most ``ttl_s``."""

    def __init__(
        self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1 or ttl_s <= 0:
            raise ValueError("max_size must be >= 1 and ttl_s > 0")
        self._max_size = max_size
        self._ttl_s = ttl_s
        self._clock = clock
        # Insertion order is age order: entries are never refreshed, so the oldest is first.
        self._ids: OrderedDict[str, tuple[float, Finished]] = OrderedDict()

    def add(self, request_id: str, how: Finished) -> None:
        now = self._clock()
        self._ids.pop(request_id, None)
        self._ids[request_id] = (now, how)
        self._evict(now)

    def get(self, request_id: str) -> Finished | None:
        entry = self._ids.get(request_id)
        if entry is None:
            return None
        at, how = entry
        if self._clock() - at > self._ttl_s:
            return None
        return how

    def __contains__(self, request_id: object) -> bool:
        return isinstance(request_id, str) and self.get(request_id) is not None

    def __len__(self) -> int:
        self._evict(self._clock())
        return len(self._ids)

    def _evict(self, now: float) -> None:
        while len(self._ids) > self._max_size:
            self._ids.popitem(last=False)
        while self._ids:
            at, _ = next(iter(self._ids.values()))
            if now - at <= self._ttl_s:
                break
            self._ids.popitem(last=False)


@dataclass
class PendingStats:
    resolved: int = 0
    duplicates: int = 0
    late: int = 0
    unknown: int = 0
    expired: int = 0
    abandoned: int = 0
    failed: int = 0


@dataclass
class _Entry(Generic[T]):
    future: asyncio.Future[T]
    timer: asyncio.TimerHandle
    how: Finished | None = field(default=None)


class PendingTable(Generic[T]):
    """Request id -> future of its answer, with a deadline timer each.

    A slot is taken by ``open`` and given back when the future is done for any reason (answer,
    timeout, failure, or cancellation of the future by whoever awaits it), so a request abandoned
    by its caller still leaves the table at its deadline at the latest.
    """

    def __init__(self, max_pending: int, seen: SeenIds) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.max_pending = max_pending
        self.seen = seen
        self.stats = PendingStats()
        self._slots = asyncio.Semaphore(max_pending)
        self._entries: dict[str, _Entry[T]] = {}

    def __len__(self) -> int:
        """Requests still awaiting their answer."""
        return sum(1 for entry in self._entries.values() if not entry.future.done())

    def __contains__(self, request_id: object) -> bool:
        """Whether ``request_id`` still awaits its answer."""
        entry = self._entries.get(request_id) if isinstance(request_id, str) else None
        return entry is not None and not entry.future.done()

    async def open(self, request_id: str, deadline: float) -> asyncio.Future[T]:
        """Wait for a free slot until ``deadline`` (event-loop time), then register the request.

        Raises SvdTimeout if no slot frees up in time.
        """
        if request_id in self._entries:
            raise ValueError(f"request id {request_id!r} is already pending")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            self.stats.expired += 1
            raise SvdTimeout(
                f"no free slot among {self.max_pending} pending requests before the timeout",
                request_id=request_id,
            ) from None
        future: asyncio.Future[T] = loop.create_future()
        timer = loop.call_at(deadline, self._expire, request_id)
        self._entries[request_id] = _Entry(future, timer)
        future.add_done_callback(lambda _: self._finish(request_id))
        return future

    def resolve(self, request_id: str, outcome: T | BaseException) -> Disposition:
        """Deliver an answer (a value, or an exception to raise in the caller)."""
        entry = self._entries.get(request_id)
        if entry is not None and not entry.future.done():
            entry.how = Finished.ANSWERED
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)
            self.stats.resolved += 1
            return Disposition.RESOLVED
        return self.classify(request_id)

    def classify(self, request_id: str) -> Disposition:
        """Count an answer that has no pending request, and say why it has none."""
        entry = self._entries.get(request_id)
        # A finished entry stays in the table until its done-callback runs on the next loop turn.
        how = (entry.how or Finished.ABANDONED) if entry is not None else self.seen.get(request_id)
        if how is Finished.ANSWERED:
            self.stats.duplicates += 1
            return Disposition.DUPLICATE
        if how is not None:
            self.stats.late += 1
            return Disposition.LATE
        self.stats.unknown += 1
        return Disposition.UNKNOWN

    def fail(self, request_id: str, error: BaseException) -> None:
        """The request could not be sent: end it with ``error``."""
        entry = self._entries.get(request_id)
        if entry is not None and not entry.future.done():
            entry.how = Finished.FAILED
            entry.future.set_exception(error)

    def fail_all(self, make_error: Callable[[str], BaseException]) -> None:
        """End every pending request (the client is closing or broke)."""
        for request_id, entry in list(self._entries.items()):
            if not entry.future.done():
                entry.how = Finished.ABANDONED
                entry.future.set_exception(make_error(request_id))

    def _expire(self, request_id: str) -> None:
        entry = self._entries.get(request_id)
        if entry is not None and not entry.future.done():
            entry.how = Finished.EXPIRED
            entry.future.set_exception(
                SvdTimeout("no answer before the request's deadline", request_id=request_id)
            )

    def _finish(self, request_id: str) -> None:
        entry = self._entries.pop(request_id)
        entry.timer.cancel()
        self._slots.release()
        how = entry.how or Finished.ABANDONED  # no reason recorded: the future was cancelled
        counter = {
            Finished.EXPIRED: "expired",
            Finished.ABANDONED: "abandoned",
            Finished.FAILED: "failed",
        }.get(how)
        if counter:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.seen.add(request_id, how)
        if not entry.future.cancelled():
            # Nobody may ever await a submitted request; its outcome is theirs to ignore, not a
            # "never retrieved" error in the log.
            entry.future.exception()
