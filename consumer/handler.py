"""One request's life after admission: compute with retries, answer, publish, mark done.

Every path ends in exactly one of: a result; or an error result (when the request id is known)
plus a dead letter holding the original bytes. Only after the broker acknowledged the answer is
the offset marked done, so the commit position never passes an unanswered request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from consumer.admission import Ticket
from consumer.batch import Delivery
from consumer.claims import Claims
from consumer.dispatch import Dispatcher
from consumer.jobs import Answered, Refused
from consumer.metrics import Metrics
from consumer.offsets import PartitionLedger
from consumer.publisher import Publisher, PublishRejected
from consumer.reply_topics import ReplyTopics
from consumer.retry import Backoff
from consumer.settings import ConsumerSettings
from consumer.transactions import NotDelivered, TransactionalOutbox
from consumer.unreadable import UnreadableRecord
from objectstore import PayloadStore, StoreError
from schemas import codec
from schemas.deadletter import DLQ_HEADERS, dead_letter_headers
from schemas.errors import ErrorCode, SvdServiceError
from schemas.models import DeadLetterMeta, ErrorResult, ObjectRef
from schemas.records import record_size

log = logging.getLogger(__name__)

TRUNCATED_HEADER = DLQ_HEADERS["truncated"]
# A dead letter the dead-letter topic refused at full size is written again cut down to this:
# below the broker's default message.max.bytes, so any topic takes it.
_SMALLEST_DEAD_LETTER_BYTES = 64 * 1024


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

    def fits(self, max_bytes: int) -> bool:
        """Whether the whole original fits a topic taking ``max_bytes`` (headers included)."""
        record = self.record
        headers = [(n, v or b"") for n, v in record.headers]
        ours = dead_letter_headers(self.meta)
        size = record_size(record.key or b"", record.value or b"", [*headers, *ours])
        return size <= max_bytes


@dataclass(frozen=True)
class Answer:
    """What a request is answered with: a reply for its requester (a result or an error result;
    none when no request id could be found) and, for every failure, one dead letter."""

    reply: tuple[str, codec.EncodedMessage] | None
    dead_letter: DeadLetter | None = None
    ok: bool = False  # the reply is a result


class RequestHandler:
    """Answers each admitted record exactly once: compute (consumer/dispatch.py), then publish
    the answer the worker encoded, or an error result and a dead letter."""

    def __init__(
        self,
        settings: ConsumerSettings,
        dispatcher: Dispatcher,
        publisher: Publisher,
        metrics: Metrics,
        outbox: TransactionalOutbox | None = None,
        reply_topics: ReplyTopics | None = None,
        topic_limits: Mapping[str, int] | None = None,
        claims: Claims | None = None,
        store: PayloadStore | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._claims = claims if settings.delete_request_objects else None
        self._topic_limits = dict(topic_limits or {})  # consumer/topic_limits.py
        self._dispatcher = dispatcher
        self._publisher = publisher
        self._metrics = metrics
        self._outbox = outbox  # set in exactly_once mode
        self._reply_topics = reply_topics
        self._backoff = Backoff(settings.retry_backoff_s)

    async def handle(self, ticket: Ticket, ledger: PartitionLedger) -> None:
        """Answer ``ticket`` and mark its offset done. Never raises but for cancellation.

        An unexpected exception (a bug, not the input) is retried a bounded number of times,
        then answered INTERNAL with a dead letter, so no request can hold its partition's
        commit position forever.
        """
        attempts = self._settings.unexpected_attempts
        # Where answers may go, checked once: the results topic until the request's own reply
        # topic has passed its checks.
        reply_to = self._settings.results_topic
        for attempt in range(1, attempts + 1):
            delivery: Delivery | None = None
            try:
                outcome, delivery, computed = await self._compute(ticket)
                reply_to, problem = await self._destination(outcome)
                answer = self._answer(ticket, outcome, delivery, computed, reply_to, problem)
                answer = await self._keep_original(ticket, answer)
                delivered = await self._deliver(ticket, ledger, answer)
                if delivered and answer.ok and isinstance(outcome, Answered):
                    self._stored(ticket, outcome)
            except Exception as exc:
                self._metrics.unexpected_failures.inc()
                if attempt == attempts:
                    await self._answer_internal(ticket, ledger, exc, attempts, reply_to)
                    return
                delay = self._backoff.delay(attempt)
                log.warning(
                    "unexpected failure on attempt %d of %d (%r); retrying in %.2fs",
                    attempt, attempts, exc, delay, exc_info=exc, extra=ticket.context,
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            finally:
                if delivery is not None:
                    delivery.release()
            self._metrics.latency.observe(
                max(0.0, time.time() - self._created_at(ticket, delivery))
            )
            return

    async def _compute(self, ticket: Ticket) -> tuple[Answered | Refused, Delivery, int]:
        """The worker's outcome and its attempts; an unreadable record is refused here."""
        if ticket.unreadable is not None:
            outcome = Refused(
                code=ErrorCode.UNREADABLE_RECORD, message=ticket.unreadable, retryable=False,
                request_id=None, reply_topic=None, created_at_ms=None, computed=False,
            )  # fmt: skip
            return outcome, Delivery(outcome, pid=0), 0
        delivery, attempts = await self._dispatcher.run(ticket)
        answered = delivery.outcome
        if not isinstance(answered, Refused | Answered):  # the dispatcher reprices NeedsRoom
            raise TypeError(f"unexpected outcome {answered!r}")
        ticket.request_id = answered.request_id or ticket.request_id
        return answered, delivery, attempts

    @staticmethod
    def _created_at(ticket: Ticket, delivery: Delivery) -> float:
        """When the request was made (epoch s): its own created_at_ms, else the record's time."""
        outcome = delivery.outcome
        created_ms = getattr(outcome, "created_at_ms", None)
        if created_ms is not None:
            return float(created_ms) / 1000
        if ticket.record.timestamp:
            return float(ticket.record.timestamp) / 1000
        return ticket.received_at

    async def _answer_internal(
        self,
        ticket: Ticket,
        ledger: PartitionLedger,
        exc: Exception,
        attempts: int,
        reply_to: str,
    ) -> None:
        log.error(
            "unexpected failure on each of %d attempts (%r); answering INTERNAL with a dead "
            "letter and moving the commit on",
            attempts, exc, exc_info=exc, extra=ticket.context,
        )  # fmt: skip
        err = SvdServiceError(
            ErrorCode.INTERNAL,
            f"the service failed unexpectedly on each of {attempts} attempts "
            f"({type(exc).__name__})",
        )
        try:
            answer = self._failure(ticket, err, attempts=attempts, reply_to=reply_to)
            await self._deliver(ticket, ledger, answer)
        except Exception:
            log.exception(
                "the INTERNAL answer failed too; the offset moves on unanswered",
                extra=ticket.context,
            )
            if self._outbox is not None:  # later answers of the partition wait on this offset
                record = ticket.record
                tp = TopicPartition(record.topic, record.partition)
                await self._outbox.skip(tp, ledger, record.offset)
            else:
                ledger.finish(ticket.record.offset)

    async def _keep_original(self, ticket: Ticket, answer: Answer) -> Answer:
        """A dead letter that cannot hold its original (the dead-letter topic takes less than
        the request topic did): with a store, the whole original goes there and the dead letter
        references it, so the replay does not depend on the request topic's retention."""
        dead = answer.dead_letter
        value = ticket.record.value
        if dead is None or self._store is None or not value:
            return answer
        if dead.fits(self._limit(self._settings.dlq_topic)):
            return answer
        record = ticket.record
        key = f"dead-letters/{record.topic}/{record.partition}/{record.offset}"
        try:
            stored = await self._store.write_async(key, [value])
        except StoreError as exc:
            log.warning(
                "could not keep the original of a dead letter too large for %s in the store "
                "(%s); writing it cut down", self._settings.dlq_topic, exc.message,
                extra=ticket.context,
            )  # fmt: skip
            return answer
        ref = ObjectRef(url=stored.url, nbytes=stored.nbytes, sha256=stored.sha256)
        meta = dead.meta.model_copy(update={"original_ref": ref})
        return replace(answer, dead_letter=DeadLetter(dead.record, meta))

    def _stored(self, ticket: Ticket, outcome: Answered) -> None:
        """Count stored payloads; release the request's object once its answer is final."""
        if outcome.result_object is not None:
            self._metrics.stored_results.inc()
        if outcome.request_object is None:
            return
        self._metrics.stored_requests.inc()
        if self._claims is None:
            return
        record = ticket.record
        if self._outbox is not None:  # the transaction committed the answer and the offset
            self._claims.delete(outcome.request_object)
        else:
            tp = TopicPartition(record.topic, record.partition)
            self._claims.answered(tp, record.offset, outcome.request_object)

    async def _deliver(self, ticket: Ticket, ledger: PartitionLedger, answer: Answer) -> bool:
        """Publish the answer and move the offset on; False if this instance may not (it lost
        the partition: its next owner answers)."""
        if self._outbox is not None:
            return await self._deliver_in_transaction(ticket, ledger, answer, self._outbox)
        await self._deliver_at_least_once(ticket, ledger, answer)
        return True

    async def _deliver_at_least_once(
        self, ticket: Ticket, ledger: PartitionLedger, answer: Answer
    ) -> None:
        """Publish (retried until acknowledged), then mark the offset done."""
        if answer.reply is not None:
            topic, message = answer.reply
            try:
                await self._publisher.publish(topic, message, context=ticket.context)
                if answer.ok:
                    self._metrics.succeeded.inc()
            except PublishRejected as exc:
                answer = self._refusal(ticket, exc.code, str(exc))
                await self._publish_error_reply(ticket, answer)
        if answer.dead_letter is not None:
            await self._publish_dead_letter(ticket, answer.dead_letter)
        ledger.finish(ticket.record.offset)

    async def _publish_error_reply(self, ticket: Ticket, answer: Answer) -> None:
        if answer.reply is None:
            return
        topic, message = answer.reply
        try:
            await self._publisher.publish(topic, message, context=ticket.context)
        except PublishRejected as exc:
            log.error(
                "the error answer was refused too (%s); the dead letter is the only record",
                exc, extra=ticket.context,
            )  # fmt: skip

    async def _publish_dead_letter(self, ticket: Ticket, dead: DeadLetter) -> None:
        """Write the dead letter whole if it fits, else cut down; never a second answer."""
        topic = self._settings.dlq_topic
        for max_bytes in (self._limit(topic), _SMALLEST_DEAD_LETTER_BYTES):
            message = dead.encode(max_bytes)
            try:
                await self._publisher.publish(topic, message, context=ticket.context)
            except PublishRejected as exc:
                log.warning(
                    "dead letter refused (%s); writing it again cut down to %d bytes",
                    exc, _SMALLEST_DEAD_LETTER_BYTES, extra=ticket.context,
                )  # fmt: skip
                continue
            self._count_dead_letter(dead, message)
            return
        self._metrics.dead_letters_refused.inc()
        log.error(
            "%s refused even a %d-byte dead letter; the offset moves on without one",
            topic, _SMALLEST_DEAD_LETTER_BYTES, extra=ticket.context,
        )  # fmt: skip

    def _refusal(self, ticket: Ticket, code: ErrorCode, reason: str) -> Answer:
        """The answer to write when the broker refused the request's answer for good (a result
        too large, a topic the service may not write): the requester has none yet, so the
        refusal becomes its one answer, on the results topic, with a dead letter."""
        err = SvdServiceError(code, f"the answer could not be published: {reason}")
        return self._failure(ticket, err, attempts=1, reply_to=self._settings.results_topic)

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
        ticket: Ticket,
        ledger: PartitionLedger,
        answer: Answer,
        outbox: TransactionalOutbox,
    ) -> bool:
        """Exactly-once: the answer and the offset past it commit in one transaction."""
        record = ticket.record
        # A message the broker refuses would abort the whole transaction: check sizes first,
        # and write the dead letter at a size its topic takes.
        if answer.reply is not None:
            topic, message = answer.reply
            if message.size > self._limit(topic):
                err = SvdServiceError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"the result takes {message.size} bytes; {topic} takes {self._limit(topic)}",
                )
                answer = self._failure(ticket, err, attempts=1, reply_to=topic)
        messages = [answer.reply] if answer.reply is not None else []
        dlq_limit = self._limit(self._settings.dlq_topic)
        dead_letter = answer.dead_letter.encode(dlq_limit) if answer.dead_letter else None
        if dead_letter is not None:
            messages.append((self._settings.dlq_topic, dead_letter))
        tp = TopicPartition(record.topic, record.partition)

        def refused(code: ErrorCode, reason: str) -> list[tuple[str, codec.EncodedMessage]]:
            # Its dead letter cut to what any topic takes: the refused record may be that one.
            fallback = self._refusal(ticket, code, reason)
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
                extra=ticket.context,
            )
            return False
        if answer.ok:
            self._metrics.succeeded.inc()
        if answer.dead_letter is not None and dead_letter is not None:
            self._count_dead_letter(answer.dead_letter, dead_letter)
        return True

    async def _destination(self, outcome: Answered | Refused) -> tuple[str, str | None]:
        """Where the request's answers go, and why not its own reply topic if that is refused.

        Decided before any answer is built, so no path can write to a topic that was never
        checked: another tenant's, the requests topic, one that does not exist (publishing
        there would be retried forever). A client that reads only its own reply topic gets
        its errors there too, even for a request that failed to decode (the worker recovers
        the topic it names).
        """
        results = self._settings.results_topic
        wanted = outcome.reply_topic
        if not wanted or wanted == results:
            return results, None
        if self._reply_topics is None:
            return results, f"reply_topic {wanted!r} is not accepted by this service"
        problem = await self._reply_topics.problem(wanted)
        return (results, problem) if problem is not None else (wanted, None)

    def _answer(
        self,
        ticket: Ticket,
        outcome: Answered | Refused,
        delivery: Delivery,
        computed: int,
        reply_to: str,
        problem: str | None,
    ) -> Answer:
        # attempts counts compute attempts: 0 for a record refused before compute (wire contract).
        # An invalid request is answered as such wherever it asked to be answered; then a
        # refused reply topic; then what compute made of the request.
        invalid = (
            isinstance(outcome, Refused)
            and not outcome.computed
            and outcome.code != ErrorCode.EXPIRED
        )
        if problem is not None and not invalid:
            err = SvdServiceError(ErrorCode.INVALID_SCHEMA, problem)
            return self._failure(ticket, err, attempts=0, reply_to=reply_to)
        if isinstance(outcome, Refused):
            err = SvdServiceError(
                ErrorCode(outcome.code), outcome.message, retryable=outcome.retryable
            )
            attempts = computed if outcome.computed else 0
            return self._failure(ticket, err, attempts=attempts, reply_to=reply_to)
        assert delivery.value is not None
        message = codec.EncodedMessage(
            key=outcome.request_id.encode(), value=delivery.value, headers=list(outcome.headers)
        )
        return Answer(reply=(reply_to, message), ok=True)

    def _failure(
        self,
        ticket: Ticket,
        err: SvdServiceError,
        *,
        attempts: int,
        reply_to: str,
    ) -> Answer:
        record = ticket.record
        request_id = (
            err.request_id
            or ticket.request_id
            or codec.recover_request_id(record.value or b"", list(record.headers), record.key)
        )
        self._metrics.failed.labels(code=str(err.code)).inc()
        unreadable = isinstance(record, UnreadableRecord)
        if unreadable:
            self._metrics.unreadable.inc()
        log.warning(
            "request failed with %s (%s); answering with %s",
            err.code, err.message, "an error result and a dead letter" if request_id else "a dead letter only (no request id)",
            extra={**ticket.context, "request_id": request_id, "code": err.code},
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
