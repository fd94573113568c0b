"""Shared fixtures: a real Kafka broker for the whole session, and fresh topics per test.

Where the broker comes from, in order: KAFKA_BOOTSTRAP_SERVERS; the project's local broker
(jars from Maven Central, started with java); testcontainers when a Docker engine answers.
With CI=true a broker that cannot be had is an error; on a laptop the Kafka tests are skipped.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from localkafka import BrokerError, LocalBroker, TopicSettings, ensure_topics

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class KafkaEndpoint:
    bootstrap: str
    local: LocalBroker | None  # None when the broker is not ours to stop and restart


def _docker_kafka() -> Iterator[str] | None:
    try:
        import docker  # type: ignore[import-untyped]
        from testcontainers.kafka import KafkaContainer

        docker.from_env().ping()
    except Exception:
        return None

    def run() -> Iterator[str]:
        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield container.get_bootstrap_server()

    return run()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaEndpoint]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield KafkaEndpoint(external, None)
        return
    broker = LocalBroker(workdir=tmp_path_factory.mktemp("kafka"))
    try:
        state = broker.start(die_with_parent=True)
    except BrokerError as exc:
        failure = f"no Kafka broker: the local broker could not start: {exc}"
    else:
        try:
            yield KafkaEndpoint(state.bootstrap, broker)
        finally:
            broker.destroy()
        return
    containers = _docker_kafka()
    if containers is not None:
        for bootstrap in containers:
            yield KafkaEndpoint(bootstrap, None)
        return
    if IN_CI:
        pytest.fail(failure, pytrace=False)
    pytest.skip(failure)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka: KafkaEndpoint) -> str:
    return kafka.bootstrap


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicSettings:
    """Topics of this test alone, so tests never read each other's messages."""
    suffix = uuid.uuid4().hex[:10]
    settings = TopicSettings(
        requests=f"svd-requests-{suffix}",
        results=f"svd-results-{suffix}",
        dlq=f"svd-dlq-{suffix}",
    )
    asyncio.run(ensure_topics(kafka_bootstrap, settings))
    return settings
