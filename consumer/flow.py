"""Backpressure: the in-flight budget (requests and bytes) and the pause/resume decision.

The budget is admitted against, never queued on: a record that does not fit waits, held by the
service with the rest of its fetch (at most one fetch: consumer/service.py), and the partitions
pause when nothing finishes within a poll, so in-flight memory never grows past the budget
whatever the backlog. Resuming waits for a low watermark so partitions do not flap.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    max_requests: int
    max_bytes: int
    resume_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 1:
            raise ValueError("the in-flight budget needs at least one request and one byte")
        if not 0.0 <= self.resume_ratio < 1.0:
            raise ValueError("resume_ratio must be in [0, 1)")


class InFlight:
    """Counts what is admitted and not yet answered; wakes waiters when room comes back."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.requests = 0
        self.bytes = 0
        self.peak_requests = 0
        self.peak_bytes = 0
        self._changed = asyncio.Event()

    def fits(self, nbytes: int) -> bool:
        """True if one more request of ``nbytes`` may be admitted.

        A request larger than the whole byte budget is still admitted when nothing else is in
        flight; otherwise it could never run. Oversized requests are rejected by the decoder's
        limits, not here.
        """
        if self.requests >= self.budget.max_requests:
            return False
        return self.requests == 0 or self.bytes + nbytes <= self.budget.max_bytes

    def admit(self, nbytes: int) -> None:
        self.requests += 1
        self.bytes += nbytes
        self.peak_requests = max(self.peak_requests, self.requests)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def resize(self, old: int, new: int) -> None:
        """An admitted request now holds ``new`` bytes instead of ``old``."""
        self.bytes += new - old
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if new < old:
            self._changed.set()

    def release(self, nbytes: int) -> None:
        self.requests -= 1
        self.bytes -= nbytes
        self._changed.set()

    def below_low_watermark(self) -> bool:
        ratio = self.budget.resume_ratio
        return (
            self.requests <= int(self.budget.max_requests * ratio)
            and self.bytes <= self.budget.max_bytes * ratio
        )

    async def wait_for_release(self, seconds: float) -> None:
        """Wait until something is released, or ``seconds`` pass (to poll Kafka again)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
