"""Per-request paths that need no broker: publish retries gate the offset; failures map to codes."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, UnsupportedCodecError
from aiokafka.structs import ConsumerRecord

from consumer.handler import RequestHandler, prepare
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.pool import TaskFailed
from consumer.publisher import Publisher
from consumer.reply_topics import ReplyTopics
from consumer.settings import ConsumerSettings
from consumer.unreadable import unreadable_record
from consumer.work import Computer
from consumer.worker import KIND_LINALG, KIND_OVERFLOW, JobFailure
from schemas import codec
from schemas.deadletter import read_dead_letter
from schemas.errors import ErrorCode
from schemas.limits import DecodeLimits
from schemas.models import ErrorResult
from tests.support.kafka_io import make_request

TP = TopicPartition("svd-requests", 0)


class FlakyProducer:
    """Fails the first ``failures`` sends, then acknowledges; records what was acknowledged."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or KafkaConnectionError("broker away")
        self.sent: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
        self.attempts = 0
        self.gate = asyncio.Event()  # successful sends wait here until the test opens it
        self.gate.set()
        self.waiting = asyncio.Event()

    async def send(
        self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> Any:
        self.attempts += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.attempts <= self.failures:
            future.set_exception(self.error)
        else:
            self.waiting.set()
            await self.gate.wait()
            self.sent.append((topic, value, headers))
            future.set_result(None)
        return future


class FailingPool:
    size = 1  # the micro-batcher sizes its batches in flight from it

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def run(self, job: Any, timeout: float | None = None) -> Any:
        raise self.error


def _record(message: codec.EncodedMessage, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=TP.topic, partition=TP.partition, offset=offset, timestamp=0, timestamp_type=0,
        key=message.key, value=message.value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(message.value), headers=tuple(message.headers),
    )  # fmt: skip


SETTINGS = ConsumerSettings(retry_backoff_s=0.0, shm_cache_bytes=0)


def _handler(producer: FlakyProducer, pool: Any, **options: Any) -> RequestHandler:
    # No segment cache: nothing here closes the Computer, so nothing may outlive a job.
    metrics = Metrics()
    publisher = Publisher(producer, backoff_s=0.0)  # type: ignore[arg-type]
    return RequestHandler(
        SETTINGS, Computer(SETTINGS, pool, metrics), publisher, metrics, **options
    )


def _reply_topics() -> ReplyTopics:
    """The default rules, in a cluster that has the results topic and svd-results.web-1."""

    async def topics() -> set[str]:
        return {"svd-results", "svd-results.web-1"}

    return ReplyTopics.from_settings(SETTINGS, topics)


async def test_the_offset_is_done_only_after_the_answer_is_acknowledged() -> None:
    producer = FlakyProducer(failures=3)
    request_id, message = make_request(np.ones((2, 2)), deadline_ms=1)  # expired: no pool needed
    record = _record(message)
    tracker = OffsetTracker()
    ledger = tracker.ledger(TP)
    ledger.begin(record.offset)
    handler = _handler(producer, FailingPool(AssertionError("must not compute")))
    producer.gate.clear()
    task = asyncio.create_task(handler.handle(prepare(record, DecodeLimits()), ledger))
    await asyncio.wait_for(producer.waiting.wait(), 10)  # three failures behind, ack not yet given
    assert tracker.to_commit() == {TP: 0}  # not acknowledged yet: nothing committable
    producer.gate.set()
    await asyncio.wait_for(task, 10)
    assert producer.attempts == 5  # 3 failures, then the error result and the dead letter
    assert tracker.to_commit() == {TP: 1}
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.EXPIRED
    assert error.request_id == request_id


async def test_a_lapack_failure_is_answered_svd_failed_without_retry() -> None:
    failure = JobFailure(kind=KIND_LINALG, error_type="LinAlgError", message="SVD did not converge",
                         retryable=False, traceback="")  # fmt: skip
    producer = FlakyProducer()
    _, message = make_request(np.ones((3, 3)))
    record = _record(message)
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    await _handler(producer, FailingPool(TaskFailed(failure, pid=1))).handle(
        prepare(record, DecodeLimits()), ledger
    )
    (error_msg, dead_msg) = producer.sent
    error = codec.decode_reply(error_msg[1], error_msg[2])
    assert (
        isinstance(error, ErrorResult)
        and error.code == ErrorCode.SVD_FAILED
        and not error.retryable
    )
    dead = read_dead_letter(dead_msg[1], dead_msg[2])
    assert dead.value == message.value and dead.meta.attempts == 1


async def test_an_answer_the_broker_refuses_for_size_becomes_an_error_result() -> None:
    class TooLargeOnce(FlakyProducer):
        async def send(self, topic: str, value: bytes, **kw: Any) -> Any:
            if not self.sent and self.attempts == 0:
                self.attempts += 1
                raise MessageSizeTooLargeError("too big")
            return await super().send(topic, value, **kw)

    producer = TooLargeOnce()
    _, message = make_request(np.ones((2, 2)), deadline_ms=1)  # its first publish is refused
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    await _handler(producer, FailingPool(AssertionError())).handle(
        prepare(_record(message), DecodeLimits()), ledger
    )
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.LIMIT_EXCEEDED
    assert ledger.commit_position() == 1


@pytest.mark.parametrize("value", [b"", b"{", b"\xff\xfe"])
def test_undecodable_records_are_priced_at_their_size(value: bytes) -> None:
    prepared = prepare(
        _record(codec.EncodedMessage(key=b"", value=value, headers=[])), DecodeLimits()
    )
    assert prepared.rejection is not None and prepared.cost == len(value)


def _begun(offset: int = 0) -> Any:
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(offset)
    return ledger


async def test_a_dead_letter_refused_for_size_is_written_cut_down_never_answered_twice() -> None:
    class SmallDlq(FlakyProducer):
        async def send(self, topic: str, value: bytes, **kw: Any) -> Any:
            if topic == "svd-dlq" and len(value) > 100_000:
                raise MessageSizeTooLargeError("too big for svd-dlq")
            return await super().send(topic, value, **kw)

    producer = SmallDlq()
    value = b'{"request_id": "big-1", "pad": "' + b"x" * 500_000 + b'"'  # truncated JSON
    record = _record(codec.EncodedMessage(key=b"big-1", value=value, headers=[]))
    ledger = _begun()
    await _handler(producer, FailingPool(AssertionError())).handle(
        prepare(record, DecodeLimits()), ledger
    )
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.INVALID_ENCODING
    dead = read_dead_letter(producer.sent[1][1], producer.sent[1][2])
    assert dead.meta.truncated and dead.meta.value_bytes == len(value)
    assert 0 < len(dead.value) < len(value) and value.startswith(dead.value)
    assert dead.meta.request_id == "big-1" and ledger.commit_position() == 1


async def test_an_unexpected_failure_is_retried_then_answered_internal_and_moves_on() -> None:
    producer = FlakyProducer()
    request_id, message = make_request(np.ones((3, 3)))
    ledger = _begun()
    handler = _handler(producer, FailingPool(RuntimeError("a bug")))
    await handler.handle(prepare(_record(message), DecodeLimits()), ledger)
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.INTERNAL
    assert error.request_id == request_id and error.retryable
    dead = read_dead_letter(producer.sent[1][1], producer.sent[1][2])
    assert dead.meta.code == ErrorCode.INTERNAL and dead.meta.attempts == 3
    assert ledger.commit_position() == 1
    assert handler._metrics.unexpected_failures._value.get() == 3


async def test_factors_that_overflow_are_answered_result_overflow() -> None:
    failure = JobFailure(kind=KIND_OVERFLOW, error_type="FactorOverflow", message="inf",
                         retryable=False, traceback="")  # fmt: skip
    producer = FlakyProducer()
    _, message = make_request(np.full((4, 4), 1e308))
    await _handler(producer, FailingPool(TaskFailed(failure, pid=1))).handle(
        prepare(_record(message), DecodeLimits()), _begun()
    )
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.RESULT_OVERFLOW
    assert not error.retryable
    assert read_dead_letter(producer.sent[1][1], producer.sent[1][2]).meta.attempts == 1


@pytest.mark.parametrize("encoding", list(codec.Encoding))
def test_a_json_result_that_may_not_fit_is_refused_before_compute(
    encoding: codec.Encoding,
) -> None:
    # 400 x 400 full SVD: 320,400 float64 numbers, 2.6 MB in binary, up to 8 MB as JSON.
    limits = DecodeLimits(max_result_bytes=4 << 20)
    _, message = make_request(np.ones((400, 400)), encoding=encoding)
    prepared = prepare(_record(message), limits)
    if encoding is codec.Encoding.JSON:
        assert prepared.rejection is not None
        assert prepared.rejection.code == ErrorCode.LIMIT_EXCEEDED
        assert "result_encoding binary" in prepared.rejection.message
    else:
        assert prepared.rejection is None


async def test_an_unreadable_record_gets_a_dead_letter_only() -> None:
    producer = FlakyProducer()
    record = unreadable_record(TP, 7, UnsupportedCodecError("no zstd"))
    ledger = _begun(7)
    await _handler(producer, FailingPool(AssertionError())).handle(
        prepare(record, DecodeLimits()), ledger
    )
    [(topic, value, headers)] = producer.sent
    dead = read_dead_letter(value, headers)
    assert topic == "svd-dlq" and dead.value == b"" and dead.original_headers == []
    assert dead.meta.code == ErrorCode.UNREADABLE_RECORD and dead.meta.source_offset == 7
    assert dead.meta.truncated and dead.meta.value_bytes is None and dead.meta.request_id is None
    assert ledger.commit_position() == 8


async def test_an_error_never_goes_to_a_reply_topic_that_was_not_checked() -> None:
    producer = FlakyProducer()
    # Expired (refused before compute), naming the requests topic as its reply topic.
    _, message = make_request(np.ones((2, 2)), deadline_ms=1, reply_topic="svd-requests")
    await _handler(producer, FailingPool(AssertionError())).handle(
        prepare(_record(message), DecodeLimits()), _begun()
    )
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.INVALID_SCHEMA


async def test_an_error_goes_to_an_allowed_reply_topic() -> None:
    producer = FlakyProducer()
    handler = _handler(producer, FailingPool(AssertionError()), reply_topics=_reply_topics())
    _, message = make_request(np.ones((2, 2)), deadline_ms=1, reply_topic="svd-results.web-1")
    await handler.handle(prepare(_record(message), DecodeLimits()), _begun())
    assert [topic for topic, _, _ in producer.sent] == ["svd-results.web-1", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.EXPIRED


@pytest.mark.parametrize(("value", "refused"), [(1e39, True), (3e38, False), (-1e39, True)])
def test_float64_input_beyond_float32_is_refused_when_computed_in_float32(
    value: float, refused: bool
) -> None:
    matrix = np.ones((3, 3))
    matrix[1, 2] = value
    _, message = make_request(matrix, options={"dtype": "float32"})
    prepared = prepare(_record(message), DecodeLimits())
    if refused:
        assert prepared.rejection is not None
        assert prepared.rejection.code == ErrorCode.NON_FINITE
    else:
        assert prepared.rejection is None


async def test_a_dead_letter_is_sized_to_its_topic_when_the_cluster_said_what_it_takes() -> None:
    producer = FlakyProducer()
    limits = {"svd-dlq": 100_000, "svd-results": 64 << 20}
    handler = _handler(producer, FailingPool(AssertionError()), topic_limits=limits)
    value = b'{"request_id": "sized-1", "pad": "' + b"x" * 500_000 + b'"'
    record = _record(codec.EncodedMessage(key=b"sized-1", value=value, headers=[]))
    await handler.handle(prepare(record, DecodeLimits()), _begun())
    assert producer.attempts == 2  # the error result, and the dead letter once: never refused
    (dlq,) = [(v, h) for topic, v, h in producer.sent if topic == "svd-dlq"]
    dead = read_dead_letter(*dlq)
    assert dead.meta.truncated and dead.meta.value_bytes == len(value)
    assert codec.EncodedMessage(key=b"sized-1", value=dlq[0], headers=dlq[1]).size <= 100_000


async def test_an_error_for_a_request_that_did_not_decode_goes_to_its_allowed_reply_topic() -> None:
    producer = FlakyProducer()
    handler = _handler(producer, FailingPool(AssertionError()), reply_topics=_reply_topics())
    for reply_topic, expected in (("svd-results.web-1", "svd-results.web-1"),
                                  ("svd-requests", "svd-results")):  # fmt: skip
        value = (
            b'{"schema_version": 1, "request_id": "nan-1", "reply_topic": "%s", "matrix": '
            b'{"shape": [1, 2], "dtype": "float64", "data": [1, NaN]}}' % reply_topic.encode()
        )
        producer.sent.clear()
        record = _record(codec.EncodedMessage(key=b"nan-1", value=value, headers=[]))
        await handler.handle(prepare(record, DecodeLimits()), _begun())
        assert [topic for topic, _, _ in producer.sent] == [expected, "svd-dlq"]
        error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
        assert isinstance(error, ErrorResult) and error.code == ErrorCode.NON_FINITE
