"""Every Kafka client the service opens, built from its settings in one place.

The answers producer, the transactional producers of exactly_once, the requests consumer and the
admin client share the bootstrap servers, the security settings (one TLS context for all) and a
client id derived from ``SVD_INSTANCE_ID``; the producers share their sizes and batching too.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from consumer.settings import ConsumerSettings

# The producer's own size check. Not SVD_MAX_MESSAGE_BYTES: a dead letter is a verbatim copy of a
# record the broker accepted, which can be larger than that limit (it is then rejected as
# MESSAGE_TOO_LARGE and must still be dead-lettered). Results are already bounded by the decode
# limits, and the broker enforces each topic's max.message.bytes with a clean error; this only
# stays under its default socket.request.max.bytes (100 MiB), above which it drops the connection.
_PUBLISH_CEILING_BYTES = 100 << 20


class KafkaClients:
    """Builds the service's clients, unstarted; their owners start and stop them."""

    def __init__(self, settings: ConsumerSettings) -> None:
        s = self._settings = settings
        self._connection: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers,
            **s.kafka_security(),
        }
        self._producing: dict[str, Any] = {
            "acks": "all",
            "max_request_size": max(s.max_message_bytes, _PUBLISH_CEILING_BYTES),
            "linger_ms": int(s.producer_linger_s * 1000),
            "max_batch_size": s.producer_batch_bytes,
        }

    def answers_producer(self) -> AIOKafkaProducer:
        """Publishes at_least_once's answers; in both guarantees it also lists the topics."""
        return AIOKafkaProducer(
            client_id=f"{self._settings.instance_id}-producer",
            # Not idempotent: after a broker restart aiokafka's idempotent producer can fail every
            # send with OutOfOrderSequenceNumber for good (a batch given up on left a gap in its
            # sequence; aiokafka #1017), and the answers stuck in the Publisher's retries then
            # hold their partitions' commits forever (tests/faults/test_broker_restart.py).
            # Idempotence only saved duplicates of a batch aiokafka resends itself; answers are
            # at-least-once anyway (the Publisher resends too), and readers match on request_id.
            enable_idempotence=False,
            **self._producing,
            **self._connection,
        )

    def transactional_producer(self, transactional_id: str) -> AIOKafkaProducer:
        """Exactly once: one per partition (consumer/transactions.py), named after it."""
        return AIOKafkaProducer(
            client_id=f"{self._settings.instance_id}-{transactional_id}",
            transactional_id=transactional_id,
            enable_idempotence=True,
            **self._producing,
            **self._connection,
        )

    def requests_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            client_id=s.instance_id,
            group_id=s.group_id,
            # Static membership: a restart within the session timeout gets its partitions back
            # without a rebalance, and stop() sends no LeaveGroup (aiokafka skips it).
            group_instance_id=s.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=int(s.max_poll_interval_s * 1000),
            session_timeout_ms=int(s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_s * 1000),
            fetch_max_bytes=s.fetch_max_bytes,
            max_partition_fetch_bytes=s.max_message_bytes,
            # exactly_once: never read a request from an aborted transaction either.
            isolation_level=(
                "read_committed" if s.processing_guarantee == "exactly_once" else "read_uncommitted"
            ),
            **self._connection,
        )

    def admin(self) -> AIOKafkaAdminClient:
        """For the output topics' limits at start (consumer/topic_limits.py)."""
        return AIOKafkaAdminClient(
            client_id=f"{self._settings.instance_id}-admin",
            request_timeout_ms=int(self._settings.session_timeout_s * 1000),
            **self._connection,
        )
