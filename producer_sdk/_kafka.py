"""aiokafka plumbing shared by the client and the listener: topic metadata, and a reader that is
assigned every partition of one topic without a consumer group.

Manual assignment means no group coordinator, no rebalances, and the reader is reading (its
positions are fixed) as soon as ``start`` returns: a reply produced after that is never missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from producer_sdk.settings import ClientSettings

log = logging.getLogger("producer_sdk")

StartAt = Literal["end", "beginning"]

_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


class TopicMissing(Exception):
    pass


async def topic_partitions(
    settings: ClientSettings, topic: str, *, create_partitions: int | None = None
) -> int:
    """How many partitions ``topic`` has; create it first when ``create_partitions`` is given."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-admin",
        request_timeout_ms=int(settings.start_timeout_s * 1000),
        **settings.kafka_security(),
    )
    await admin.start()
    try:
        count = await _describe(admin, topic)
        if count is None and create_partitions is not None:
            replication = settings.reply_topic_replication
            if replication is None:
                # As durable as the cluster allows, and still creatable on a one-broker cluster.
                brokers = (await admin.describe_cluster()).get("brokers") or [None]
                replication = min(3, len(brokers))
            new = NewTopic(
                topic,
                create_partitions,
                replication,
                topic_configs={"max.message.bytes": str(settings.max_message_bytes)},
            )
            response = await admin.create_topics([new])
            for name, code, *message in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise TopicMissing(f"creating topic {name} failed: error {code} {message}")
            # Metadata lags creation; the caller bounds this by start_timeout_s.
            while (count := await _describe(admin, topic)) is None:  # noqa: ASYNC110 (broker state)
                await asyncio.sleep(0.1)
        if count is None:
            raise TopicMissing(f"topic {topic!r} does not exist")
        return count
    finally:
        await admin.close()


async def _describe(admin: AIOKafkaAdminClient, topic: str) -> int | None:
    described: Sequence[dict[str, Any]] = await admin.describe_topics([topic])
    for entry in described:
        if entry.get("topic") == topic and entry.get("error_code", 0) != _UNKNOWN_TOPIC:
            partitions = entry.get("partitions") or []
            return len(partitions) or None
    return None


class TopicReader:
    """Every partition of one topic, no consumer group, from the end or from the beginning."""

    def __init__(self, settings: ClientSettings, topic: str, *, client_suffix: str) -> None:
        self._settings = settings
        self._topic = topic
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.client_id}-{client_suffix}",
            group_id=None,
            enable_auto_commit=False,
            # Only reached if the log was truncated under us; earliest skips nothing still there.
            auto_offset_reset="earliest",
            fetch_max_bytes=settings.fetch_max_bytes,
            max_partition_fetch_bytes=settings.fetch_max_bytes,
            metadata_max_age_ms=round(settings.metadata_max_age_s * 1000),
            # Answers of an exactly_once service become visible when their transaction commits;
            # plain (at-least-once) answers are visible at once either way.
            isolation_level="read_committed",
            **settings.kafka_security(),
        )
        self._partitions: set[int] = set()

    async def start(self, partitions: int, start_at: StartAt) -> None:
        await self._consumer.start()
        tps = [TopicPartition(self._topic, p) for p in range(partitions)]
        self._consumer.assign(tps)
        if start_at == "end":
            # Captured now, so "the end" is a fixed point before the first request is sent.
            ends = await self._consumer.end_offsets(tps)
            for tp in tps:
                self._consumer.seek(tp, ends[tp])
        else:
            await self._consumer.seek_to_beginning(*tps)
        self._partitions = set(range(partitions))

    async def stop(self) -> None:
        await self._consumer.stop()

    async def fetch(self, timeout_s: float) -> list[ConsumerRecord[bytes, bytes]]:
        """The next records (possibly none after ``timeout_s``), in order within each partition."""
        await self._follow_new_partitions()
        batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000))
        return [record for records in batches.values() for record in records]

    async def _follow_new_partitions(self) -> None:
        known = self._consumer.partitions_for_topic(self._topic)
        if not known or known <= self._partitions:
            return
        # assign() replaces the assignment and forgets positions: keep the old ones, and read
        # the new partitions from their beginning (everything in them is newer than our start).
        old = {tp: await self._consumer.position(tp) for tp in self._consumer.assignment()}
        added = [TopicPartition(self._topic, p) for p in sorted(known - self._partitions)]
        self._consumer.assign([*old, *added])
        for tp, position in old.items():
            self._consumer.seek(tp, position)
        await self._consumer.seek_to_beginning(*added)
        self._partitions |= known
        log.info("now reading %s partitions %s too", self._topic, [tp.partition for tp in added])
