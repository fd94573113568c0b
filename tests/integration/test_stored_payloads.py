"""Stored payloads end to end: the SDK, the real service and a real S3-compatible store.

Inline and referenced requests side by side; the heavy matrices the issue names (2048 x 2048
and 3000 x 3000 full SVDs, which no record could carry) verified; references a service must
not follow, sent with a plain Kafka client; and the objects counted afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from localkafka import TopicSettings, ensure_topics
from producer_sdk import AsyncSvdClient, SvdInvalidRequest, SvdResult
from schemas import codec
from schemas.errors import ErrorCode
from tests.conftest import ObjectStoreEndpoint
from tests.support.kafka_io import AnswerReader, make_request, produce
from tests.support.scrape import Endpoint
from tests.support.service import ServiceProcess
from tests.support.stored import StorePrefix

pytestmark = pytest.mark.kafka

RNG = np.random.default_rng(2048)


class Served:
    def __init__(
        self, bootstrap: str, topics: TopicSettings, prefix: StorePrefix, service: ServiceProcess
    ) -> None:
        self.bootstrap, self.topics, self.prefix, self.service = bootstrap, topics, prefix, service

    def client(self, **overrides: Any) -> AsyncSvdClient:
        settings: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "requests_topic": self.topics.requests,
            "results_topic": self.topics.results,
            "store": self.prefix.client_settings(),
            "default_timeout_s": 300.0,
            **overrides,
        }
        return AsyncSvdClient(**settings)


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str,
    object_store: ObjectStoreEndpoint,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    suffix = uuid.uuid4().hex[:10]
    topics = TopicSettings(
        requests=f"stored-requests-{suffix}",
        results=f"stored-results-{suffix}",
        dlq=f"stored-dlq-{suffix}",
    )
    asyncio.run(ensure_topics(kafka_bootstrap, topics))
    prefix = StorePrefix.new(object_store)
    log = Path(tmp_path_factory.mktemp("stored")) / "svd-consumer.log"
    service = ServiceProcess(
        kafka_bootstrap, topics, log, extra_env=prefix.service_env, pool_size=2,
        task_timeout_s=600, max_inflight_bytes=1 << 30, metrics_port=-1,
    )  # fmt: skip
    with service:
        service.wait_ready()
        yield Served(kafka_bootstrap, topics, prefix, service)


def _reconstructs(a: np.ndarray[Any, Any], r: SvdResult) -> bool:
    assert r.u is not None and r.vt is not None
    k = r.s.size
    approx = (r.u[:, :k] * r.s) @ r.vt[:k]
    return bool(np.linalg.norm(approx - a) <= 1e-9 * np.linalg.norm(a) * max(a.shape))


def _orthonormal(q: np.ndarray[Any, Any]) -> bool:
    return bool(np.abs(q.T @ q - np.eye(q.shape[1])).max() < 1e-9 * q.shape[0])


async def test_inline_and_stored_requests_side_by_side_leave_no_object(served: Served) -> None:
    sizes = [(8, 8), (64, 48), (200, 200), (300, 300), (512, 400), (640, 640)]
    matrices = [RNG.standard_normal(shape) for shape in sizes for _ in range(3)]
    async with served.client() as client:
        results = await client.svd_many(matrices, concurrency=8)
    for a, r in zip(matrices, results, strict=True):
        assert _reconstructs(a, r)
        assert r.meta.schema_version == 2
    metrics = await Endpoint.of(served.service).scrape()
    stored = [a for a in matrices if a.nbytes > 512 * 1024]
    assert metrics["svd_stored_requests_total"] == len(stored)
    # Requests' objects go once committed, results' once the client read them.
    served.prefix.wait_count(0)


@pytest.mark.parametrize("n", [2048, 3000])
async def test_full_svds_no_record_could_carry_are_verified_end_to_end(
    served: Served, n: int
) -> None:
    a = RNG.standard_normal((n, n))
    async with served.client() as client:
        r = await client.svd(a, full_matrices=True)
    assert r.u is not None and r.vt is not None
    assert r.u.shape == (n, n) and r.vt.shape == (n, n)
    assert _reconstructs(a, r)
    assert _orthonormal(r.u) and _orthonormal(r.vt.T)
    assert np.allclose(r.s, np.linalg.svd(a, compute_uv=False), rtol=1e-9, atol=1e-9)
    served.prefix.wait_count(0)


async def test_an_inline_only_client_still_gets_what_a_record_can_carry(served: Served) -> None:
    a = RNG.standard_normal((300, 300))
    async with served.client(payloads="inline") as client:
        r = await client.svd(a)
        assert r.meta.schema_version == 1
        assert _reconstructs(a, r)
        # Factors no record can carry are refused before computing, as before version 2.
        with pytest.raises(SvdInvalidRequest) as caught:
            await client.svd(RNG.standard_normal((3000, 3000)), full_matrices=True)
    assert caught.value.code in (ErrorCode.LIMIT_EXCEEDED, ErrorCode.MESSAGE_TOO_LARGE)


async def test_references_the_service_must_not_follow_are_refused_and_dead_lettered(
    served: Served, object_store: ObjectStoreEndpoint
) -> None:
    prefix = served.prefix
    a = RNG.standard_normal((16, 16))
    template_id, good = prefix.stored_request(a)
    body = orjson.loads(good.value)
    obstore.delete(object_store.client(), f"{prefix.prefix}/requests/{template_id}")  # never sent
    cases: dict[str, dict[str, Any]] = {
        "other-bucket": {"url": f"s3://not-{object_store.bucket}/x"},
        "other-prefix": {"url": f"s3://{object_store.bucket}/elsewhere/x"},
        "dotdot": {"url": f"{prefix.url}/requests/../../x"},
        "http": {"url": "http://169.254.169.254/latest/meta-data/iam"},
        "file": {"url": "file:///etc/passwd"},
        "missing": {"url": f"{prefix.url}/requests/never-written"},
    }
    expected = {
        "missing": ErrorCode.OBJECT_NOT_FOUND,
    }
    messages = []
    names: dict[str, str] = {}
    for name, change in cases.items():
        request = {**body, "request_id": f"ref-{name}-{RNG.integers(1 << 30)}"}
        names[request["request_id"]] = name
        request["matrix"] = {**body["matrix"], "ref": {**body["matrix"]["ref"], **change}}
        messages.append((request["request_id"].encode(), orjson.dumps(request), list(good.headers)))
    # A matrix whose stored bytes are not finite: answered, and its object kept for the DLQ.
    bad = a.copy()
    bad[1, 2] = np.inf
    nan_id, nan_message = prefix.stored_request(a, data=bad.astype("<f8").tobytes())
    messages.append((nan_message.key, nan_message.value, list(nan_message.headers)))
    ids = {orjson.loads(value)["request_id"] for _, value, _ in messages}
    async with AnswerReader(served.bootstrap, served.topics) as reader:
        await produce(served.bootstrap, served.topics.requests, messages)
        answers = await reader.collect(ids, dead_letters=len(ids))
    codes = {rid: answers.errors[rid][0].code for rid in ids}
    for rid, code in codes.items():
        if rid == nan_id:
            want = ErrorCode.NON_FINITE
        else:
            want = expected.get(names[rid], ErrorCode.UNTRUSTED_REFERENCE)
        assert code == want, (rid, answers.errors[rid][0].message)
    assert not set(answers.results) & ids
    assert {dl.meta.request_id for dl in answers.dead_letters} >= ids
    # The failed request's object stays, for the dead letter's replay; the refused ones were
    # never read, so there is nothing else.
    assert prefix.keys("requests/") == [f"{prefix.prefix}/requests/{nan_id}"]
    kept = obstore.get(object_store.client(), f"{prefix.prefix}/requests/{nan_id}").bytes()
    assert (
        hashlib.sha256(kept).hexdigest()
        == orjson.loads(nan_message.value)["matrix"]["ref"]["sha256"]
    )


async def test_a_dead_letter_too_large_for_its_topic_references_its_whole_original(
    kafka_bootstrap: str, object_store: ObjectStoreEndpoint, tmp_path: Path
) -> None:
    # The dead-letter topic takes 256 KiB; the failing request is a 2 MiB binary matrix.
    suffix = uuid.uuid4().hex[:10]
    topics = TopicSettings(
        requests=f"dl-requests-{suffix}", results=f"dl-results-{suffix}", dlq=f"dl-dlq-{suffix}"
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(topics.requests, 1, 1, topic_configs={"max.message.bytes": str(64 << 20)}),
            NewTopic(topics.results, 1, 1, topic_configs={"max.message.bytes": str(64 << 20)}),
            NewTopic(topics.dlq, 1, 1, topic_configs={"max.message.bytes": str(256 << 10)}),
        ])  # fmt: skip
    finally:
        await admin.close()
    prefix = StorePrefix.new(object_store)
    a = RNG.standard_normal((512, 512))
    a[7, 9] = np.nan  # NON_FINITE: a failure, so a dead letter
    request_id, clean = make_request(np.zeros((512, 512)))
    poisoned = codec.EncodedMessage(clean.key, a.astype("<f8").tobytes(), list(clean.headers))
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log", extra_env=prefix.service_env, pool_size=1
    )
    async with AnswerReader(kafka_bootstrap, topics) as reader:
        with service:
            service.wait_ready()
            await produce(kafka_bootstrap, topics.requests, [poisoned])
            answers = await reader.collect({request_id}, dead_letters=1)
    assert answers.errors[request_id][0].code == ErrorCode.NON_FINITE
    (dead,) = answers.dead_letters
    assert dead.meta.truncated and dead.meta.value_bytes == len(poisoned.value)
    ref = dead.meta.original_ref
    assert ref is not None, "the dead letter does not reference its original"
    assert ref.url == f"{prefix.url}/dead-letters/{topics.requests}/0/0"
    kept = obstore.get(object_store.client(), ref.url.removeprefix(f"s3://{object_store.bucket}/"))
    data = bytes(kept.bytes())
    assert data == poisoned.value
    assert (len(data), hashlib.sha256(data).hexdigest()) == (ref.nbytes, ref.sha256)
