"""One request's life after admission: compute with retries, answer, publish, mark done.

Every path ends in exactly one of: a result; or an error result (when the request id is known)
plus a dead letter holding the original bytes. Only after the broker acknowledged the answer is
the offset marked done, so the commit position never passes an unanswered request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Mapping
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
from consumer.unreadable import UnreadableRecord
from consumer.work import ComputeFailed, Computer
from schemas import codec
from schemas.deadletter import DLQ_HEADERS
from schemas.errors import ContractError, ErrorCode, SvdServiceError
from schemas.limits import DecodeLimits
from schemas.models import DeadLetterMeta, ErrorResult

log = logging.getLogger(__name__)

TRUNCATED_HEADER = DLQ_HEADERS["truncated"]
# A dead letter the dead-letter topic refused at full size is written again cut down to this:
# below the broker's default message.max.bytes, so any topic takes it.
_SMALLEST_DEAD_LETTER_BYTES = 64 * 1024
# The most bytes one number takes in a JSON result (orjson's shortest round-trip form, sign and
# exponent included, plus its comma; float32 prints up to 16 characters, e.g. -0.0000021079127),
# and room for everything but the numbers.
_JSON_BYTES_PER_NUMBER = {4: 17, 8: 25}
_JSON_RESULT_OVERHEAD = 4096
# The smallest float64 that rounds to infinity in float32: halfway between float32's largest
# number, 2**128 - 2**104, and 2**128 (the tie rounds to even, 2**128, which is infinite).
_FLOAT32_OVERFLOWS_AT = 2.0**128 - 2.0**103


@dataclass(frozen=True)
class DeadLetter:
    """The dead letter a failed record owes, encoded at the size its topic takes."""

    record: ConsumerRecord[bytes, bytes]
    meta: DeadLetterMeta

    def encode(self, max_bytes: int) -> codec.EncodedMessage:
        record = self.record
        return codec.encode_dead_letter(
            record.value, list(record.headers), self.meta, key=record.key, max_bytes=max_bytes
        )


@dataclass(frozen=True)
class Answer:
    """What a request is answered with: a reply for its requester (a result or an error result;
    none when no request id could be found) and, for every failure, one dead letter."""

    reply: tuple[str, codec.EncodedMessage] | None
    dead_letter: DeadLetter | None = None
    ok: bool = False  # the reply is a result


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
    if isinstance(record, UnreadableRecord):
        rejection = ContractError(ErrorCode.UNREADABLE_RECORD, record.reason)
        return Prepared(record, None, rejection, 0, received_at)
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
    if request.reply_encoding is codec.Encoding.JSON:
        # Refused before computing, as a binary result over the limit is by the decoder: the
        # exact size of a JSON result is only known once encoded, so its worst case is taken.
        worst = _JSON_RESULT_OVERHEAD + factors * _JSON_BYTES_PER_NUMBER[itemsize]
        if worst > limits.max_result_bytes:
            rejection = ContractError(
                ErrorCode.LIMIT_EXCEEDED,
                f"a JSON result of {factors} numbers may take {worst} bytes; the limit is "
                f"{limits.max_result_bytes}: ask for result_encoding binary, k or compute_uv "
                "false",
                request_id=request.meta.request_id,
            )
            return Prepared(record, request, rejection, len(value), received_at)
    # What this request holds while in flight: the record, its matrix and factors in shared
    # memory, and the encoded answer (about the factors' size again). A sparse matrix goes to
    # shared memory as its arrays (values in the compute dtype), never dense.
    matrix = request.matrix
    if isinstance(matrix, np.ndarray):
        held = itemsize * m * n
    else:
        held = itemsize * matrix.nnz + sum(a.nbytes for a in matrix.index_arrays)
    cost = len(value) + held + 2 * itemsize * factors
    values = matrix if isinstance(matrix, np.ndarray) else matrix.data
    if values.dtype.itemsize > itemsize and values.size:
        # float64 input computed in float32: a value beyond float32's range would become inf
        # in the cast, and the input the caller sent is finite.
        largest = max(float(values.max()), -float(values.min()))
        if largest >= _FLOAT32_OVERFLOWS_AT:
            rejection = ContractError(
                ErrorCode.NON_FINITE,
                f"the matrix holds {largest:.6g}, beyond float32's range: it would be infinite "
                "in options.dtype float32; compute in float64 or scale the matrix down",
                request_id=request.meta.request_id,
            )
            return Prepared(record, request, rejection, len(value), received_at)
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
        topic_limits: Mapping[str, int] | None = None,
    ) -> None:
        self._settings = settings
        self._topic_limits = dict(topic_limits or {})  # consumer/topic_limits.py
        self._computer = computer
        self._publisher = publisher
        self._metrics = metrics
        self._outbox = outbox  # set in exactly_once mode
        self._reply_topics = reply_topics
        self._host = socket.gethostname()

    async def handle(self, prepared: Prepared, ledger: PartitionLedger) -> None:
        """Answer ``prepared`` and mark its offset done. Never raises but for cancellation.

        An unexpected exception (a bug, not the input) is retried a bounded number of times,
        then answered INTERNAL with a dead letter, so no request can hold its partition's
        commit position forever.
        """
        attempts = self._settings.unexpected_attempts
        # Where answers may go, checked once: the results topic until the request's own reply
        # topic has passed its checks.
        reply_to = self._settings.results_topic
        for attempt in range(1, attempts + 1):
            try:
                reply_to, problem = await self._destination(prepared)
                answer = await self._answer(prepared, reply_to, problem)
                await self._deliver(prepared, ledger, answer)
            except Exception as exc:
                self._metrics.unexpected_failures.inc()
                if attempt == attempts:
                    await self._answer_internal(prepared, ledger, exc, attempts, reply_to)
                    return
                delay = self._settings.retry_backoff_s * 2 ** (attempt - 1)
                log.warning(
                    "unexpected failure on attempt %d of %d (%r); retrying in %.2fs",
                    attempt, attempts, exc, delay, exc_info=exc, extra=prepared.context,
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            self._metrics.latency.observe(max(0.0, time.time() - prepared.created_at))
            return

    async def _answer_internal(
        self,
        prepared: Prepared,
        ledger: PartitionLedger,
        exc: Exception,
        attempts: int,
        reply_to: str,
    ) -> None:
        log.error(
            "unexpected failure on each of %d attempts (%r); answering INTERNAL with a dead "
            "letter and moving the commit on",
            attempts, exc, exc_info=exc, extra=prepared.context,
        )  # fmt: skip
        err = SvdServiceError(
            ErrorCode.INTERNAL,
            f"the service failed unexpectedly on each of {attempts} attempts "
            f"({type(exc).__name__})",
        )
        try:
            answer = self._failure(prepared, err, attempts=attempts, reply_to=reply_to)
            await self._deliver(prepared, ledger, answer)
        except Exception:
            log.exception(
                "the INTERNAL answer failed too; the offset moves on unanswered",
                extra=prepared.context,
            )
            if self._outbox is not None:  # later answers of the partition wait on this offset
                record = prepared.record
                tp = TopicPartition(record.topic, record.partition)
                await self._outbox.skip(tp, ledger, record.offset)
            else:
                ledger.finish(prepared.record.offset)

    async def _deliver(self, prepared: Prepared, ledger: PartitionLedger, answer: Answer) -> None:
        if self._outbox is not None:
            await self._deliver_in_transaction(prepared, ledger, answer, self._outbox)
        else:
            await self._deliver_at_least_once(prepared, ledger, answer)

    async def _deliver_at_least_once(
        self, prepared: Prepared, ledger: PartitionLedger, answer: Answer
    ) -> None:
        """Publish (retried until acknowledged), then mark the offset done."""
        if answer.reply is not None:
            topic, message = answer.reply
            try:
                await self._publisher.publish(topic, message, context=prepared.context)
                if answer.ok:
                    self._metrics.succeeded.inc()
            except PublishRejected as exc:
                answer = self._refusal(prepared, exc.code, str(exc))
                await self._publish_error_reply(prepared, answer)
        if answer.dead_letter is not None:
            await self._publish_dead_letter(prepared, answer.dead_letter)
        ledger.finish(prepared.record.offset)

    async def _publish_error_reply(self, prepared: Prepared, answer: Answer) -> None:
        if answer.reply is None:
            return
        topic, message = answer.reply
        try:
            await self._publisher.publish(topic, message, context=prepared.context)
        except PublishRejected as exc:
            log.error(
                "the error answer was refused too (%s); the dead letter is the only record",
                exc, extra=prepared.context,
            )  # fmt: skip

    async def _publish_dead_letter(self, prepared: Prepared, dead: DeadLetter) -> None:
        """Write the dead letter whole if it fits, else cut down; never a second answer."""
        topic = self._settings.dlq_topic
        for max_bytes in (self._limit(topic), _SMALLEST_DEAD_LETTER_BYTES):
            message = dead.encode(max_bytes)
            try:
                await self._publisher.publish(topic, message, context=prepared.context)
            except PublishRejected as exc:
                log.warning(
                    "dead letter refused (%s); writing it again cut down to %d bytes",
                    exc, _SMALLEST_DEAD_LETTER_BYTES, extra=prepared.context,
                )  # fmt: skip
                continue
            self._count_dead_letter(dead, message)
            return
        self._metrics.dead_letters_refused.inc()
        log.error(
            "%s refused even a %d-byte dead letter; the offset moves on without one",
            topic, _SMALLEST_DEAD_LETTER_BYTES, extra=prepared.context,
        )  # fmt: skip

    def _refusal(self, prepared: Prepared, code: ErrorCode, reason: str) -> Answer:
        """The answer to write when the broker refused the request's answer for good (a result
        too large, a topic the service may not write): the requester has none yet, so the
        refusal becomes its one answer, on the results topic, with a dead letter."""
        err = SvdServiceError(code, f"the answer could not be published: {reason}")
        return self._failure(prepared, err, attempts=1, reply_to=self._settings.results_topic)

    def _limit(self, topic: str) -> int:
        """The largest record ``topic`` takes: its own max.message.bytes where it was read."""
        return min(self._settings.max_message_bytes, self._topic_limits.get(topic, 1 << 62))

    def _count_dead_letter(self, dead: DeadLetter, message: codec.EncodedMessage) -> None:
        self._metrics.dead_lettered.inc()
        # Cut down to fit; an unreadable record's dead letter is "truncated" from the start.
        cut = message.headers and message.headers[-1] == (TRUNCATED_HEADER, b"true")
        if cut and not isinstance(dead.record, UnreadableRecord):
            self._metrics.dead_letters_truncated.inc()

    async def _deliver_in_transaction(
        self,
        prepared: Prepared,
        ledger: PartitionLedger,
        answer: Answer,
        outbox: TransactionalOutbox,
    ) -> None:
        """Exactly-once: the answer and the offset past it commit in one transaction."""
        record = prepared.record
        # A message the broker refuses would abort the whole transaction: check sizes first,
        # and write the dead letter at a size its topic takes.
        if answer.reply is not None:
            topic, message = answer.reply
            if message.size > self._limit(topic):
                err = SvdServiceError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"the result takes {message.size} bytes; {topic} takes {self._limit(topic)}",
                )
                answer = self._failure(prepared, err, attempts=1, reply_to=topic)
        messages = [answer.reply] if answer.reply is not None else []
        dlq_limit = self._limit(self._settings.dlq_topic)
        dead_letter = answer.dead_letter.encode(dlq_limit) if answer.dead_letter else None
        if dead_letter is not None:
            messages.append((self._settings.dlq_topic, dead_letter))
        tp = TopicPartition(record.topic, record.partition)

        def refused(code: ErrorCode, reason: str) -> list[tuple[str, codec.EncodedMessage]]:
            # Its dead letter cut to what any topic takes: the refused record may be that one.
            fallback = self._refusal(prepared, code, reason)
            out = [fallback.reply] if fallback.reply is not None else []
            if fallback.dead_letter is not None:
                dlq = fallback.dead_letter.encode(_SMALLEST_DEAD_LETTER_BYTES)
                out.append((self._settings.dlq_topic, dlq))
            return out

        try:
            await outbox.deliver(tp, ledger, record.offset, messages, refused)
        except NotDelivered as exc:
            log.info(
                "answer not committed (%s); the partition's owner answers it",
                exc,
                extra=prepared.context,
            )
            return
        if answer.ok:
            self._metrics.succeeded.inc()
        if answer.dead_letter is not None and dead_letter is not None:
            self._count_dead_letter(answer.dead_letter, dead_letter)

    async def _destination(self, prepared: Prepared) -> tuple[str, str | None]:
        """Where the request's answers go, and why not its own reply topic if that is refused.

        Decided before any answer is built, so no path can write to a topic that was never
        checked: another tenant's, the requests topic, one that does not exist (publishing
        there would be retried forever). A client that reads only its own reply topic gets
        its errors there too, even for a request that failed to decode.
        """
        results = self._settings.results_topic
        record = prepared.record
        if prepared.request is not None:
            wanted = prepared.request.meta.reply_topic
        else:  # refused while decoding: its error still goes where it asked, if that is readable
            wanted = codec.recover_reply_topic(record.value or b"", list(record.headers))
        if not wanted or wanted == results:
            return results, None
        if self._reply_topics is None:
            return results, f"reply_topic {wanted!r} is not accepted by this service"
        problem = await self._reply_topics.problem(wanted)
        return (results, problem) if problem is not None else (wanted, None)

    async def _answer(self, prepared: Prepared, reply_to: str, problem: str | None) -> Answer:
        # attempts counts compute attempts: 0 for a record refused before compute (wire contract).
        if prepared.rejection is not None:
            return self._failure(prepared, prepared.rejection, attempts=0, reply_to=reply_to)
        if problem is not None:
            err = SvdServiceError(ErrorCode.INVALID_SCHEMA, problem)
            return self._failure(prepared, err, attempts=0, reply_to=reply_to)
        request = prepared.request
        assert request is not None
        deadline_ms = request.meta.deadline_ms
        if deadline_ms is not None and time.time() * 1000 > deadline_ms:
            self._metrics.expired.inc()
            err = SvdServiceError(
                ErrorCode.EXPIRED, f"deadline {deadline_ms} ms passed before compute"
            )
            return self._failure(prepared, err, attempts=0, reply_to=reply_to)
        try:
            message = await self._computer.compute(prepared, self._host)
        except ComputeFailed as failed:
            return self._failure(
                prepared, failed.error, attempts=failed.attempts, reply_to=reply_to
            )
        return Answer(reply=(reply_to, message), ok=True)

    def _failure(
        self,
        prepared: Prepared,
        err: SvdServiceError,
        *,
        attempts: int,
        reply_to: str,
    ) -> Answer:
        record = prepared.record
        request_id = err.request_id or (
            prepared.request.meta.request_id
            if prepared.request
            else codec.recover_request_id(record.value or b"", list(record.headers), record.key)
        )
        self._metrics.failed.labels(code=str(err.code)).inc()
        unreadable = isinstance(record, UnreadableRecord)
        if unreadable:
            self._metrics.unreadable.inc()
        log.warning(
            "request failed with %s (%s); answering with %s",
            err.code, err.message, "an error result and a dead letter" if request_id else "a dead letter only (no request id)",
            extra={**prepared.context, "request_id": request_id, "code": err.code},
        )  # fmt: skip
        reply = None
        if request_id is not None:
            error = ErrorResult(
                request_id=request_id, code=err.code, message=err.message, retryable=err.retryable
            )
            reply = (reply_to, codec.encode_error(error))
        dead = DeadLetterMeta(
            reason=err.message,
            code=err.code,
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            attempts=attempts,
            request_id=request_id,
            timestamp_ms=int(time.time() * 1000),
            # Nothing of an unreadable record is left: not even its size.
            value_bytes=None if unreadable else len(record.value or b""),
            truncated=unreadable,
        )
        return Answer(reply=reply, dead_letter=DeadLetter(record, dead))
