"""The transport floor: how long one record takes from a producer to a consumer on this broker.

Every answer crosses Kafka twice (the request in, the result out), so twice this hop is the
part of the "added" latency column that no consumer design can remove. Measured one record at
a time (8 KB, acks=all, no linger, as the SDK sends), on a topic of its own, after a warm-up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.workload import percentile

RECORD_BYTES = 8 * 1024


async def measure(bootstrap: str, count: int = 60, gap_s: float = 0.02) -> dict[str, Any]:
    topic = f"bench-hop-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await producer.start()
    await consumer.start()
    hops: list[float] = []
    try:
        payload = bytes(RECORD_BYTES)
        for i in range(count + 5):  # the first few warm up connections and the fetch session
            sent = time.perf_counter()
            await producer.send(topic, payload)
            await consumer.getone()
            if i >= 5:
                hops.append((time.perf_counter() - sent) * 1000)
            await asyncio.sleep(gap_s)
    finally:
        await consumer.stop()
        await producer.stop()
    return {
        "count": count,
        "record_bytes": RECORD_BYTES,
        "p50_ms": percentile(hops, 50),
        "p99_ms": percentile(hops, 99),
        "min_ms": min(hops),
    }
