"""Consumer lag per partition, its estimate in seconds of compute, and whether the broker answers.

Lag of a partition = its high watermark (the offset the next produced record gets) minus the
offset this group last committed for it: every record not yet answered *and* acknowledged,
including those in flight. The committed offset comes from ``OffsetTracker.last_committed``
once this member has committed the partition; before that (just assigned, no traffic yet) it is
asked from the group coordinator, and a group that never committed starts from the log start
(``auto_offset_reset="earliest"``). High watermarks come from one ListOffsets request per refresh
(``end_offsets``), not from ``highwater()``: a paused partition is not fetched, so its fetch-time
high watermark would freeze exactly while the backlog grows.

Lag in seconds estimates how long this member needs to clear its backlog if nothing more
arrives: lag messages x recent mean compute seconds per request / pool size. It assumes the
backlog costs what recent requests cost and the whole pool works in parallel; queue, decode and
publish time are left out, so for a compute-bound service it is a floor. It is NaN while there
is a backlog but no compute was measured yet (nothing to base an estimate on).

Everything here runs in the parent process, on the service's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker

log = logging.getLogger(__name__)

# How far back the mean compute time looks. Long enough to smooth single requests, short
# enough to follow a change in the matrix sizes being sent.
COMPUTE_WINDOW_S = 60.0


class BrokerContact:
    """When a broker call last succeeded; /readyz's "broker reachable" check.

    aiokafka's fetch loop swallows connection errors and retries, so a dead broker shows up
    only as calls that fail or hang. The lag refresh (a ListOffsets round trip every
    ``lag_interval_s``, bounded by a timeout) and every commit count as calls.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._last_ok: float | None = None

    def ok(self) -> None:
        self._last_ok = self._clock()

    def reachable(self) -> bool:
        return self._last_ok is not None and self._clock() - self._last_ok <= self.window_s


class ComputeMean:
    """Mean compute seconds per request over the last ``window_s``, from the compute histogram.

    Reads the histogram's running sum and count (no second record of each request) and keeps
    snapshots to difference against. With no request in the window the last known mean stays:
    an idle service has not become faster.
    """

    def __init__(
        self,
        metrics: Metrics,
        window_s: float = COMPUTE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._window_s = window_s
        self._clock = clock
        self._snapshots: deque[tuple[float, float, float]] = deque()  # (time, sum, count)
        self._last: float | None = None

    def _totals(self) -> tuple[float, float]:
        total = count = 0.0
        for family in self._metrics.compute.collect():
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
        return total, count

    def seconds(self) -> float | None:
        now = self._clock()
        total, count = self._totals()
        self._snapshots.append((now, total, count))
        # Keep one snapshot at or before the window's start to difference against.
        while len(self._snapshots) > 2 and self._snapshots[1][0] <= now - self._window_s:
            self._snapshots.popleft()
        _, old_total, old_count = self._snapshots[0]
        if count > old_count:
            self._last = (total - old_total) / (count - old_count)
        elif self._last is None and count > 0:
            self._last = total / count
        return self._last


class LagMonitor:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        offsets: OffsetTracker,
        metrics: Metrics,
        broker: BrokerContact,
        *,
        pool_size: int,
        timeout_s: float,
    ) -> None:
        self._consumer = consumer
        self._offsets = offsets
        self._metrics = metrics
        self._broker = broker
        self._pool_size = pool_size
        self._timeout_s = timeout_s
        self._compute = ComputeMean(metrics)
        self._labelled: set[TopicPartition] = set()
        self._failing = False

    async def run(self, interval_s: float) -> None:
        """Refresh forever; broker trouble is reported and retried, anything else is a bug."""
        while True:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self.refresh()
            except (KafkaError, TimeoutError) as exc:
                if not self._failing:
                    log.warning("reading partition lag failed (%r); retrying", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("reading partition lag works again")
                self._failing = False
            await asyncio.sleep(interval_s)

    async def refresh(self) -> None:
        assigned = set(self._consumer.assignment())
        if assigned:
            lags = await self._lags(assigned)
            # A rebalance may have run during the reads: report only what is still ours.
            lags = {tp: lag for tp, lag in lags.items() if tp in self._consumer.assignment()}
        else:
            # Nothing to measure, but /readyz still needs to know the broker answers.
            await self._consumer.topics()
            lags = {}
        self._broker.ok()
        for tp in self._labelled - set(lags):  # revoked since: drop the series, do not freeze it
            self._metrics.lag.remove(tp.topic, str(tp.partition))
        for tp, lag in lags.items():
            self._metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
        self._labelled = set(lags)
        self._metrics.lag_seconds.set(self._seconds(sum(lags.values())))

    def forget(self, revoked: set[TopicPartition]) -> None:
        """Drop the lag series of revoked partitions now, not at the next refresh: the new owner
        reports them, and two members must not show the same partition."""
        for tp in revoked & self._labelled:
            self._metrics.lag.remove(tp.topic, str(tp.partition))
        self._labelled -= revoked

    async def _lags(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(list(assigned))
        committed = {tp: self._offsets.last_committed(tp) for tp in ends}
        unknown = [tp for tp, offset in committed.items() if offset is None]
        if unknown:
            from_group = await asyncio.gather(*(self._consumer.committed(tp) for tp in unknown))
            committed.update(zip(unknown, from_group, strict=True))
            never = [tp for tp in unknown if committed[tp] is None]
            if never:
                committed.update(await self._consumer.beginning_offsets(never))
        # Never negative: a commit can land between the two reads.
        return {tp: max(0, end - (committed[tp] or 0)) for tp, end in ends.items()}

    def _seconds(self, lag: int) -> float:
        mean = self._compute.seconds()
        if lag == 0:
            return 0.0
        if mean is None:
            return math.nan
        return lag * mean / self._pool_size
