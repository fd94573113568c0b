"""Create the project's topics (idempotent), sized for large matrices."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from localkafka.errors import BrokerError
from localkafka.settings import TopicSettings

_TOPIC_ALREADY_EXISTS = 36


async def ensure_topics(
    bootstrap: str,
    settings: TopicSettings | None = None,
    *,
    extra: dict[str, int] | None = None,
) -> dict[str, int]:
    """Create missing topics; return {topic: partitions} as the broker reports them."""
    settings = settings or TopicSettings()
    wanted = {**settings.partitions(), **(extra or {})}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        replicas, min_insync = settings.replication_for(brokers)
        config = {
            "max.message.bytes": str(settings.max_message_bytes),
            "min.insync.replicas": str(min_insync),
        }
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, replicas, topic_configs=config)
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            for topic, code, *message in response.topic_errors:
                # "already exists" means a concurrent caller created it: what we wanted.
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise BrokerError(f"creating topic {topic} failed: error {code} {message}")
        return await _wait_visible(admin, wanted)
    finally:
        await admin.close()


async def _wait_visible(
    admin: AIOKafkaAdminClient, wanted: dict[str, int], timeout_s: float = 30.0
) -> dict[str, int]:
    """Metadata lags creation by a moment; wait until every partition is visible."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await admin.describe_topics(list(wanted))
        seen = {t["topic"]: len(t["partitions"]) for t in described}
        if all(seen.get(name, 0) >= n for name, n in wanted.items()):
            return seen
        if asyncio.get_running_loop().time() > deadline:
            raise BrokerError(
                f"topics not visible after {timeout_s:.0f}s: wanted {wanted}, saw {seen}"
            )
        await asyncio.sleep(0.1)


async def partition_leaders(bootstrap: str, topic: str) -> dict[int, int]:
    """{partition: leader node id} of ``topic`` as the cluster reports it (-1: no leader)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return {p["partition"]: p["leader"] for p in described["partitions"]}
    finally:
        await admin.close()


async def under_replicated(bootstrap: str) -> list[str]:
    """Partitions (internal topics' too) without a leader or with a replica out of sync."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        names = await admin.list_topics()
        described = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    return [
        f"{t['topic']}-{p['partition']} (leader {p['leader']}, isr {sorted(p['isr'])})"
        for t in described
        for p in t["partitions"]
        if p["leader"] < 0 or set(p["isr"]) != set(p["replicas"])
    ]
