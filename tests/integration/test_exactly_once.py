"""exactly_once mode: read_committed readers see every answer once, whatever is killed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from consumer.admission import TEST_FAULT_HEADER
from localkafka import TopicSettings
from schemas import codec
from tests.support.kafka_io import AnswerReader, Answers, make_request, produce
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka

EOS = {
    "processing_guarantee": "exactly_once",
    "enable_test_faults": "true",
    "retry_backoff_s": 0.05,
}


def _requests(
    count: int, seed: int, size: int = 120
) -> tuple[set[str], list[codec.EncodedMessage]]:
    rng = np.random.default_rng(seed)
    ids, messages = set(), []
    for i in range(count):
        request_id, message = make_request(rng.standard_normal((size, size)))
        if i % 25 == 0:  # a worker SIGKILLed mid-task now and then: retried inside the mode
            message = codec.EncodedMessage(
                key=message.key,
                value=message.value,
                headers=[*message.headers, (TEST_FAULT_HEADER, b"kill_once")],
            )
        ids.add(request_id)
        messages.append(message)
    return ids, messages


def _instances(answers: Answers) -> set[str]:
    """The service instances that answered."""
    return {r.meta.worker.instance_id for rs in answers.results.values() for r in rs}


def _poison(count: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [
        (f"poison-{i}".encode(), b"\x00garbage", [("content-type", b"application/json")])
        for i in range(count)
    ]


async def test_consumer_sigkill_mid_stream_gives_no_duplicates_to_read_committed_readers(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    ids, messages = _requests(150, seed=11)
    await produce(kafka_bootstrap, topics.requests, messages[:75])
    await produce(kafka_bootstrap, topics.requests, _poison(5))
    await produce(kafka_bootstrap, topics.requests, messages[75:])
    settings = {**EOS, "pool_size": 2, "max_inflight": 8, "group_id": f"g-{topics.requests}"}
    async with AnswerReader(kafka_bootstrap, topics, isolation_level="read_committed") as reader:
        first = ServiceProcess(kafka_bootstrap, topics, tmp_path / "first.log", **settings).start()
        first.wait_for_log("transactional producers ready")
        while len(reader.answers.answered()) < 30:
            await reader.poll()
        first.kill()
        with ServiceProcess(kafka_bootstrap, topics, tmp_path / "second.log", **settings):
            await reader.collect(ids, timeout=180, dead_letters=5)
        answers = await reader.read_to_end()
    report = answers.report(len(ids), ids)
    print(f"exactly_once, consumer SIGKILL: {report}")
    assert ids <= answers.answered(), report
    assert answers.duplicates() == 0, report
    assert len(answers.dead_letters) == 5, report  # dead letters are in the transactions too


async def test_a_member_killed_during_a_rebalance_gives_no_duplicates(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    ids, messages = _requests(160, seed=12)
    # A first part for a alone; the rest once b has joined, so both members have work whatever
    # a's speed (a alone could otherwise answer everything before b commits anything).
    await produce(kafka_bootstrap, topics.requests, messages[:40])
    settings = {**EOS, "pool_size": 1, "max_inflight": 4, "group_id": f"g-{topics.requests}"}
    async with AnswerReader(kafka_bootstrap, topics, isolation_level="read_committed") as reader:
        with ServiceProcess(
            kafka_bootstrap, topics, tmp_path / "a.log", instance_id="a", **settings
        ) as a:
            while len(reader.answers.answered()) < 20:
                await reader.poll()
            b = ServiceProcess(
                kafka_bootstrap, topics, tmp_path / "b.log", instance_id="b", **settings
            ).start()
            b.wait_for_log("transactional producers ready")  # b joined and took partitions
            await produce(kafka_bootstrap, topics.requests, messages[40:])
            deadline = time.monotonic() + 120
            while "b" not in _instances(reader.answers):  # b committed answers of its own
                assert time.monotonic() < deadline, "b committed no answer within 120 s"
                await reader.poll()
            b.kill()  # b's open transactions are aborted when a takes its partitions back
            await reader.collect(ids, timeout=180)
            assert "fenced" not in a.log()
        answers = await reader.read_to_end()
    report = answers.report(len(ids), ids)
    print(f"exactly_once, rebalance with a hard kill: {report}")
    assert answers.duplicates() == 0, report
    assert _instances(answers) == {"a", "b"}
