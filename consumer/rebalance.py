"""What the service does when the group takes partitions away or hands them over.

On revoke: nothing new starts for those partitions, their answers are waited for (bounded by
min(drain timeout, session timeout)), their offsets committed, and they are let go. A request
that finishes later is still answered but cannot move the new owner's commit position: each
assignment has its own ledger (consumer/offsets.py). On assign: exactly_once fences the
partitions' previous owners, and the service's pause is re-applied (pauses do not survive a
rebalance).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from consumer.commits import Committer
from consumer.flow import InFlight
from consumer.lag import LagMonitor
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.transactions import TransactionalOutbox

# The service's logger, not this module's: operators, tests/support and bench/kafka_runs.py
# (which also runs older trees) follow the group through "consumer.service: assigned/revoked".
log = logging.getLogger("consumer.service")


class Intake(Protocol):
    """The part of the service that fetches and admits records, as a rebalance sees it."""

    @property
    def paused(self) -> bool:
        """Every assigned partition is paused until the in-flight budget drains."""
        ...

    @property
    def stopping(self) -> bool:
        """Draining for a stop: partitions assigned now stay paused."""
        ...

    def forget_fetched(self, revoked: set[TopicPartition]) -> None:
        """Make what was fetched so far stale, and drop what is held for ``revoked``."""
        ...


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's rebalance listener. ``wait_s`` bounds a revocation's wait for answers."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        intake: Intake,
        *,
        offsets: OffsetTracker,
        inflight: InFlight,
        committer: Committer,
        outbox: TransactionalOutbox | None,
        lag: LagMonitor,
        metrics: Metrics,
        wait_s: float,
    ) -> None:
        self._consumer = consumer
        self._intake = intake
        self._offsets = offsets
        self._inflight = inflight
        self._committer = committer
        self._outbox = outbox
        self._lag = lag
        self._metrics = metrics
        self._wait_s = wait_s
        self.joined = False  # holds an assignment (possibly empty) from the group
        # Set once the shutdown's wait for requests is over: a revocation then waits for none,
        # what is left is cancelled.
        self.closing = False

    async def on_partitions_assigned(self, partitions: list[TopicPartition]) -> None:
        assigned = set(partitions)
        if self._outbox is not None:
            await self._outbox.open(assigned)  # fences the previous owner of each partition
        self.joined = True
        self._metrics.rebalances.labels(kind="assigned").inc()
        stopping = self._intake.stopping
        # Pause flags do not survive a rebalance: re-apply ours to what we were given.
        if self._intake.paused or stopping:
            self._consumer.pause(*assigned)
        self._metrics.assigned_partitions.set(len(self._consumer.assignment()))
        self._metrics.paused_partitions.set(len(self._consumer.paused()))
        # The pause state as aiokafka holds it, for operators and tests/faults/test_rebalance.py.
        why = "budget full" if self._intake.paused else "budget open"
        log.info(
            "assigned %s; %d of them paused (%s)",
            sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
            len(self._consumer.paused() & assigned),
            "stopping" if stopping else why,
        )

    async def on_partitions_revoked(self, partitions: list[TopicPartition]) -> None:
        """Start nothing new for these; wait (bounded) for their answers, commit, let go."""
        revoked = set(partitions)
        self._intake.forget_fetched(revoked)
        self.joined = False  # until the rebalance assigns again
        if revoked:  # the first join revokes nothing
            self._metrics.rebalances.labels(kind="revoked").inc()
        if not self.closing:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._wait_s
            while loop.time() < deadline and any(
                self._offsets.ledger(tp).in_flight for tp in revoked if tp in self._offsets.owned()
            ):
                await self._inflight.wait_for_release(max(0.0, deadline - loop.time()))
        if self._outbox is not None:
            await self._outbox.close(revoked)
        else:
            await self._committer.commit(revoked)
            self._committer.let_go(revoked)
        self._offsets.revoke(revoked)
        self._lag.forget(revoked)
        log.info("revoked %s", sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))
