"""One contract suite, two clients: FakeSvdClient, and AsyncSvdClient against the real broker and
the real consumer service (one service process per module, marked ``kafka``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from localkafka import TopicSettings, ensure_topics
from producer_sdk import AsyncSvdClient
from producer_sdk._base import BaseSvdClient
from producer_sdk.testing import FakeSvdClient
from tests.sdk_contract.consumer_process import ConsumerProcess


@dataclass(frozen=True)
class ServedTopics:
    bootstrap: str
    topics: TopicSettings
    unserved_requests: str  # a requests topic no service reads: requests there are never answered


@dataclass(frozen=True)
class Variant:
    name: str
    # Both return an unstarted client; keyword arguments are ClientSettings overrides.
    make: Callable[..., BaseSvdClient]
    make_unserved: Callable[..., BaseSvdClient]


def start_service(bootstrap: str, log_dir: Path, **settings: object) -> Iterator[ServedTopics]:
    suffix = uuid.uuid4().hex[:10]
    topics = TopicSettings(
        requests=f"sdk-requests-{suffix}",
        results=f"sdk-results-{suffix}",
        dlq=f"sdk-dlq-{suffix}",
    )
    unserved = f"sdk-unserved-{suffix}"
    asyncio.run(ensure_topics(bootstrap, topics, extra={unserved: 1}))
    service = ConsumerProcess(bootstrap, topics, log_dir / "svd-consumer.log", **settings).start()
    try:
        asyncio.run(service.answer_probe())
        yield ServedTopics(bootstrap, topics, unserved)
    finally:
        code = service.stop()
    assert code == 0, f"svd-consumer exited with {code} on SIGTERM:\n{service.log_tail()}"


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedTopics]:
    yield from start_service(kafka_bootstrap, tmp_path_factory.mktemp("svc"), pool_size=2)


def _fake_variant() -> Variant:
    def unserved(**overrides: Any) -> BaseSvdClient:
        client = FakeSvdClient(**overrides)
        client.pause()
        return client

    return Variant("fake", lambda **overrides: FakeSvdClient(**overrides), unserved)


def _kafka_variant(served: ServedTopics) -> Variant:
    base = {
        "bootstrap_servers": served.bootstrap,
        "requests_topic": served.topics.requests,
        "results_topic": served.topics.results,
    }

    def make(**overrides: Any) -> BaseSvdClient:
        return AsyncSvdClient(**{**base, **overrides})

    def unserved(**overrides: Any) -> BaseSvdClient:
        return AsyncSvdClient(**{**base, "requests_topic": served.unserved_requests, **overrides})

    return Variant("kafka", make, unserved)


@pytest.fixture(params=["fake", pytest.param("kafka", marks=pytest.mark.kafka)])
def variant(request: pytest.FixtureRequest) -> Variant:
    if request.param == "fake":
        return _fake_variant()
    return _kafka_variant(request.getfixturevalue("served"))
