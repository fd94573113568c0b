"""The project's real broker takes and returns messages as large as a 1024x1024 float64 result."""

from __future__ import annotations

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from localkafka import TopicSettings

pytestmark = pytest.mark.kafka


async def test_round_trip_of_a_16_mb_message(kafka_bootstrap: str, topics: TopicSettings) -> None:
    payload = np.random.default_rng(1).standard_normal((1024, 1024 + 16)).tobytes()  # > 8 MiB
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=topics.max_message_bytes,
    )
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topics.results, payload, key=b"req-1", headers=[("content-type", b"x")]
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=topics.max_message_bytes,
        max_partition_fetch_bytes=topics.max_message_bytes,
    )
    await consumer.start()
    try:
        tp = TopicPartition(topics.results, sent.partition)
        consumer.assign([tp])
        consumer.seek(tp, sent.offset)
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.key == b"req-1"
    assert record.headers == (("content-type", b"x"),)
    assert record.value == payload
