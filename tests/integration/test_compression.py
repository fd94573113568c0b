"""Every Kafka compression codec, through the real broker, both ways.

The topics are set to recompress (topic-level ``compression.type``), so the broker stores the
SDK's requests and the service's answers in each codec in turn: the service must read every
codec on svd-requests, and the SDK on svd-results. A service without the codec libraries used
to exit on the first such batch (tests/faults/test_unreadable.py has what happens to a batch it
still cannot read).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from producer_sdk import AsyncSvdClient
from tests.sdk_contract.conftest import ServedTopics, start_service

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedTopics]:
    yield from start_service(kafka_bootstrap, tmp_path_factory.mktemp("svc"), pool_size=1)


async def _compress_topics(bootstrap: str, topics: list[str], codec: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # AlterConfigs replaces a topic's whole configuration: restate the size limit too.
        configs = {"compression.type": codec, "max.message.bytes": str(64 << 20)}
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs=configs) for name in topics]
        )
        for _ in range(100):  # the change reaches the partition leaders asynchronously
            described = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics]
            )
            # One codec per topic: both must have taken the change.
            values = [
                {entry[0]: entry[1] for entry in resource[4]}
                for response in described
                for resource in response.resources
            ]
            if len(values) == len(topics) and all(
                v.get("compression.type") == codec for v in values
            ):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"compression.type never became {codec}: {values}")
    finally:
        await admin.close()


@pytest.mark.parametrize("codec", CODECS)
async def test_requests_and_answers_stored_in_each_codec_are_read(
    served: ServedTopics, codec: str
) -> None:
    topics = [served.topics.requests, served.topics.results]
    await _compress_topics(served.bootstrap, topics, codec)
    rng = np.random.default_rng(len(codec))
    matrices: list[np.ndarray[Any, Any]] = [rng.standard_normal((20, 12)) for _ in range(8)]
    async with AsyncSvdClient(
        bootstrap_servers=served.bootstrap,
        requests_topic=served.topics.requests,
        results_topic=served.topics.results,
    ) as client:
        results = await asyncio.gather(*(client.svd(a, timeout=60) for a in matrices))
    for a, result in zip(matrices, results, strict=True):
        assert result.u is not None and result.vt is not None
        assert np.allclose(result.u * result.s @ result.vt, a, atol=1e-10)
