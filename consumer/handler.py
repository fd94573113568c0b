"""One request's life after admission: compute with retries, answer, publish, mark done.

Every path ends in exactly one of: a result; or an error result (when the request id is known)
plus a dead letter holding the original bytes. Only after the broker acknowledged the answer is
the offset marked done, so the commit position never passes an unanswered request.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from dataclasses import dataclass

import numpy as np
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer.compute import output_shapes
from consumer.metrics import Metrics
from consumer.offsets import PartitionLedger
from consumer.publisher import Publisher, PublishRejected
from consumer.reply_topics import ReplyTopics
from consumer.settings import ConsumerSettings
from consumer.transactions import NotDelivered, TransactionalOutbox
from consumer.work import ComputeFailed, Computer
from schemas import codec
from schemas.errors import ContractError, ErrorCode, SvdServiceError
from schemas.limits import DecodeLimits
from schemas.models import DeadLetterMeta, ErrorResult

log = logging.getLogger(__name__)

Answer = list[tuple[str, codec.EncodedMessage]]


@dataclass(frozen=True)
class Prepared:
    """A record decoded (or rejected) and priced against the in-flight budget."""

    record: ConsumerRecord[bytes, bytes]
    request: codec.DecodedRequest | None
    rejection: ContractError | None
    cost: int
    received_at: float

    @property
    def created_at(self) -> float:
        """When the request was made (epoch s): its own created_at_ms, else the record's time."""
        if self.request is not None and self.request.meta.created_at_ms is not None:
            return self.request.meta.created_at_ms / 1000
        if self.record.timestamp:
            return float(self.record.timestamp) / 1000
        return self.received_at

    @property
    def context(self) -> dict[str, object]:
        return {
            "request_id": self.request.meta.request_id if self.request else None,
            "topic": self.record.topic,
            "partition": self.record.partition,
            "offset": self.record.offset,
        }


def limits_from(settings: ConsumerSettings) -> DecodeLimits:
    return DecodeLimits(
        max_rows=settings.max_rows,
        max_cols=settings.max_cols,
        max_elements=settings.max_elements,
        max_matrix_bytes=settings.max_matrix_bytes,
        max_nnz=settings.max_nnz,
        max_message_bytes=settings.max_message_bytes,
        # Refuse up front a request whose factors could not be published (headers need room).
        max_result_bytes=settings.max_message_bytes - 64 * 1024,
    )


def prepare(record: ConsumerRecord[bytes, bytes], limits: DecodeLimits) -> Prepared:
    """Decode and price one record. Pure CPU: the caller decides where it runs."""
    value = record.value or b""
    received_at = time.time()
    try:
        request = codec.decode_request(value, list(record.headers), limits)
    except ContractError as err:
        return Prepared(record, None, err, len(value), received_at)
    m, n = request.matrix.shape
    opts = request.meta.options
    try:
        shapes = output_shapes(
            m, n, full_matrices=opts.full_matrices, compute_uv=opts.compute_uv, k=opts.k
        )
    except ValueError as exc:
        rejection = ContractError(
            ErrorCode.INVALID_SCHEMA, str(exc), request_id=request.meta.request_id
        )
        return Prepared(record, request, rejection, len(value), received_at)
    itemsize = np.dtype(opts.dtype or request.matrix.dtype).itemsize
    factors = sum(
        math.prod(shape) for shape in (shapes.u, shapes.s, shapes.vt) if shape is not None
    )
    # What this request holds while in flight: the record, its matrix and factors in shared
    # memory, and the encoded answer (about the factors' size again). A sparse matrix goes to
    # shared memory as its arrays (values in the compute dtype), never dense.
    matrix = request.matrix
    if isinstance(matrix, np.ndarray):
        held = itemsize * m * n
    else:
        held = itemsize * matrix.nnz + sum(a.nbytes for a in matrix.index_arrays)
    cost = len(value) + held + 2 * itemsize * factors
    return Prepared(record, request, None, cost, received_at)


class RequestHandler:
    def __init__(
        self,
        settings: ConsumerSettings,
        computer: Computer,
        publisher: Publisher,
        metrics: Metrics,
        outbox: TransactionalOutbox | None = None,
        reply_topics: ReplyTopics | None = None,
    ) -> None:
        self._settings = settings
        self._computer = computer
        self._publisher = publisher
        self._metrics = metrics
        self._outbox = outbox  # set in exactly_once mode
        self._reply_topics = reply_topics
        self._host = socket.gethostname()

    async def handle(self, prepared: Prepared, ledger: PartitionLedger) -> None:
        answer = await self._answer(prepared)
        if self._outbox is not None:
            await self._deliver_in_transaction(prepared, ledger, answer, self._outbox)
        else:
            await self._deliver(prepared, ledger, answer)
        self._metrics.latency.observe(max(0.0, time.time() - prepared.created_at))

    async def _deliver(self, prepared: Prepared, ledger: PartitionLedger, answer: Answer) -> None:
        """At-least-once: publish (retried until acknowledged), then mark the offset done."""
        try:
            await self._publish(prepared, answer)
        except PublishRejected as exc:
            # Only a result can outgrow the topic (inputs that fit, factors that do not).
            err = SvdServiceError(exc.code, f"the answer could not be published: {exc}")
            # The default results topic: the refused topic may be the request's reply topic.
            fallback = self._failure(
                prepared, err, attempts=1, reply_to=self._settings.results_topic
            )
            try:
                await self._publish(prepared, fallback)
            except PublishRejected:
                log.error(
                    "even the error answer was refused (%s); the request stays at its source offset",
                    exc, extra=prepared.context,
                )  # fmt: skip
        ledger.finish(prepared.record.offset)

    async def _deliver_in_transaction(
        self,
        prepared: Prepared,
        ledger: PartitionLedger,
        answer: Answer,
        outbox: TransactionalOutbox,
    ) -> None:
        """Exactly-once: the answer and the offset past it commit in one transaction."""
        record = prepared.record
        limit = self._settings.max_message_bytes
        # A message the broker refuses would abort the whole transaction: check sizes first.
        # Dead letters are copies of records the broker already took.
        if any(len(m.value) > limit for t, m in answer if t != self._settings.dlq_topic):
            err = SvdServiceError(ErrorCode.LIMIT_EXCEEDED, f"the result exceeds {limit} bytes")
            answer = self._failure(prepared, err, attempts=1)
        tp = TopicPartition(record.topic, record.partition)
        try:
            await outbox.deliver(tp, ledger, record.offset, answer)
        except NotDelivered as exc:
            log.info(
                "answer not committed (%s); the partition's owner answers it",
                exc,
                extra=prepared.context,
            )

    async def _publish(self, prepared: Prepared, answer: Answer) -> None:
        for topic, message in answer:
            await self._publisher.publish(topic, message, context=prepared.context)

    async def _answer(self, prepared: Prepared) -> Answer:
        # attempts counts compute attempts: 0 for a record refused before compute (wire contract).
        if prepared.rejection is not None:
            return self._failure(prepared, prepared.rejection, attempts=0)
        request = prepared.request
        assert request is not None
        deadline_ms = request.meta.deadline_ms
        if deadline_ms is not None and time.time() * 1000 > deadline_ms:
            self._metrics.expired.inc()
            err = SvdServiceError(
                ErrorCode.EXPIRED, f"deadline {deadline_ms} ms passed before compute"
            )
            return self._failure(prepared, err, attempts=0)
        reply_topic = request.meta.reply_topic
        if reply_topic and reply_topic != self._settings.results_topic and self._reply_topics:
            problem = await self._reply_topics.problem(reply_topic)
            if problem is not None:
                err = SvdServiceError(ErrorCode.INVALID_SCHEMA, problem)
                return self._failure(
                    prepared, err, attempts=0, reply_to=self._settings.results_topic
                )
        try:
            message = await self._computer.compute(prepared, self._host)
        except ComputeFailed as failed:
            return self._failure(prepared, failed.error, attempts=failed.attempts)
        self._metrics.succeeded.inc()
        return [(self._reply_topic(prepared), message)]

    def _reply_topic(self, prepared: Prepared) -> str:
        if prepared.request is not None and prepared.request.meta.reply_topic:
            return prepared.request.meta.reply_topic
        return self._settings.results_topic

    def _failure(
        self,
        prepared: Prepared,
        err: SvdServiceError,
        *,
        attempts: int,
        reply_to: str | None = None,
    ) -> Answer:
        record = prepared.record
        request_id = err.request_id or (
            prepared.request.meta.request_id
            if prepared.request
            else codec.recover_request_id(record.value or b"", list(record.headers))
        )
        self._metrics.failed.labels(code=str(err.code)).inc()
        log.warning(
            "request failed with %s (%s); answering with an error result and a dead letter",
            err.code, err.message, extra={**prepared.context, "request_id": request_id, "code": err.code},
        )  # fmt: skip
        answer: Answer = []
        if request_id is not None:
            error = ErrorResult(
                request_id=request_id, code=err.code, message=err.message, retryable=err.retryable
            )
            answer.append((reply_to or self._reply_topic(prepared), codec.encode_error(error)))
        dead = DeadLetterMeta(
            reason=err.message,
            code=err.code,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            attempts=attempts,
            request_id=request_id,
            timestamp_ms=int(time.time() * 1000),
        )
        answer.append(
            (
                self._settings.dlq_topic,
                codec.encode_dead_letter(record.value, list(record.headers), dead, key=record.key),
            )
        )
        self._metrics.dead_lettered.inc()
        return answer
