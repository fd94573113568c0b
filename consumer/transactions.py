"""Exactly-once delivery: a partition's answers and its offset commit in one Kafka transaction.

Fencing works per transactional id, and aiokafka's ``send_offsets_to_transaction`` predates
KIP-447's group-generation fencing. So, as Kafka requires without KIP-447, each partition gets
its own transactional producer whose ``transactional.id`` is derived from the group and the
partition: stable across instances and restarts. A new owner of the partition initialises the
same id, which fences the previous owner's producer: a zombie can never write again.

Answers complete out of order, but a transaction may only commit an offset once everything
before it is answered. So a partition's answers wait (still counted in the in-flight budget,
which holds them anyway) until every earlier request of the partition is answered too; then
one transaction publishes them all and commits the offset past them. Readers with
``isolation_level="read_committed"`` see each answer exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

from consumer.offsets import PartitionLedger
from consumer.publisher import refusal_code
from consumer.retry import Backoff
from schemas.codec import EncodedMessage
from schemas.errors import ErrorCode

log = logging.getLogger(__name__)

Answer = list[tuple[str, EncodedMessage]]
# What to write instead of an answer the broker refused for good (its error code, why).
Fallback = Callable[[ErrorCode, str], Answer]
ProducerFactory = Callable[[str], AIOKafkaProducer]


class NotDelivered(Exception):
    """The partition was revoked or this instance fenced before the answer's transaction
    committed. Nothing of it is visible to read_committed readers; the new owner answers it."""


def transactional_id(prefix: str, tp: TopicPartition) -> str:
    return f"{prefix}-{tp.topic}-{tp.partition}"


@dataclass(eq=False)
class _Staged:
    answer: Answer
    done: asyncio.Future[None]
    fallback: Fallback | None
    fell_back: bool = False


@dataclass(eq=False)
class _PartitionOutbox:
    tp: TopicPartition
    producer: AIOKafkaProducer
    ledger: PartitionLedger | None = None
    staged: dict[int, _Staged] = field(default_factory=dict)
    # After a refusal, one offset per transaction until the answer at fault is replaced.
    one_at_a_time: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the producer has started
    closed: bool = False

    def abandon(self, reason: str) -> None:
        self.closed = True
        self.ready.set()  # wake deliveries waiting for the start: they see `closed`
        for staged in self.staged.values():
            if not staged.done.done():
                staged.done.set_exception(NotDelivered(reason))
        self.staged.clear()


class TransactionalOutbox:
    def __init__(
        self,
        group_id: str,
        id_prefix: str,
        producer_factory: ProducerFactory,
        *,
        on_fenced: Callable[[TopicPartition], None],
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._group_id = group_id
        self._prefix = id_prefix
        self._factory = producer_factory
        self._on_fenced = on_fenced
        self._backoff = Backoff(backoff_s, max_backoff_s)
        self._partitions: dict[TopicPartition, _PartitionOutbox] = {}
        self.transactions = 0

    async def open(self, tps: set[TopicPartition]) -> None:
        """Start a transactional producer per partition; this fences the previous owner's.

        The partitions are registered before the first await: records of a new assignment can
        be fetched and answered while the producers still start, and their deliveries must wait
        for the start instead of being taken for answers to a revoked partition.
        """
        opening = [
            _PartitionOutbox(tp, self._factory(transactional_id(self._prefix, tp)))
            for tp in tps - set(self._partitions)
        ]
        for outbox in opening:
            self._partitions[outbox.tp] = outbox
        for outbox in opening:
            await self._start(outbox)
        log.info("transactional producers ready for %d partitions", len(tps))

    async def _start(self, outbox: _PartitionOutbox) -> None:
        delays = self._backoff.delays()
        while not outbox.closed:
            try:
                await outbox.producer.start()
            except KafkaError as exc:
                delay = next(delays)
                log.warning(
                    "transactional producer for %s-%d did not start (%r); retrying in %.1fs",
                    outbox.tp.topic, outbox.tp.partition, exc, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            outbox.ready.set()
            return

    async def close(self, tps: set[TopicPartition]) -> None:
        """Let go of partitions: finish a running transaction, drop what is still staged."""
        for tp in tps:
            outbox = self._partitions.pop(tp, None)
            if outbox is None:
                continue
            async with outbox.lock:
                outbox.abandon(f"{tp.topic}-{tp.partition} was revoked before its transaction")
            with contextlib.suppress(KafkaError):
                await outbox.producer.stop()

    async def close_all(self) -> None:
        await self.close(set(self._partitions))

    async def deliver(
        self,
        tp: TopicPartition,
        ledger: PartitionLedger,
        offset: int,
        answer: Answer,
        fallback: Fallback | None = None,
    ) -> None:
        """Return once ``answer`` and the offset past it are committed; else ``NotDelivered``.

        A record of it the broker refuses for good (too large for its topic, a topic the
        service may not write) aborts every transaction it is in: it is then written as
        ``fallback`` says instead, once, or as nothing if that is refused too.
        """
        outbox = self._partitions.get(tp)
        if outbox is not None:
            await outbox.ready.wait()
        if outbox is None or outbox.closed or ledger.revoked:
            raise NotDelivered(f"{tp.topic}-{tp.partition} is not ours any more")
        outbox.ledger = ledger
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outbox.staged[offset] = _Staged(answer, done, fallback)
        await self._flush(outbox)
        await done

    async def skip(self, tp: TopicPartition, ledger: PartitionLedger, offset: int) -> None:
        """Give up on answering ``offset``: mark it done and commit the answers staged behind it,
        which wait for every earlier offset of their partition."""
        ledger.finish(offset)
        outbox = self._partitions.get(tp)
        if outbox is not None and not outbox.closed and not ledger.revoked:
            outbox.ledger = ledger
            await self._flush(outbox)

    async def _flush(self, outbox: _PartitionOutbox) -> None:
        async with outbox.lock:
            # One series for the whole flush, kept across the commits that pass: a broker that
            # fails every other transaction is still retried less and less often.
            delays = self._backoff.delays()
            while not outbox.closed and outbox.ledger is not None:
                batch = outbox.ledger.ready_prefix(outbox.staged)
                if not batch:
                    return
                if outbox.one_at_a_time:
                    batch = batch[:1]
                try:
                    await self._commit(outbox, batch)
                except (ProducerFenced, InvalidProducerEpoch):
                    log.critical(
                        "fenced on %s-%d: another instance owns it now; this one stops writing",
                        outbox.tp.topic, outbox.tp.partition,
                    )  # fmt: skip
                    outbox.abandon("this instance was fenced")
                    self._on_fenced(outbox.tp)
                    return
                except KafkaError as exc:
                    code = refusal_code(exc)
                    if code is not None:  # retrying the same records cannot help
                        self._replace_refused(outbox, batch, code, exc)
                        continue
                    delay = next(delays)
                    log.warning(
                        "transaction on %s-%d failed (%r); retrying in %.1fs",
                        outbox.tp.topic, outbox.tp.partition, exc, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                outbox.one_at_a_time = False  # progress: the next refusal searches afresh
                for offset in batch:
                    outbox.ledger.finish(offset)
                    done = outbox.staged.pop(offset).done
                    if not done.done():
                        done.set_result(None)

    def _replace_refused(
        self, outbox: _PartitionOutbox, batch: list[int], code: ErrorCode, exc: KafkaError
    ) -> None:
        """A batch was refused for good: find the answer at fault (one offset per transaction),
        then write its fallback instead; a refused fallback is written as nothing."""
        if len(batch) > 1:
            outbox.one_at_a_time = True
            return
        (offset,) = batch
        staged = outbox.staged[offset]
        where = f"{outbox.tp.topic}-{outbox.tp.partition}@{offset}"
        if staged.fallback is not None and not staged.fell_back:
            log.warning("the answer to %s was refused (%r); writing its fallback", where, exc)
            staged.answer = staged.fallback(code, repr(exc))
            staged.fell_back = True
        else:
            log.error("the fallback for %s was refused too (%r); committing past it", where, exc)
            staged.answer = []

    async def _commit(self, outbox: _PartitionOutbox, batch: list[int]) -> None:
        producer = outbox.producer
        async with producer.transaction():
            acks = [
                await producer.send(topic, message.value, key=message.key, headers=message.headers)
                for offset in batch
                for topic, message in outbox.staged[offset].answer
            ]
            # aiokafka commits a transaction even when a send in it failed (seen with a dead
            # letter its topic refused: the offset was committed, the dead letter lost). Every
            # acknowledgement is awaited here, so a failure aborts the transaction instead.
            await asyncio.gather(*acks)
            await producer.send_offsets_to_transaction({outbox.tp: batch[-1] + 1}, self._group_id)
        self.transactions += 1
