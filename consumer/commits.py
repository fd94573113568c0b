"""Committing the offsets of answered requests to the group (at_least_once).

The positions come from the ledgers (consumer/offsets.py): the oldest request not yet answered
per partition. They are committed on a timer, on revocation and at shutdown. In exactly_once
the offsets go into each answer's transaction instead (consumer/transactions.py), and this
commits nothing.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumer.claims import Claims
from consumer.lag import BrokerContact
from consumer.offsets import OffsetTracker

log = logging.getLogger(__name__)


class Committer:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        offsets: OffsetTracker,
        broker: BrokerContact,
        *,
        transactional: bool,
        claims: Claims | None = None,
    ) -> None:
        self._consumer = consumer
        self._offsets = offsets
        self._broker = broker
        self._transactional = transactional
        self._claims = claims

    async def commit(self, tps: set[TopicPartition] | None = None) -> None:
        """Commit the positions that moved, of ``tps`` or of every owned partition.

        A failure is logged and left to the next commit: the positions stay where they were, so
        a crash meanwhile only redelivers answered requests.
        """
        if self._transactional:
            return  # exactly_once: offsets are committed inside each answer's transaction
        offsets = self._offsets.to_commit(tps)
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("commit of %s failed (%r); the next commit retries", offsets, exc)
            return
        self._broker.ok()
        self._offsets.committed(offsets)
        if self._claims is not None:
            self._claims.committed(offsets)

    def let_go(self, tps: set[TopicPartition]) -> None:
        """Revoked: what was not committed is its next owner's to answer and clean up."""
        if self._claims is not None:
            self._claims.forget(tps)

    async def every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.commit()
