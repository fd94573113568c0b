"""The SDK against the real broker and the real consumer service (``svd-consumer run``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from localkafka import ensure_topics
from producer_sdk import (
    AsyncSvdClient,
    ClientStartError,
    ResultsListener,
    SvdClient,
    SvdExpired,
    SvdResult,
    SvdTimeout,
)
from schemas import codec
from schemas.models import SvdResultMeta, Timings, WorkerInfo
from tests.sdk_contract.conftest import ServedTopics, start_service
from tests.sdk_contract.waiting import wait_until
from tests.support.kafka_io import AnswerReader, make_request

pytestmark = pytest.mark.kafka

RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedTopics]:
    yield from start_service(kafka_bootstrap, tmp_path_factory.mktemp("svc"), pool_size=2)


def client_for(served: ServedTopics, **overrides: Any) -> AsyncSvdClient:
    settings: dict[str, Any] = {
        "bootstrap_servers": served.bootstrap,
        "requests_topic": served.topics.requests,
        "results_topic": served.topics.results,
        **overrides,
    }
    return AsyncSvdClient(**settings)


def reconstructs(a: np.ndarray[Any, Any], result: SvdResult) -> bool:
    assert result.u is not None and result.vt is not None
    tol = 1e-3 if a.dtype == np.float32 else 1e-9
    return bool(np.linalg.norm(result.u * result.s @ result.vt - a) <= tol * np.linalg.norm(a))


async def test_1000_concurrent_requests_from_one_client_all_resolve(served: ServedTopics) -> None:
    mats = [RNG.standard_normal((8, 6)) for _ in range(1000)]
    async with client_for(served) as client:
        results = await asyncio.gather(*(client.svd(m, timeout=240) for m in mats))
        stats = client.stats()
    assert all(reconstructs(m, r) for m, r in zip(mats, results, strict=True))
    assert len({r.request_id for r in results}) == 1000
    assert stats.resolved == 1000 and stats.pending == 0


async def test_two_clients_at_once_each_get_only_their_own_answers(served: ServedTopics) -> None:
    a_mats = [RNG.standard_normal((6, 5)) for _ in range(200)]
    b_mats = [RNG.standard_normal((7, 4)).astype(np.float32) for _ in range(200)]
    async with client_for(served) as a, client_for(served) as b:
        a_results, b_results = await asyncio.gather(
            asyncio.gather(*(a.svd(m, timeout=180) for m in a_mats)),
            asyncio.gather(*(b.svd(m, timeout=180) for m in b_mats)),
        )
        # Both read the one shared results topic: each saw the other's 200 answers and dropped them.
        await wait_until(
            lambda: a.stats().unknown >= 200 and b.stats().unknown >= 200, 30, "cross answers seen"
        )
        a_stats, b_stats = a.stats(), b.stats()
    assert all(reconstructs(m, r) for m, r in zip(a_mats, a_results, strict=True))
    assert all(reconstructs(m, r) for m, r in zip(b_mats, b_results, strict=True))
    assert {r.s.dtype for r in b_results} == {np.dtype(np.float32)}
    assert a_stats.resolved == 200 and b_stats.resolved == 200


async def test_a_16_mb_binary_round_trip(served: ServedTopics) -> None:
    a = RNG.standard_normal((1024, 1024))  # 8 MiB in, U + S + Vt ~16 MiB out
    async with client_for(served) as client:
        result = await client.svd(a, timeout=180)
    assert reconstructs(a, result)


async def test_the_deadline_travels_and_an_expired_answer_arriving_late_is_dropped(
    served: ServedTopics,
) -> None:
    async with (
        ResultsListener(
            bootstrap_servers=served.bootstrap, results_topic=served.topics.results
        ) as listener,
        client_for(served) as client,
    ):
        handle = await client.submit(np.eye(3), timeout=0.001)
        with pytest.raises(SvdTimeout):
            await handle
        assert client.stats().pending == 0
        # The service saw the deadline had passed, answered EXPIRED without computing, and the
        # client dropped that answer as late.
        await wait_until(lambda: client.stats().late == 1, 60, "the late answer counted")
        async with asyncio.timeout(60):
            async for item in listener:
                if item.request_id == handle.request_id:
                    break
        assert isinstance(item, SvdExpired)
        stats = client.stats()
    assert stats.pending == 0 and stats.expired == 1 and stats.resolved == 0


async def test_every_request_carries_its_deadline_and_creation_time(
    kafka_bootstrap: str, served: ServedTopics
) -> None:
    requests_topic = f"sdk-requests-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, served.topics, extra={requests_topic: 1})
    async with client_for(served, requests_topic=requests_topic) as client:
        handle = await client.submit(np.eye(2), timeout=7.5)
        handle.cancel()
    reader = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(requests_topic, 0)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        record = await asyncio.wait_for(reader.getone(), 30)
    finally:
        await reader.stop()
    decoded = codec.decode_request(record.value, list(record.headers))
    assert record.key == handle.request_id.encode()
    assert decoded.encoding is codec.Encoding.BINARY  # the default
    meta = decoded.meta
    assert meta.request_id == handle.request_id
    assert meta.created_at_ms is not None and meta.deadline_ms == handle.deadline_ms
    assert meta.deadline_ms - meta.created_at_ms == 7500


async def test_a_client_with_its_own_reply_topic(served: ServedTopics) -> None:
    # `<results topic>.<suffix>`: the names the service answers on by default.
    reply_topic = f"{served.topics.results}.sdk-{uuid.uuid4().hex[:8]}"
    a = RNG.standard_normal((9, 9))
    async with (
        client_for(served) as shared,
        client_for(served, reply_topic=reply_topic, create_reply_topic=True) as own,
    ):
        result = await own.svd(a, timeout=60)
        marker = await shared.svd(np.eye(2), timeout=60)  # answered after `result` was
        shared_stats = shared.stats()
    assert reconstructs(a, result)
    assert marker.s.tolist() == [1.0, 1.0]
    # The shared results topic never carried the reply-topic client's answer.
    assert shared_stats.unknown == 0


async def test_a_reply_topic_created_right_after_the_service_listed_topics_is_answered(
    served: ServedTopics,
) -> None:
    # The race of issue #19: the service had just listed the topics (to refuse a name that does
    # not exist), then a client creates its reply topic and sends at once. Its answers must go
    # to that topic, never "does not exist" on the shared one it does not read.
    for attempt in range(3):
        nowhere_id, nowhere = make_request(
            np.eye(2), reply_topic=f"{served.topics.results}.nowhere-{uuid.uuid4().hex[:8]}"
        )
        async with AnswerReader(served.bootstrap, served.topics) as reader:
            await _produce(served.bootstrap, served.topics.requests, [nowhere])
            answers = await reader.collect({nowhere_id}, timeout=60)
        # Answered "does not exist": the service has just listed the topics.
        assert "does not exist" in answers.errors[nowhere_id][0].message
        reply_topic = f"{served.topics.results}.race-{attempt}-{uuid.uuid4().hex[:8]}"
        async with client_for(served, reply_topic=reply_topic, create_reply_topic=True) as own:
            a = RNG.standard_normal((5, 5))
            assert reconstructs(a, await own.svd(a, timeout=60)), attempt


async def test_duplicate_answers_resolve_once(served: ServedTopics) -> None:
    async with client_for(served, requests_topic=served.unserved_requests) as client:
        handle = await client.submit(np.eye(2), timeout=60)
        reply = _fake_result(handle.request_id)
        await _produce(served.bootstrap, served.topics.results, [reply, reply, reply])
        result = await handle
        await wait_until(lambda: client.stats().duplicates == 2, 30, "two duplicates counted")
        stats = client.stats()
    assert result.request_id == handle.request_id
    assert stats.resolved == 1 and stats.pending == 0


async def test_partitions_added_to_the_answers_topic_are_followed(served: ServedTopics) -> None:
    topic = f"sdk-growing-{uuid.uuid4().hex[:8]}"
    await ensure_topics(served.bootstrap, served.topics, extra={topic: 1})
    async with client_for(
        served,
        requests_topic=served.unserved_requests,
        results_topic=topic,
        metadata_max_age_s=0.5,
    ) as client:
        handle = await client.submit(np.eye(2), timeout=60)
        admin = AIOKafkaAdminClient(bootstrap_servers=served.bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=3)})
        finally:
            await admin.close()
        await _produce(served.bootstrap, topic, [_fake_result(handle.request_id)], partition=2)
        result = await handle
    assert result.request_id == handle.request_id


async def test_start_fails_clearly_when_the_answers_topic_is_missing(served: ServedTopics) -> None:
    client = client_for(served, results_topic=f"no-such-topic-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ClientStartError, match="does not exist"):
        await client.start()
    assert client.closed


async def test_listener_in_a_group_resumes_after_what_it_processed(served: ServedTopics) -> None:
    group = f"sdk-listener-{uuid.uuid4().hex[:8]}"
    settings = {"bootstrap_servers": served.bootstrap, "results_topic": served.topics.results}
    async with client_for(served) as client:
        # Join the group first so "latest" is before our requests.
        async with ResultsListener(group_id=group, **settings) as first:
            await _until_assigned(first)
            handles = [await client.submit(np.eye(2) * (i + 1), timeout=60) for i in range(4)]
            ids = [h.request_id for h in handles]
            await asyncio.gather(*handles)
            seen: list[str] = []
            async with asyncio.timeout(60):
                async for item in first:
                    if item.request_id in ids:
                        seen.append(item.request_id)
                    if len(seen) == 2:
                        break
        # The second item was yielded but not followed by another request for the next one,
        # so it counts as processed only at close: the next member starts after it.
        async with ResultsListener(group_id=group, **settings) as second:
            rest: list[str] = []
            async with asyncio.timeout(60):
                async for item in second:
                    if item.request_id in ids:
                        rest.append(item.request_id)
                    if len(seen) + len(rest) == 4:
                        break
    assert sorted(seen + rest) == sorted(ids)
    assert not set(seen) & set(rest)


def test_sync_client_from_many_threads(served: ServedTopics) -> None:
    mats = [RNG.standard_normal((5, 5)) for _ in range(64)]
    with SvdClient(
        bootstrap_servers=served.bootstrap,
        requests_topic=served.topics.requests,
        results_topic=served.topics.results,
    ) as client:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda m: client.svd(m, timeout=60), mats))
        futures = [client.submit(m, timeout=60) for m in mats[:8]]
        submitted = [f.result(90) for f in futures]
        assert client.stats().pending == 0
    assert all(reconstructs(m, r) for m, r in zip(mats, results, strict=True))
    assert all(reconstructs(m, r) for m, r in zip(mats, submitted, strict=False))
    assert not [t for t in threading.enumerate() if t.name.endswith("-loop") and t.is_alive()]


# -- helpers ----------------------------------------------------------------------------------


def _fake_result(request_id: str) -> codec.EncodedMessage:
    """A result as the service would send it, for tests that play the service's part."""
    meta = SvdResultMeta(
        request_id=request_id,
        timings=Timings(queue_wait_ms=0.0, compute_ms=0.0, total_ms=0.0),
        worker=WorkerInfo(instance_id="test", host="test", pid=1),
    )
    u, s, vt = np.linalg.svd(np.eye(2))
    return codec.encode_result(meta, u, s, vt, codec.Encoding.BINARY)


async def _produce(
    bootstrap: str, topic: str, messages: list[codec.EncodedMessage], partition: int | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for m in messages:
            await producer.send_and_wait(
                topic, m.value, key=m.key, headers=m.headers, partition=partition
            )
    finally:
        await producer.stop()


async def _until_assigned(listener: ResultsListener) -> None:
    consumer = listener._group
    assert consumer is not None
    condition: Callable[[], bool] = lambda: bool(consumer.assignment())  # noqa: E731
    fetch: Callable[[], Awaitable[Any]] = lambda: consumer.getmany(timeout_ms=100)  # noqa: E731
    deadline = asyncio.get_running_loop().time() + 60
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the listener got no partitions"
        # getmany drives the group join; records fetched here are not the test's (none yet).
        for records in (await fetch()).values():
            assert not records
