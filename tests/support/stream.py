"""A steady stream of SVD requests from the SDK, in a thread of its own, timing every answer.

The cluster fault suite injects its faults from the test's main thread (a node's start waits on
its own event loop); this stream keeps sending meanwhile, the way a web tier would, and records
what the SDK saw: which requests were sent (the broker acknowledged them), which the SDK was told
were refused (a send that failed is the caller's to retry: never "lost"), and when each answer
arrived. Whether an answer is on the results topic at all is counted independently, by
``TallyReader``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from localkafka import TopicSettings
from producer_sdk import AsyncSvdClient, SendFailed, SvdError


@dataclass
class StreamRecord:
    submitted: dict[str, float] = field(default_factory=dict)  # request id -> monotonic time
    answered: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # request id -> why the send failed
    errors: dict[str, str] = field(default_factory=dict)  # answered with an error, or timed out


class SdkStream:
    """``rate`` requests a second of ``size`` x ``size`` matrices until ``stop()``."""

    def __init__(
        self,
        bootstrap: str,
        topics: TopicSettings,
        *,
        rate: float = 20.0,
        size: int = 16,
        answer_timeout_s: float = 300.0,
        max_pending: int = 4096,
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._interval = 1.0 / rate
        self._size = size
        self._timeout = answer_timeout_s
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._record = StreamRecord()
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sdk-stream", daemon=True)

    # -- control (main thread) -----------------------------------------------------------------
    def start(self) -> SdkStream:
        self._thread.start()
        if not self._started.wait(60):
            raise AssertionError(f"the SDK client did not start within 60 s: {self._failure!r}")
        return self

    def stop(self, timeout: float = 240.0) -> StreamRecord:
        """Stop sending, wait for every sent request's outcome (answer, error or refusal)."""
        self._stopping.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream did not finish within {timeout:g} s"
        if self._failure is not None:
            raise AssertionError(f"the stream failed: {self._failure!r}") from self._failure
        return self.snapshot()

    def snapshot(self) -> StreamRecord:
        with self._lock:
            r = self._record
            return StreamRecord(
                dict(r.submitted), dict(r.answered), dict(r.refused), dict(r.errors)
            )

    def wait_answered_after(self, since: float, count: int, timeout: float = 180.0) -> float:
        """Wait until ``count`` requests submitted after ``since`` are answered; return when the
        first of them was (the stream is flowing again)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.snapshot()
            after = sorted(t for rid, t in r.answered.items() if r.submitted[rid] >= since)
            if len(after) >= count:
                return after[0]
            if self._failure is not None:
                raise AssertionError(f"the stream failed: {self._failure!r}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(after)} of {count} requests sent after the fault answered within "
                    f"{timeout:g} s ({len(r.refused)} refused, {len(r.errors)} errors so far)"
                )
            time.sleep(0.1)

    # -- the stream's own thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._stream())
        except BaseException as exc:
            self._failure = exc
            self._started.set()

    async def _stream(self) -> None:
        rng = np.random.default_rng(18)
        client = AsyncSvdClient(
            bootstrap_servers=self._bootstrap,
            requests_topic=self._topics.requests,
            results_topic=self._topics.results,
            max_pending=self._max_pending,
            default_timeout_s=self._timeout,
        )
        waits: set[asyncio.Task[None]] = set()
        async with client:
            self._started.set()
            next_at = time.monotonic()
            while not self._stopping.is_set():
                matrix = rng.standard_normal((self._size, self._size))
                waits.add(asyncio.create_task(self._one(client, matrix)))
                waits = {t for t in waits if not t.done()}
                next_at += self._interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if waits:
                await asyncio.gather(*waits)

    async def _one(self, client: AsyncSvdClient, matrix: np.ndarray) -> None:
        try:
            handle = await client.submit(matrix)
        except SendFailed as exc:  # refused before it had an id we could track
            with self._lock:
                self._record.refused[f"unsent-{id(exc)}"] = str(exc)
            return
        with self._lock:
            self._record.submitted[handle.request_id] = time.monotonic()
        try:
            await handle
        except SendFailed as exc:
            with self._lock:
                self._record.refused[handle.request_id] = f"{type(exc).__name__}: {exc}"
        except SvdError as exc:
            with self._lock:
                self._record.errors[handle.request_id] = f"{type(exc).__name__}: {exc}"
        else:
            with self._lock:
                self._record.answered[handle.request_id] = time.monotonic()


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time without an answer between ``start`` and ``end``."""
    points = [start, *sorted(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(points))
