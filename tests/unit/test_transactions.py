"""Exactly-once outbox: answers wait for their predecessors, then commit with the offset."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerFenced,
)

from consumer.offsets import OffsetTracker
from consumer.transactions import NotDelivered, TransactionalOutbox, transactional_id
from schemas.codec import EncodedMessage
from schemas.errors import ErrorCode

TP = TopicPartition("svd-requests", 3)


class FakeTxnProducer:
    """Records committed transactions; can fail a commit or be fenced."""

    def __init__(self, txn_id: str) -> None:
        self.txn_id = txn_id
        self.committed: list[tuple[list[bytes], dict[TopicPartition, int]]] = []
        self.fail_next: Exception | None = None
        self.fail_send: Exception | None = None  # the next send's acknowledgement fails
        self.refuse: set[bytes] = set()  # values the "broker" refuses for good, every time
        self.started = self.stopped = False
        self._open: tuple[list[bytes], dict[TopicPartition, int]] | None = None

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._open = ([], {})
        yield
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            self._open = None  # aborted
            raise error
        self.committed.append(self._open)
        self._open = None

    async def send(self, topic: str, value: bytes, **kw: Any) -> asyncio.Future[None]:
        assert self._open is not None
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_send is not None:  # as the broker does: the refused record is not written
            ack.set_exception(self.fail_send)
            self.fail_send = None
        elif value in self.refuse:
            ack.set_exception(MessageSizeTooLargeError(f"{topic} refuses {value!r}"))
        else:
            self._open[0].append(value)
            ack.set_result(None)
        return ack

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        assert self._open is not None and group_id == "g"
        self._open[1].update(offsets)


def _answer(tag: bytes) -> list[tuple[str, EncodedMessage]]:
    return [("svd-results", EncodedMessage(key=tag, value=tag, headers=[]))]


async def _outbox(
    fenced: list[TopicPartition] | None = None,
) -> tuple[TransactionalOutbox, dict[str, FakeTxnProducer]]:
    producers: dict[str, FakeTxnProducer] = {}

    def factory(txn_id: str) -> Any:
        producers[txn_id] = FakeTxnProducer(txn_id)
        return producers[txn_id]

    outbox = TransactionalOutbox(
        "g", "svc", factory, on_fenced=(fenced if fenced is not None else []).append, backoff_s=0.0
    )
    await outbox.open({TP})
    return outbox, producers


async def test_out_of_order_answers_commit_together_once_the_oldest_is_done() -> None:
    outbox, producers = await _outbox()
    producer = producers[transactional_id("svc", TP)]
    ledger = OffsetTracker().ledger(TP)
    for offset in (10, 11, 12):
        ledger.begin(offset)
    later = asyncio.create_task(outbox.deliver(TP, ledger, 11, _answer(b"r11")))
    await asyncio.sleep(0)
    assert producer.committed == [] and not later.done()  # 10 is still computing
    await outbox.deliver(TP, ledger, 10, _answer(b"r10"))
    await later
    assert producer.committed == [([b"r10", b"r11"], {TP: 12})]
    assert ledger.commit_position() == 12
    await outbox.deliver(TP, ledger, 12, _answer(b"r12"))
    assert producer.committed[-1] == ([b"r12"], {TP: 13})


async def test_a_failed_transaction_is_retried_and_nothing_is_lost() -> None:
    outbox, producers = await _outbox()
    producer = producers[transactional_id("svc", TP)]
    producer.fail_next = KafkaConnectionError("coordinator moved")
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    await outbox.deliver(TP, ledger, 0, _answer(b"r0"))
    assert producer.committed == [([b"r0"], {TP: 1})]


async def test_fencing_abandons_staged_answers_and_reports() -> None:
    fenced: list[TopicPartition] = []
    outbox, producers = await _outbox(fenced)
    producer = producers[transactional_id("svc", TP)]
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    ledger.begin(1)
    waiting = asyncio.create_task(outbox.deliver(TP, ledger, 1, _answer(b"r1")))
    await asyncio.sleep(0)
    producer.fail_next = ProducerFenced()
    with pytest.raises(NotDelivered):
        await outbox.deliver(TP, ledger, 0, _answer(b"r0"))
    with pytest.raises(NotDelivered):
        await waiting
    assert fenced == [TP] and producer.committed == []
    with pytest.raises(NotDelivered):  # a fenced partition takes nothing more
        await outbox.deliver(TP, ledger, 2, _answer(b"r2"))


async def test_revoking_drops_what_is_staged_and_stops_the_producer() -> None:
    outbox, producers = await _outbox()
    producer = producers[transactional_id("svc", TP)]
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    ledger.begin(1)
    staged = asyncio.create_task(outbox.deliver(TP, ledger, 1, _answer(b"r1")))
    await asyncio.sleep(0)
    await outbox.close({TP})
    with pytest.raises(NotDelivered):
        await staged
    assert producer.stopped and producer.committed == []


async def test_answers_of_a_partition_whose_producer_still_starts_wait_for_it() -> None:
    gate = asyncio.Event()
    producers: dict[str, FakeTxnProducer] = {}

    class SlowStart(FakeTxnProducer):
        async def start(self) -> None:
            await gate.wait()
            await super().start()

    def factory(txn_id: str) -> Any:
        producers[txn_id] = SlowStart(txn_id)
        return producers[txn_id]

    outbox = TransactionalOutbox("g", "svc", factory, on_fenced=lambda tp: None)
    opening = asyncio.create_task(outbox.open({TP}))
    await asyncio.sleep(0)  # the assignment callback is still starting the producer
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    delivery = asyncio.create_task(outbox.deliver(TP, ledger, 0, _answer(b"r0")))
    await asyncio.sleep(0)
    assert not delivery.done()
    gate.set()
    await opening
    await delivery
    assert producers[transactional_id("svc", TP)].committed == [([b"r0"], {TP: 1})]


async def test_a_send_that_fails_aborts_its_transaction_and_is_retried() -> None:
    outbox, producers = await _outbox()
    (producer,) = producers.values()
    ledger = OffsetTracker().ledger(TP)
    ledger.begin(0)
    producer.fail_send = NotLeaderForPartitionError("a leader moved")
    await asyncio.wait_for(outbox.deliver(TP, ledger, 0, _answer(b"a")), 10)
    # The first transaction was aborted, not committed without its message; the retry commits.
    assert producer.committed == [([b"a"], {TP: 1})]
    assert ledger.commit_position() == 1


async def _deliver_three(
    refuse: set[bytes], fallback_value: bytes
) -> tuple[FakeTxnProducer, list[tuple[ErrorCode, str]], Any]:
    outbox, producers = await _outbox()
    (producer,) = producers.values()
    producer.refuse = refuse
    ledger = OffsetTracker().ledger(TP)
    for offset in range(3):
        ledger.begin(offset)
    calls: list[tuple[ErrorCode, str]] = []

    def fallback(code: ErrorCode, reason: str) -> list[tuple[str, EncodedMessage]]:
        calls.append((code, reason))
        return _answer(fallback_value)

    # Staged together behind offset 0, so they first go out in one transaction.
    later = [
        asyncio.create_task(outbox.deliver(TP, ledger, offset, _answer(tag), fallback))
        for offset, tag in ((1, b"b"), (2, b"c"))
    ]
    await asyncio.sleep(0)
    await asyncio.wait_for(outbox.deliver(TP, ledger, 0, _answer(b"a"), fallback), 10)
    await asyncio.wait_for(asyncio.gather(*later), 10)
    return producer, calls, ledger


async def test_an_answer_refused_for_good_is_found_and_replaced_by_its_fallback() -> None:
    producer, calls, ledger = await _deliver_three({b"b"}, b"b-refused")
    written = [value for values, _ in producer.committed for value in values]
    assert written == [b"a", b"b-refused", b"c"]  # in order, each once, nothing lost
    assert [code for code, _ in calls] == [ErrorCode.LIMIT_EXCEEDED]
    assert producer.committed[-1][1] == {TP: 3} and ledger.commit_position() == 3


async def test_a_refused_fallback_is_committed_past_with_nothing() -> None:
    producer, calls, ledger = await _deliver_three({b"b", b"b-refused"}, b"b-refused")
    written = [value for values, _ in producer.committed for value in values]
    assert written == [b"a", b"c"] and len(calls) == 1
    assert ledger.commit_position() == 3
