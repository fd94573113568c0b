"""Authenticated, encrypted Kafka against a real broker (docs/security.md).

A broker of this module's own (the session broker stays PLAINTEXT) with three more listeners:
SASL_PLAINTEXT and SASL_SSL offering SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN, and SSL requiring
a client certificate. Its CA, certificates and users are made here (localkafka.security).

- The right credentials work: the real consumer (``svd-consumer run``) and the SDK, each with
  its settings from env vars and secret files, get SVDs answered over every mechanism.
- Wrong ones fail fast with a clear error naming the mechanism and the user (never the
  password), and without a retry storm: the broker's own log counts the failed attempts.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localkafka import BrokerError, BrokerSettings, LocalBroker, TopicSettings, ensure_topics
from localkafka.broker import BrokerState
from localkafka.security import MTLS, SASL, SASL_SSL, SaslUser, TlsFiles, make_tls, secure_broker
from producer_sdk import AsyncSvdClient, ClientStartError
from tests.conftest import missing
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka

USER = SaslUser("alice", "alice-Pa55-word-3918")
KEY_PASSWORD = "client-key-Pa55-7702"
WRONG_PASSWORD = "wrong-Pa55-word-5521"
# Failed authentications one start may cost: aiokafka's bootstrap makes one connection per
# bootstrap server, the diagnosis one more. A retry loop would make dozens within seconds.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class SecureKafka:
    broker: LocalBroker
    state: BrokerState
    tls: TlsFiles
    rogue: TlsFiles  # another CA: neither side trusts the other's certificates
    secrets: Path  # secret files, as Docker or Kubernetes would mount them

    def log_offset(self) -> int:
        return self.broker.log_file.stat().st_size

    def failed_authentications(self, listener: str, since: int) -> int:
        """ "Failed authentication" lines the broker logged for ``listener`` after ``since``."""
        with self.broker.log_file.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        port = self.state.listeners[listener]
        return len(re.findall(rf"Failed authentication with .*channelId=[\d.]+:{port}-", text))


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    root = tmp_path_factory.mktemp("secure-kafka")
    tls = make_tls(root / "tls", client_key_password=KEY_PASSWORD)
    rogue = make_tls(root / "rogue-tls", client_name="mallory", client_key_password=KEY_PASSWORD)
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "sasl-password").write_text(USER.password + "\n")
    (secrets / "key-password").write_text(KEY_PASSWORD + "\n")
    (secrets / "wrong-password").write_text(WRONG_PASSWORD + "\n")
    broker = secure_broker(root / "broker", [USER], tls, settings=BrokerSettings(heap_mb=384))
    try:
        state = broker.start(die_with_parent=True)
    except BrokerError as exc:
        missing(f"the secured broker could not start: {exc}")
    try:
        yield SecureKafka(broker, state, tls, rogue, secrets)
    finally:
        broker.destroy()


async def fresh_topics(kafka: SecureKafka) -> TopicSettings:
    suffix = uuid.uuid4().hex[:10]
    topics = TopicSettings(
        requests=f"sec-requests-{suffix}", results=f"sec-results-{suffix}", dlq=f"sec-dlq-{suffix}"
    )
    await ensure_topics(kafka.state.bootstrap, topics)  # over PLAINTEXT: admin work
    return topics


# --- how a client connects: (listener, settings) with the same names for SVD_* and SVD_CLIENT_*


def sasl_case(kafka: SecureKafka, protocol: str, mechanism: str) -> tuple[str, dict[str, Any]]:
    settings: dict[str, Any] = {
        "security_protocol": protocol,
        "sasl_mechanism": mechanism,
        "sasl_username": USER.name,
        "sasl_password_file": kafka.secrets / "sasl-password",
    }
    if protocol == "SASL_SSL":
        settings["ssl_cafile"] = kafka.tls.ca_cert
    return (SASL_SSL if protocol == "SASL_SSL" else SASL), settings


def mtls_case(kafka: SecureKafka) -> tuple[str, dict[str, Any]]:
    return MTLS, {
        "security_protocol": "SSL",
        "ssl_cafile": kafka.tls.ca_cert,
        "ssl_certfile": kafka.tls.client_cert,
        "ssl_keyfile": kafka.tls.client_key,
        "ssl_key_password_file": kafka.secrets / "key-password",
    }


CASES: dict[str, Callable[[SecureKafka], tuple[str, dict[str, Any]]]] = {
    "SASL_PLAINTEXT-SCRAM-SHA-256": lambda k: sasl_case(k, "SASL_PLAINTEXT", "SCRAM-SHA-256"),
    "SASL_PLAINTEXT-SCRAM-SHA-512": lambda k: sasl_case(k, "SASL_PLAINTEXT", "SCRAM-SHA-512"),
    "SASL_PLAINTEXT-PLAIN": lambda k: sasl_case(k, "SASL_PLAINTEXT", "PLAIN"),
    "SASL_SSL-SCRAM-SHA-256": lambda k: sasl_case(k, "SASL_SSL", "SCRAM-SHA-256"),
    "SASL_SSL-SCRAM-SHA-512": lambda k: sasl_case(k, "SASL_SSL", "SCRAM-SHA-512"),
    "SASL_SSL-PLAIN": lambda k: sasl_case(k, "SASL_SSL", "PLAIN"),
    "SSL-mutual-TLS": mtls_case,
}


def start_service(
    kafka: SecureKafka, case: str, log_path: Path, topics: TopicSettings, **extra: str
) -> ServiceProcess:
    listener, settings = CASES[case](kafka)
    return ServiceProcess(
        kafka.state.bootstrap_for(listener), topics, log_path, pool_size=1, **settings, **extra
    ).start()


def sdk_client(
    kafka: SecureKafka, case: str, topics: TopicSettings, **extra: Any
) -> AsyncSvdClient:
    listener, settings = CASES[case](kafka)
    return AsyncSvdClient(
        bootstrap_servers=kafka.state.bootstrap_for(listener),
        requests_topic=topics.requests,
        results_topic=topics.results,
        start_timeout_s=20,
        **settings,
        **extra,
    )


async def round_trip(client: AsyncSvdClient) -> None:
    a = np.random.default_rng(5).standard_normal((6, 4))
    result = await client.svd(a, timeout=60)
    assert result.u is not None and result.vt is not None
    assert np.allclose(result.u * result.s @ result.vt, a)


def assert_no_secret_in(text: str) -> None:
    for secret in (USER.password, KEY_PASSWORD, WRONG_PASSWORD):
        assert secret not in text, "a secret reached the log"


# --- the right credentials work -------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    secure_kafka: SecureKafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TopicSettings]:
    """One consumer over SASL_SSL with SCRAM-SHA-512, the most common production setup, for
    the SDK tests below; any listener reaches the same topics."""
    topics = asyncio.run(fresh_topics(secure_kafka))
    log_path = tmp_path_factory.mktemp("served") / "svd-consumer.log"
    service = start_service(secure_kafka, "SASL_SSL-SCRAM-SHA-512", log_path, topics)
    try:
        service.wait_ready()
        yield topics
    finally:
        code = service.stop()
        assert_no_secret_in(service.log())
    assert code == 0, service.log()[-3000:]


@pytest.mark.parametrize("case", list(CASES))
async def test_the_sdk_gets_answers_over(
    secure_kafka: SecureKafka, served: TopicSettings, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")  # aiokafka's debug lines include every request sent, SASL ones too
    async with sdk_client(secure_kafka, case, served) as client:
        await round_trip(client)
    assert_no_secret_in(caplog.text)


@pytest.mark.parametrize("case", ["SSL-mutual-TLS", "SASL_PLAINTEXT-PLAIN"])
async def test_the_consumer_serves_over(
    secure_kafka: SecureKafka, case: str, tmp_path: Path
) -> None:
    # PLAIN at DEBUG: the mechanism whose bytes on the wire are the password itself.
    topics = await fresh_topics(secure_kafka)
    service = start_service(
        secure_kafka, case, tmp_path / "svd-consumer.log", topics, log_level="DEBUG"
    )
    try:
        await asyncio.to_thread(service.wait_ready)
        async with sdk_client(secure_kafka, case, topics) as client:
            await round_trip(client)
    finally:
        assert service.stop() == 0, service.log()[-3000:]
    assert_no_secret_in(service.log())


# --- wrong credentials fail fast, clearly, once ---------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    case: str
    overrides: Callable[[SecureKafka], dict[str, Any]]
    reason: str  # what the error must say
    broker_sees_it: bool = True  # False: the client refuses the broker before authenticating


REFUSALS = {
    "wrong password": Refusal(
        "SASL_PLAINTEXT-SCRAM-SHA-256",
        lambda k: {"sasl_password_file": k.secrets / "wrong-password"},
        "the broker rejected the credentials",
    ),
    "unknown user": Refusal(
        "SASL_SSL-PLAIN",
        lambda k: {"sasl_username": "mallory"},
        "the broker rejected the credentials",
    ),
    "no client certificate": Refusal(
        "SSL-mutual-TLS",
        lambda k: {"ssl_certfile": None, "ssl_keyfile": None, "ssl_key_password_file": None},
        "requires a client certificate it trusts",
    ),
    "client certificate from another CA": Refusal(
        "SSL-mutual-TLS",
        lambda k: {"ssl_certfile": k.rogue.client_cert, "ssl_keyfile": k.rogue.client_key},
        "requires a client certificate it trusts",
    ),
    "broker certificate not trusted": Refusal(
        "SASL_SSL-SCRAM-SHA-512",
        lambda k: {"ssl_cafile": k.rogue.ca_cert},
        "the broker's certificate is not trusted",
        broker_sees_it=False,
    ),
}


def refused_settings(kafka: SecureKafka, refusal: Refusal) -> tuple[str, dict[str, Any]]:
    listener, settings = CASES[refusal.case](kafka)
    settings = {**settings, **refusal.overrides(kafka)}
    return listener, {k: v for k, v in settings.items() if v is not None}


def wait_for_failed_authentications(kafka: SecureKafka, listener: str, since: int) -> int:
    """The broker logs a refusal a moment after the client sees it: wait for the first."""
    deadline = time.monotonic() + 10
    while (count := kafka.failed_authentications(listener, since)) == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"the broker logged no failed authentication on {listener}")
        time.sleep(0.05)
    return count


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=list(REFUSALS))
def test_the_consumer_exits_at_once_on(
    secure_kafka: SecureKafka, refusal: Refusal, tmp_path: Path
) -> None:
    listener, settings = refused_settings(secure_kafka, refusal)
    topics = asyncio.run(fresh_topics(secure_kafka))
    since = secure_kafka.log_offset()
    started = time.monotonic()
    service = ServiceProcess(
        secure_kafka.state.bootstrap_for(listener), topics, tmp_path / "svd-consumer.log",
        pool_size=1, log_level="DEBUG", **settings,
    ).start()  # fmt: skip
    assert service.proc is not None
    code = service.proc.wait(timeout=30)
    elapsed = time.monotonic() - started
    log = service.log()
    assert code == 1, log[-3000:]
    assert elapsed < 15, f"took {elapsed:.1f}s to give up"
    line = service.wait_for_log(r"CRITICAL consumer: cannot connect to Kafka at .*", 1).group(0)
    assert refusal.reason in line and "exiting without retrying" in line
    if "sasl_mechanism" in settings:
        mechanism, user = settings["sasl_mechanism"], settings["sasl_username"]
        assert f"{mechanism} as user {user!r}" in line
    assert_no_secret_in(log)  # at DEBUG, where aiokafka logs every request it sends
    if refusal.broker_sees_it:
        wait_for_failed_authentications(secure_kafka, listener, since)
    # The process is gone: nothing can try again after this count.
    assert secure_kafka.failed_authentications(listener, since) <= MAX_ATTEMPTS


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=list(REFUSALS))
async def test_the_sdk_start_fails_at_once_on(
    secure_kafka: SecureKafka, refusal: Refusal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    listener, settings = refused_settings(secure_kafka, refusal)
    topics = await fresh_topics(secure_kafka)
    since = secure_kafka.log_offset()
    client = AsyncSvdClient(
        bootstrap_servers=secure_kafka.state.bootstrap_for(listener),
        requests_topic=topics.requests,
        results_topic=topics.results,
        **settings,
    )
    started = time.monotonic()
    with pytest.raises(ClientStartError) as info:
        await client.start()
    elapsed = time.monotonic() - started
    error = info.value
    assert elapsed < 10, f"took {elapsed:.1f}s to give up"
    assert refusal.reason in error.message
    assert not error.retryable  # the same settings fail the same way: do not loop on them
    if "sasl_mechanism" in settings:
        assert (
            f"{settings['sasl_mechanism']} as user {settings['sasl_username']!r}" in error.message
        )
    assert_no_secret_in(f"{error!s} {error!r} {caplog.text}")
    # Nothing of the client is left running to try again (closed connections' read tasks may
    # still be finishing their cancellation).
    leftovers = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    if leftovers:
        _, running = await asyncio.wait(leftovers, timeout=5)
        assert not running, running
    if refusal.broker_sees_it:
        await asyncio.to_thread(wait_for_failed_authentications, secure_kafka, listener, since)
    assert secure_kafka.failed_authentications(listener, since) <= MAX_ATTEMPTS
