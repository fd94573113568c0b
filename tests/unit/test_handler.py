"""Per-request paths that need no broker: publish retries gate the offset; failures map to codes."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, UnsupportedCodecError
from aiokafka.structs import ConsumerRecord

from consumer import compute, worker
from consumer.admission import Ticket, price
from consumer.dispatch import Dispatcher, limits_from
from consumer.flow import Budget, InFlight
from consumer.handler import RequestHandler
from consumer.jobs import KIND_INTERNAL, KIND_RESOURCES, JobFailure
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.pool import TaskFailed, TaskTimeout, WorkerCrashed
from consumer.publisher import Publisher
from consumer.reply_topics import ReplyTopics
from consumer.settings import ConsumerSettings
from consumer.shm import ShmAllocationError
from consumer.unreadable import unreadable_record
from schemas import codec
from schemas.deadletter import read_dead_letter
from schemas.errors import ErrorCode
from schemas.models import ErrorResult
from tests.support.kafka_io import make_request

pytestmark = pytest.mark.usefixtures("no_leaked_segments")

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
        self, topic: str, value: Any, *, key: bytes, headers: list[tuple[str, bytes]]
    ) -> Any:
        self.attempts += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.attempts <= self.failures:
            future.set_exception(self.error)
        else:
            self.waiting.set()
            await self.gate.wait()
            # Copied as aiokafka copies it into its batch: a result's value is a view of the
            # worker's shared memory, given back once the answer is acknowledged.
            self.sent.append((topic, bytes(value), headers))
            future.set_result(None)
        return future


class FailingPool:
    size = 1  # the micro-batcher sizes its batches in flight from it

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.runs = 0

    async def run(self, job: Any, timeout: float | None = None) -> Any:
        self.runs += 1
        raise self.error


class InProcessPool:
    """The worker's code, run in this process: the worker decides (EXPIRED, refusals, ...)."""

    size = 1

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, job: Any, timeout: float | None = None) -> Any:
        self.runs += 1
        return worker.run_job(job)


def _record(message: codec.EncodedMessage, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=TP.topic, partition=TP.partition, offset=offset, timestamp=0, timestamp_type=0,
        key=message.key, value=message.value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(message.value), headers=tuple(message.headers),
    )  # fmt: skip


SETTINGS = ConsumerSettings(retry_backoff_s=0.0, shm_cache_bytes=0)
LIMITS = limits_from(SETTINGS)


def _ticket(record: ConsumerRecord[bytes, bytes]) -> Ticket:
    return price(record, LIMITS)


def _handler(
    producer: FlakyProducer, pool: Any, inflight: InFlight | None = None, **options: Any
) -> RequestHandler:
    # No segment cache: nothing here closes the Dispatcher, so nothing may outlive a job.
    metrics = Metrics()
    publisher = Publisher(producer, backoff_s=0.0)  # type: ignore[arg-type]
    inflight = inflight or InFlight(Budget(max_requests=100, max_bytes=1 << 30))
    dispatcher = Dispatcher(SETTINGS, pool, metrics, inflight)
    return RequestHandler(SETTINGS, dispatcher, publisher, metrics, **options)


def _reply_topics() -> ReplyTopics:
    """The default rules, in a cluster that has the results topic and svd-results.web-1."""

    async def topics() -> set[str]:
        return {"svd-results", "svd-results.web-1"}

    return ReplyTopics.from_settings(SETTINGS, topics)


async def test_the_offset_is_done_only_after_the_answer_is_acknowledged() -> None:
    producer = FlakyProducer(failures=3)
    request_id, message = make_request(np.ones((2, 2)), deadline_ms=1)  # expired: no compute
    record = _record(message)
    tracker = OffsetTracker()
    ledger = tracker.ledger(TP)
    ledger.begin(record.offset)
    handler = _handler(producer, InProcessPool())
    producer.gate.clear()
    task = asyncio.create_task(handler.handle(_ticket(record), ledger))
    await asyncio.wait_for(producer.waiting.wait(), 10)  # three failures behind, ack not yet given
    assert tracker.to_commit() == {TP: 0}  # not acknowledged yet: nothing committable
    producer.gate.set()
    await asyncio.wait_for(task, 10)
    assert producer.attempts == 5  # 3 failures, then the error result and the dead letter
    assert tracker.to_commit() == {TP: 1}
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.EXPIRED
    assert error.request_id == request_id


async def test_a_result_is_the_workers_bytes_published_then_marked_done() -> None:
    producer = FlakyProducer(failures=1)
    a = np.random.default_rng(0).standard_normal((6, 4))
    request_id, message = make_request(a, correlation_id="corr-9")
    inflight = InFlight(Budget(max_requests=10, max_bytes=1 << 30))
    handler = _handler(producer, InProcessPool(), inflight)
    ledger = _begun()
    await handler.handle(_ticket(_record(message)), ledger)
    [(topic, value, headers)] = producer.sent
    assert topic == "svd-results" and ledger.commit_position() == 1
    reply = codec.decode_reply(value, headers)
    assert isinstance(reply, codec.DecodedResult) and reply.meta.request_id == request_id
    assert reply.meta.correlation_id == "corr-9" and reply.u is not None and reply.vt is not None
    np.testing.assert_allclose((reply.u * reply.s) @ reply.vt, a, atol=1e-12)
    assert handler._metrics.succeeded._value.get() == 1


async def test_the_answers_block_is_given_back_once_the_answer_is_acknowledged() -> None:
    settings = ConsumerSettings(retry_backoff_s=0.0)  # with a segment cache, as deployed
    producer = FlakyProducer(failures=2)
    metrics = Metrics()
    inflight = InFlight(Budget(max_requests=10, max_bytes=1 << 30))
    dispatcher = Dispatcher(settings, InProcessPool(), metrics, inflight)
    handler = RequestHandler(
        settings,
        dispatcher,
        Publisher(producer, backoff_s=0.0),
        metrics,  # type: ignore[arg-type]
    )
    try:
        _, message = make_request(np.ones((5, 3)))
        producer.gate.clear()
        task = asyncio.create_task(handler.handle(_ticket(_record(message)), _begun()))
        await asyncio.wait_for(producer.waiting.wait(), 10)
        assert dispatcher.segments.idle_names == []  # the answer being published lives there
        producer.gate.set()
        await asyncio.wait_for(task, 10)
        assert len(dispatcher.segments.idle_names) == 1  # acknowledged: given back
        _, message = make_request(np.ones((5, 3)))
        await handler.handle(_ticket(_record(message)), _begun())
        assert dispatcher.segments.reused == 1
        assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-results"]
    finally:
        dispatcher.close()


async def test_a_lapack_failure_is_answered_svd_failed_without_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_convergence(*args: Any, **kwargs: Any) -> Any:
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(compute, "svd", no_convergence)
    producer = FlakyProducer()
    _, message = make_request(np.ones((3, 3)))
    record = _record(message)
    pool = InProcessPool()
    await _handler(producer, pool).handle(_ticket(record), _begun())
    assert pool.runs == 1
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
        async def send(self, topic: str, value: Any, **kw: Any) -> Any:
            if not self.sent and self.attempts == 0:
                self.attempts += 1
                raise MessageSizeTooLargeError("too big")
            return await super().send(topic, value, **kw)

    for deadline_ms in (1, None):  # its error result, then its result, refused the first time
        producer = TooLargeOnce()
        _, message = make_request(np.ones((2, 2)), deadline_ms=deadline_ms)
        ledger = _begun()
        await _handler(producer, InProcessPool()).handle(_ticket(_record(message)), ledger)
        assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
        error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
        assert isinstance(error, ErrorResult) and error.code == ErrorCode.LIMIT_EXCEEDED
        assert ledger.commit_position() == 1


def _begun(offset: int = 0) -> Any:
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(offset)
    return ledger


async def test_a_dead_letter_refused_for_size_is_written_cut_down_never_answered_twice() -> None:
    class SmallDlq(FlakyProducer):
        async def send(self, topic: str, value: Any, **kw: Any) -> Any:
            if topic == "svd-dlq" and len(value) > 100_000:
                raise MessageSizeTooLargeError("too big for svd-dlq")
            return await super().send(topic, value, **kw)

    producer = SmallDlq()
    value = b'{"request_id": "big-1", "pad": "' + b"x" * 500_000 + b'"'  # truncated JSON
    record = _record(codec.EncodedMessage(key=b"big-1", value=value, headers=[]))
    ledger = _begun()
    await _handler(producer, InProcessPool()).handle(_ticket(record), ledger)
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
    pool = FailingPool(RuntimeError("a bug"))
    handler = _handler(producer, pool)
    await handler.handle(_ticket(_record(message)), ledger)
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.INTERNAL
    assert error.request_id == request_id and error.retryable
    dead = read_dead_letter(producer.sent[1][1], producer.sent[1][2])
    assert dead.meta.code == ErrorCode.INTERNAL and dead.meta.attempts == 3
    assert ledger.commit_position() == 1
    assert handler._metrics.unexpected_failures._value.get() == 3
    assert pool.runs == 3


def _resources() -> TaskFailed:
    failure = JobFailure(kind=KIND_RESOURCES, error_type="MemoryError", message="no room",
                         retryable=True, traceback="")  # fmt: skip
    return TaskFailed(failure, pid=1)


def _internal() -> TaskFailed:
    failure = JobFailure(kind=KIND_INTERNAL, error_type="FileNotFoundError", message="gone",
                         retryable=False, traceback="")  # fmt: skip
    return TaskFailed(failure, pid=1)


@pytest.mark.parametrize(
    ("error", "code", "retryable", "attempts"),
    [
        (WorkerCrashed(-9, pid=1), ErrorCode.WORKER_CRASHED, False, 3),  # retried, then given up
        (TaskTimeout(120.0, pid=1), ErrorCode.TIMEOUT, False, 1),  # the request's: not retried
        (_resources(), ErrorCode.INTERNAL, True, 3),
        (_internal(), ErrorCode.INTERNAL, True, 1),  # a bug: not retried
        (ShmAllocationError("no room in /dev/shm"), ErrorCode.INTERNAL, True, 3),
    ],
    ids=["crashed", "timeout", "resources", "internal", "no-shm"],
)
async def test_a_job_that_fails_as_a_whole_is_answered_for_its_request(
    error: Exception, code: ErrorCode, retryable: bool, attempts: int
) -> None:
    producer = FlakyProducer()
    request_id, message = make_request(np.ones((3, 3)), reply_topic="svd-results.web-1")
    pool = FailingPool(error)
    handler = _handler(producer, pool, reply_topics=_reply_topics())
    ledger = _begun()
    await handler.handle(_ticket(_record(message)), ledger)
    # The worker could not say whose request it was: read from the record, as for one that
    # did not decode, and answered on its own reply topic.
    assert [topic for topic, _, _ in producer.sent] == ["svd-results.web-1", "svd-dlq"]
    error_result = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error_result, ErrorResult) and error_result.code == code
    assert error_result.request_id == request_id and error_result.retryable is retryable
    dead = read_dead_letter(producer.sent[1][1], producer.sent[1][2])
    assert dead.meta.code == code and dead.meta.attempts == attempts
    assert ledger.commit_position() == 1
    assert pool.runs >= attempts  # plus the batch it failed in first, when it was batched


async def test_a_worker_out_of_memory_for_one_request_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = compute.svd

    def out_of_memory_once(a: Any, **options: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("the worker ran out")
        return real(a, **options)

    monkeypatch.setattr(compute, "svd", out_of_memory_once)
    producer = FlakyProducer()
    request_id, message = make_request(np.eye(3))
    pool = InProcessPool()
    await _handler(producer, pool).handle(_ticket(_record(message)), _begun())
    assert pool.runs == 2 and len(calls) == 2
    [(_, value, headers)] = producer.sent
    reply = codec.decode_reply(value, headers)
    assert isinstance(reply, codec.DecodedResult) and reply.meta.request_id == request_id


async def test_factors_that_overflow_are_answered_result_overflow() -> None:
    producer = FlakyProducer()
    _, message = make_request(np.full((4, 4), 1e308))
    await _handler(producer, InProcessPool()).handle(_ticket(_record(message)), _begun())
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.RESULT_OVERFLOW
    assert not error.retryable
    assert read_dead_letter(producer.sent[1][1], producer.sent[1][2]).meta.attempts == 1


async def test_a_request_refused_before_compute_is_dead_lettered_with_no_attempt() -> None:
    # A JSON result that may not fit the result limit: refused by the worker before computing.
    producer = FlakyProducer()
    # 1200 x 1200: 2,881,200 float64 numbers, 23 MB in binary, up to 72 MB as JSON.
    request_id, message = make_request(np.ones((1200, 1200)), result_encoding="json")
    await _handler(producer, InProcessPool()).handle(_ticket(_record(message)), _begun())
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.LIMIT_EXCEEDED
    assert error.request_id == request_id
    assert read_dead_letter(producer.sent[1][1], producer.sent[1][2]).meta.attempts == 0


async def test_a_json_request_whose_answer_needs_more_room_is_charged_for_it() -> None:
    # Short numbers: the size estimate falls short, the worker asks for more before computing.
    producer = FlakyProducer()
    a = np.ones((40, 40))
    request_id, message = make_request(a, encoding=codec.Encoding.JSON)
    ticket = _ticket(_record(message))
    estimated = ticket.cost
    inflight = InFlight(Budget(max_requests=10, max_bytes=1 << 30))
    inflight.admit(ticket.cost)
    pool = InProcessPool()
    await _handler(producer, pool, inflight).handle(ticket, _begun())
    assert pool.runs == 2  # asked, then answered
    assert ticket.cost > estimated and inflight.bytes == ticket.cost  # charged again
    [(_, value, headers)] = producer.sent
    reply = codec.decode_reply(value, headers)
    assert isinstance(reply, codec.DecodedResult) and reply.meta.request_id == request_id
    inflight.release(ticket.cost)
    assert (inflight.requests, inflight.bytes) == (0, 0)


async def test_an_unreadable_record_gets_a_dead_letter_only() -> None:
    producer = FlakyProducer()
    record = unreadable_record(TP, 7, UnsupportedCodecError("no zstd"))
    ledger = _begun(7)
    await _handler(producer, FailingPool(AssertionError())).handle(_ticket(record), ledger)
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
    await _handler(producer, InProcessPool()).handle(_ticket(_record(message)), _begun())
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.INVALID_SCHEMA


async def test_a_result_never_goes_to_a_reply_topic_that_was_not_checked() -> None:
    producer = FlakyProducer()
    _, message = make_request(np.ones((2, 2)), reply_topic="svd-requests")
    await _handler(producer, InProcessPool()).handle(_ticket(_record(message)), _begun())
    assert [topic for topic, _, _ in producer.sent] == ["svd-results", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.INVALID_SCHEMA


async def test_an_answer_goes_to_an_allowed_reply_topic() -> None:
    producer = FlakyProducer()
    handler = _handler(producer, InProcessPool(), reply_topics=_reply_topics())
    _, message = make_request(np.ones((2, 2)), deadline_ms=1, reply_topic="svd-results.web-1")
    await handler.handle(_ticket(_record(message)), _begun())
    assert [topic for topic, _, _ in producer.sent] == ["svd-results.web-1", "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.EXPIRED
    producer.sent.clear()
    _, message = make_request(np.ones((2, 2)), reply_topic="svd-results.web-1")
    await handler.handle(_ticket(_record(message)), _begun())
    [(topic, value, headers)] = producer.sent
    assert topic == "svd-results.web-1"
    assert isinstance(codec.decode_reply(value, headers), codec.DecodedResult)


async def test_a_dead_letter_is_sized_to_its_topic_when_the_cluster_said_what_it_takes() -> None:
    producer = FlakyProducer()
    limits = {"svd-dlq": 100_000, "svd-results": 64 << 20}
    handler = _handler(producer, InProcessPool(), topic_limits=limits)
    value = b'{"request_id": "sized-1", "pad": "' + b"x" * 500_000 + b'"'
    record = _record(codec.EncodedMessage(key=b"sized-1", value=value, headers=[]))
    await handler.handle(_ticket(record), _begun())
    assert producer.attempts == 2  # the error result, and the dead letter once: never refused
    (dlq,) = [(v, h) for topic, v, h in producer.sent if topic == "svd-dlq"]
    dead = read_dead_letter(*dlq)
    assert dead.meta.truncated and dead.meta.value_bytes == len(value)
    assert codec.EncodedMessage(key=b"sized-1", value=dlq[0], headers=dlq[1]).size <= 100_000


@pytest.mark.parametrize(
    ("reply_topic", "expected"),
    [("svd-results.web-1", "svd-results.web-1"), ("svd-requests", "svd-results")],
    ids=["allowed", "refused"],
)
async def test_an_error_for_a_request_that_did_not_decode_goes_to_its_allowed_reply_topic(
    reply_topic: str, expected: str
) -> None:
    # Refused or not, the reply topic it names never changes what the request is told: the
    # error it earned (NON_FINITE), on its own topic when allowed, else on the results topic.
    producer = FlakyProducer()
    handler = _handler(producer, InProcessPool(), reply_topics=_reply_topics())
    value = (
        b'{"schema_version": 1, "request_id": "nan-1", "reply_topic": "%s", "matrix": '
        b'{"shape": [1, 2], "dtype": "float64", "data": [1, NaN]}}' % reply_topic.encode()
    )
    record = _record(codec.EncodedMessage(key=b"nan-1", value=value, headers=[]))
    await handler.handle(_ticket(record), _begun())
    assert [topic for topic, _, _ in producer.sent] == [expected, "svd-dlq"]
    error = codec.decode_reply(producer.sent[0][1], producer.sent[0][2])
    assert isinstance(error, ErrorResult) and error.code == ErrorCode.NON_FINITE
