"""The consumer service against the real broker: correct answers, backpressure, groups, SIGTERM."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from localkafka import TopicSettings
from schemas import codec
from tests.support.kafka_io import AnswerReader, assert_factorization, make_request, produce
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka


def _mixed_requests(count: int, seed: int) -> dict[str, tuple[np.ndarray, codec.EncodedMessage]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        m, n = (int(x) for x in rng.integers(1, 48, size=2))
        dtype = np.float32 if i % 3 == 0 else np.float64
        matrix = rng.standard_normal((m, n)).astype(dtype)
        encoding = codec.Encoding.JSON if i % 2 else codec.Encoding.BINARY
        request_id, message = make_request(matrix, encoding=encoding)
        out[request_id] = (matrix, message)
    return out


async def test_a_few_hundred_requests_are_answered_with_correct_factors(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    requests = _mixed_requests(300, seed=1)
    await produce(kafka_bootstrap, topics.requests, (m for _, m in requests.values()))
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", pool_size=2):
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect(set(requests), timeout=180)
    assert not answers.errors, answers.errors
    for request_id, (matrix, message) in requests.items():
        (result,) = answers.results[request_id]
        assert result.s.dtype == matrix.dtype
        wanted = (
            codec.Encoding.JSON
            if b"json" in dict(message.headers)["content-type"]
            else codec.Encoding.BINARY
        )
        assert result.encoding is wanted  # answered in the request's encoding
        assert_factorization(matrix, result)


async def test_options_values_only_top_k_and_reply_topic(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    from localkafka import ensure_topics

    reply_topic = f"{topics.results}.replies"  # allowed by default: `<results topic>.<suffix>`
    await ensure_topics(kafka_bootstrap, topics, extra={reply_topic: 1})
    matrix = np.random.default_rng(2).standard_normal((40, 30))
    values_id, values_only = make_request(matrix, options={"compute_uv": False})
    topk_id, top_k = make_request(matrix, options={"k": 5, "quality": True})
    routed_id, routed = make_request(matrix, reply_topic=reply_topic, encoding=codec.Encoding.JSON)
    await produce(kafka_bootstrap, topics.requests, [values_only, top_k, routed])
    expected = np.linalg.svd(matrix, compute_uv=False)
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", pool_size=1):
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect({values_id, topk_id}, timeout=120)
        replies = TopicSettings(requests=topics.requests, results=reply_topic, dlq=topics.dlq)
        async with AnswerReader(kafka_bootstrap, replies) as reader:
            routed_answers = await reader.collect({routed_id}, timeout=120)
    (values,) = answers.results[values_id]
    assert values.u is None and values.vt is None
    np.testing.assert_allclose(values.s, expected, rtol=1e-10)
    (topk,) = answers.results[topk_id]
    assert (
        topk.u is not None
        and topk.u.shape == (40, 5)
        and topk.vt is not None
        and topk.vt.shape == (5, 30)
    )
    np.testing.assert_allclose(topk.s, expected[:5], rtol=1e-10)
    assert topk.meta.quality is not None and topk.meta.quality.reconstruction_error < 1.0
    assert routed_id in routed_answers.results


async def test_a_backlog_pauses_and_resumes_within_the_budget(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    matrices = [rng.standard_normal((160, 160)) for _ in range(80)]
    ids = set()
    messages = []
    for matrix in matrices:
        request_id, message = make_request(matrix)
        ids.add(request_id)
        messages.append(message)
    await produce(kafka_bootstrap, topics.requests, messages)
    budget_bytes = 2 * 1024 * 1024  # a 160x160 request costs ~1 MB: about two fit
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log",
        pool_size=1, max_inflight=3, max_inflight_bytes=budget_bytes,
        # Records that do not fit are held while answers keep coming; the service pauses when
        # none comes within a poll. A short poll makes that happen between these quick SVDs.
        poll_timeout_s=0.005,
    )  # fmt: skip
    with service:
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect(ids, timeout=180)
        service.wait_for_log("pausing")
        service.wait_for_log("resuming")
    summary = service.wait_for_log(r"peak in flight (\d+)/(\d+) requests, (\d+)/(\d+) bytes")
    peak_requests, limit_requests, peak_bytes, limit_bytes = map(int, summary.groups())
    assert limit_requests == 3 and limit_bytes == budget_bytes
    assert 1 <= peak_requests <= 3
    assert peak_bytes <= budget_bytes
    assert len(answers.results) == len(ids) and answers.duplicates() == 0


async def test_two_consumers_in_one_group_share_the_partitions(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    group = f"g-{topics.requests}"
    first = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "a.log", group_id=group, pool_size=1, instance_id="a"
    )
    second = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "b.log", group_id=group, pool_size=1, instance_id="b"
    )
    with first, second:
        # Both members hold partitions once the second join has settled.
        _wait_until(
            lambda: _owned(first) and _owned(second) and not (_owned(first) & _owned(second)), 60
        )
        requests = _mixed_requests(200, seed=4)
        await produce(kafka_bootstrap, topics.requests, (m for _, m in requests.values()))
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect(set(requests), timeout=180)
    assert _owned(first) | _owned(second) == set(range(topics.requests_partitions))
    instances = {r.meta.worker.instance_id for rs in answers.results.values() for r in rs}
    assert instances == {"a", "b"}


async def test_sigterm_mid_stream_drains_and_a_restart_answers_nothing_twice(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    ids, messages = set(), []
    for _ in range(150):
        request_id, message = make_request(rng.standard_normal((120, 120)))
        ids.add(request_id)
        messages.append(message)
    await produce(kafka_bootstrap, topics.requests, messages)
    settings = {"pool_size": 2, "max_inflight": 8, "group_id": f"g-{topics.requests}"}
    async with AnswerReader(kafka_bootstrap, topics) as reader:
        first = ServiceProcess(kafka_bootstrap, topics, tmp_path / "first.log", **settings).start()
        while len(reader.answers.answered()) < 20:
            await reader.poll()
        assert first.stop(timeout=60) == 0
        drained = first.wait_for_log(r"in flight at stop (\d+), drained (\d+), cancelled (\d+)")
        assert drained.group(1) == drained.group(2) and drained.group(3) == "0"
        with ServiceProcess(kafka_bootstrap, topics, tmp_path / "second.log", **settings):
            await reader.collect(ids, timeout=180)
        answers = await reader.read_to_end()
    assert ids <= answers.answered()
    assert answers.duplicates() == 0, answers.report(len(ids), ids)


def _owned(service: ServiceProcess) -> set[int]:
    """Partitions of the latest assignment in the service's log, minus later revocations."""
    owned: set[int] = set()
    for kind, parts in re.findall(
        r"consumer\.service: (assigned|revoked) \[([^\]]*)\]", service.log()
    ):
        partitions = {int(p.rsplit("-", 1)[1].strip("'")) for p in parts.split(",") if p.strip()}
        owned = owned | partitions if kind == "assigned" else owned - partitions
    return owned


def _wait_until(condition: object, timeout: float) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)
