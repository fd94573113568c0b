"""Shared fixtures: a real Kafka broker and a real S3-compatible object store for the whole
session, and fresh topics per test.

Where the broker comes from, in order: KAFKA_BOOTSTRAP_SERVERS; the project's local broker
(jars from Maven Central, started with java); testcontainers when a Docker engine answers.
Where the object store comes from: SVD_STORE_ENDPOINT (with the other SVD_STORE_* variables;
an error if it does not serve); else the project's local store (S3Proxy from Maven Central,
started with java).
With CI=true a broker or store that cannot be had is an error; on a laptop its tests are skipped.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import obstore
import pytest
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

from localkafka import BrokerError, LocalBroker, TopicSettings, ensure_topics
from localstore import CLIENT_PREFIX, SERVICE_PREFIX, LocalStore, LocalStoreError, store_env
from localstore.server import s3_store, short_error

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """Something a test needs is not there (a broker, a store, a tool): an error in CI, where
    make test installs and starts everything, a skip on a laptop."""
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


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
    missing(failure)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka: KafkaEndpoint) -> str:
    return kafka.bootstrap


def fresh_topics(bootstrap: str) -> TopicSettings:
    """New topics on ``bootstrap`` for one test alone, so tests never read each other's messages."""
    suffix = uuid.uuid4().hex[:10]
    settings = TopicSettings(
        requests=f"svd-requests-{suffix}",
        results=f"svd-results-{suffix}",
        dlq=f"svd-dlq-{suffix}",
    )
    asyncio.run(ensure_topics(bootstrap, settings))
    return settings


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicSettings:
    """Topics of this test alone on the session's broker."""
    return fresh_topics(kafka_bootstrap)


# -- the object store ------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectStoreEndpoint:
    """A bucket of a running S3-compatible store, and how to reach it."""

    endpoint: str  # e.g. http://127.0.0.1:41234
    bucket: str
    region: str
    access_key_id: str
    secret_access_key: str = field(repr=False)  # local throwaway; still kept out of reprs
    local: LocalStore | None  # None when the store is not ours to kill and start again

    def env_for(self, prefix: str) -> dict[str, str]:
        return store_env(
            prefix,
            endpoint=self.endpoint,
            bucket=self.bucket,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    @property
    def env(self) -> dict[str, str]:
        """SVD_STORE_*: the service's settings (pass to a consumer process's environment)."""
        return self.env_for(SERVICE_PREFIX)

    @property
    def client_env(self) -> dict[str, str]:
        """SVD_CLIENT_STORE_*: the SDK's settings."""
        return self.env_for(CLIENT_PREFIX)

    def client(self) -> S3Store:
        """An obstore client for the bucket (no retries: tests want the first answer)."""
        return s3_store(
            endpoint=self.endpoint,
            bucket=self.bucket,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    def count(self, prefix: str) -> int:
        """Objects whose key is under ``prefix``, taken as whole path segments: "req-1" counts
        req-1/a and req-1/b/c, not req-12/x."""
        return sum(len(chunk) for chunk in obstore.list(self.client(), prefix=prefix))


def _external_store(endpoint: str) -> ObjectStoreEndpoint:
    url = os.environ.get(f"{SERVICE_PREFIX}URL", "s3://svd-payloads")
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not url.startswith("s3://") or not bucket:
        raise ValueError(f"{SERVICE_PREFIX}URL={url!r}: expected s3://<bucket>")
    return ObjectStoreEndpoint(
        endpoint=endpoint,
        bucket=bucket,
        region=os.environ.get(f"{SERVICE_PREFIX}REGION", "us-east-1"),
        access_key_id=os.environ.get(f"{SERVICE_PREFIX}ACCESS_KEY_ID", ""),
        secret_access_key=os.environ.get(f"{SERVICE_PREFIX}SECRET_ACCESS_KEY", ""),
        local=None,
    )


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStoreEndpoint]:
    """The session's object store: ``.endpoint``, ``.bucket``, the credentials, ``.env``
    (SVD_STORE_*), ``.client_env`` (SVD_CLIENT_STORE_*), ``.client()``, ``.count(prefix)``;
    ``.local`` is the LocalStore (kill/start for outages) or None for an external store."""
    external = os.environ.get(f"{SERVICE_PREFIX}ENDPOINT")
    if external:
        # A store named explicitly that does not serve is a mistake to fix, never a skip.
        try:
            store = _external_store(external)
            next(iter(obstore.list(store.client(), chunk_size=1)), None)
        except (ValueError, ObstoreError, OSError) as exc:
            pytest.fail(
                f"{SERVICE_PREFIX}ENDPOINT={external} does not serve its bucket with the "
                f"{SERVICE_PREFIX}* credentials: {short_error(exc)}",
                pytrace=False,
            )
        yield store
        return
    local = LocalStore(workdir=tmp_path_factory.mktemp("store"))
    try:
        state = local.start(die_with_parent=True)
    except LocalStoreError as exc:
        failure = f"no object store: the local store could not start: {exc}"
    else:
        s = local.settings
        try:
            yield ObjectStoreEndpoint(
                endpoint=state.endpoint,
                bucket=s.bucket,
                region=s.region,
                access_key_id=s.access_key_id,
                secret_access_key=s.secret_access_key.get_secret_value(),
                local=local,
            )
        finally:
            local.destroy()
        return
    missing(failure)


@pytest.fixture
def count_store_objects(object_store: ObjectStoreEndpoint) -> Callable[[str], int]:
    """``count_store_objects(prefix)``: objects under ``prefix`` in the session's bucket, for
    leak checks (give each test its own prefix: the bucket is shared by the session)."""
    return object_store.count
