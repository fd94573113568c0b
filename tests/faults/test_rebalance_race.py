"""A rebalance that lands while the loop reads past an unreadable record, record by record.

With the eager protocol a member's partitions are all revoked and often assigned straight back.
Records read across such a rebalance were fetched under the old assignment; the new one starts
again from the last commit and fetches them again. Admitting the stale copies too would begin
the same offsets twice on the new ledger, and the second ``begin`` raises: the loop, and with it
the service, would die of a rebalance.

Admitting a fetched batch awaits nothing (records are priced, never decoded, on the event loop:
consumer/admission.py), so the window is the reading past an unreadable record, which awaits
the consumer for each record (consumer/unreadable.py), and a batch admitted with the generation
it was read in. No broker-level test can time a rebalance into that window reliably; so the
service's own methods are driven here, with stand-ins for the aiokafka consumer and the reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, UnsupportedCodecError
from aiokafka.structs import ConsumerRecord

from consumer.admission import Ticket
from consumer.offsets import PartitionLedger
from consumer.rebalance import Rebalance
from consumer.service import SvdService
from consumer.settings import ConsumerSettings
from consumer.unreadable import unreadable_record
from tests.support.kafka_io import make_request

pytestmark = pytest.mark.faults

TP = TopicPartition("svd-requests", 0)


class _Consumer:
    """The few AIOKafkaConsumer calls the admission, rebalance and commit paths make."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.paused_tps: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps |= set(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return self.paused_tps & self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


class _Handler:
    """Keeps every admitted request in flight: only admission is under test."""

    def __init__(self) -> None:
        self.admitted: list[int] = []

    async def handle(self, ticket: Ticket, ledger: PartitionLedger) -> None:
        self.admitted.append(ticket.record.offset)
        await asyncio.Event().wait()


class _Reader:
    """Reads past an unreadable record; the rebalance lands while it waits for the consumer."""

    def __init__(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        self.records = records
        self.reading = asyncio.Event()
        self.rebalanced = asyncio.Event()

    async def rewind(self, *args: object) -> None:
        return None

    async def read(self, tp: TopicPartition) -> list[ConsumerRecord[bytes, bytes]]:
        self.reading.set()
        await asyncio.wait_for(self.rebalanced.wait(), 10)
        return list(self.records)


def _record(offset: int) -> ConsumerRecord[bytes, bytes]:
    _, message = make_request(np.ones((4, 4)))
    return ConsumerRecord(
        TP.topic, TP.partition, offset, 0, 0, message.key, message.value, None,
        len(message.key or b""), len(message.value), message.headers,
    )  # fmt: skip


async def _service() -> tuple[SvdService, _Consumer, _Handler, Rebalance]:
    """A service owning TP, with offset 7 in flight: the commit position stays at 7."""
    service = SvdService(ConsumerSettings(pool_size=1, blas_threads=1, drain_timeout_s=0))
    fake = _Consumer()
    handler = _Handler()
    rebalance = service._attach(fake)  # type: ignore[arg-type]
    service._handler = handler  # type: ignore[assignment]
    fake.assigned = {TP}
    await rebalance.on_partitions_assigned([TP])
    await service._admit_batch({TP: [_record(7)]})
    await asyncio.sleep(0)  # let its request task start
    return service, fake, handler, rebalance


async def _revoke_and_reassign(rebalance: Rebalance) -> None:
    # Everything revoked (in-flight work given up after drain_timeout_s=0), the commit stays
    # at 7, and the same partition is assigned straight back.
    await rebalance.on_partitions_revoked([TP])
    await rebalance.on_partitions_assigned([TP])


async def test_records_read_past_an_unreadable_one_across_a_rebalance_are_dropped(
    fault_report: Callable[[str, str], str],
) -> None:
    service, fake, handler, rebalance = await _service()
    # The fetch failed on offset 8, which cannot be read; 9 after it can.
    reader = _Reader([unreadable_record(TP, 8, UnsupportedCodecError("no zstd")), _record(9)])
    service._unreadable = reader  # type: ignore[assignment]
    reading = asyncio.create_task(service._read_past_unreadable(KafkaError("unreadable")))
    await asyncio.wait_for(reader.reading.wait(), 10)
    await _revoke_and_reassign(rebalance)
    reader.rebalanced.set()
    await reading  # must not raise
    assert handler.admitted == [7]  # the stale 8 and 9 were not begun

    # The new assignment fetches from the commit again: 7, 8, 9. None may raise.
    await service._admit_batch(
        {TP: [_record(7), unreadable_record(TP, 8, UnsupportedCodecError("no zstd")), _record(9)]}
    )
    await asyncio.sleep(0)  # let the request tasks just spawned start
    line = fault_report(
        "a revoke and reassign of the partition while reading past the unreadable offset 8",
        f"offsets admitted {handler.admitted}, commits {[c[TP] for c in fake.commits]}, "
        f"in flight on the new assignment {service.offsets.ledger(TP).in_flight}",
    )
    assert fake.commits and all(c == {TP: 7} for c in fake.commits), line
    assert handler.admitted == [7, 7, 8, 9], f"the stale copies of 8 and 9 must be dropped: {line}"
    assert service.offsets.ledger(TP).in_flight == 3, line
    await service._requests.cancel_all()


async def test_a_batch_admitted_with_an_old_generation_is_dropped_not_begun_twice(
    fault_report: Callable[[str, str], str],
) -> None:
    service, fake, handler, rebalance = await _service()
    # A batch read before the rebalance (8, 9), admitted after it with the generation it was
    # read in.
    generation = service._generation
    await _revoke_and_reassign(rebalance)
    stale = [_record(8), _record(9)]
    await service._admit_batch({TP: stale}, generation)  # must not raise
    assert handler.admitted == [7], "a stale batch must not be begun"
    assert TP not in service._received_up_to  # nor move where reading resumes
    assert TP not in service._held  # nor be held for later
    # The new assignment fetches from the commit again: 7, 8, 9, each begun once.
    await service._admit_batch({TP: [_record(7), *stale]})
    await service._admit_batch({TP: stale}, generation)  # late again: still dropped
    await asyncio.sleep(0)
    line = fault_report(
        "a batch of offsets 8, 9 read before a revoke and reassign, admitted after it",
        f"offsets admitted {handler.admitted}, commits {[c[TP] for c in fake.commits]}, "
        f"in flight on the new assignment {service.offsets.ledger(TP).in_flight}",
    )
    assert fake.commits and all(c == {TP: 7} for c in fake.commits), line
    assert handler.admitted == [7, 7, 8, 9], line
    assert service.offsets.ledger(TP).in_flight == 3, line
    assert service._received_up_to[TP] == 10, line
    await service._requests.cancel_all()
