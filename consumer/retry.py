"""The one backoff policy: exponential delays between attempts, capped.

Every retry loop of the service (publishing, transactions, worker restarts, compute attempts,
unexpected failures on the request path) takes its delays from a ``Backoff``, so the policy is
written once and its limits are read in one place.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """``first_s`` after the first failure, multiplied by ``factor`` after each one, at most
    ``max_s``."""

    first_s: float
    max_s: float = math.inf
    factor: float = 2.0

    def __post_init__(self) -> None:
        # Written as "not ok" so that NaN, which fails every comparison, is refused too.
        if not (self.first_s >= 0 and self.max_s >= 0 and self.factor >= 1):
            raise ValueError(
                "a backoff needs first_s >= 0, max_s >= 0 and factor >= 1, got "
                f"first_s={self.first_s}, max_s={self.max_s}, factor={self.factor}"
            )

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure in a row (counting from 1)."""
        if failures < 1:
            raise ValueError(f"failures counts from 1, got {failures}")
        if self.first_s == 0 or self.factor == 1:
            # Nothing grows, so the power below, which overflows on a long outage even for
            # these, must not turn the delay into max_s.
            return float(min(self.first_s, self.max_s))
        try:
            grown = self.first_s * self.factor ** (failures - 1)
        except OverflowError:  # a long outage: the power left the float range
            grown = math.inf
        return float(min(grown, self.max_s))

    def delays(self) -> Iterator[float]:
        """The waits after the first, second, ... failure, without end."""
        failures = 0
        while True:
            failures += 1
            yield self.delay(failures)

    async def sleep(self, failures: int) -> float:
        """Wait ``delay(failures)`` and return it (for the log line)."""
        seconds = self.delay(failures)
        await asyncio.sleep(seconds)
        return seconds
