"""A rebalance that lands while the loop awaits a large record's decode (run in a thread).

With the eager protocol a member's partitions are all revoked and often assigned straight back.
A record decoded across such a rebalance was fetched under the old assignment; the new one
starts again from the last commit and fetches it again. Admitting the stale copy too would
begin the same offset twice on the new ledger, and the second ``begin`` raises: the loop, and
with it the service, would die of a rebalance.

The real race needs a rebalance to complete inside a decode of about a second, which no
broker-level test can time reliably; so the service's own methods are driven here, with a
stand-in for the aiokafka consumer and a decode that waits for the rebalance to finish.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

import consumer.service as service_module
from consumer.handler import Prepared
from consumer.offsets import PartitionLedger
from consumer.service import SvdService
from consumer.settings import ConsumerSettings
from tests.support.kafka_io import make_request

pytestmark = pytest.mark.faults

TP = TopicPartition("svd-requests", 0)


class _Consumer:
    """The few AIOKafkaConsumer calls the admission and rebalance paths make."""

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

    async def handle(self, prepared: Prepared, ledger: PartitionLedger) -> None:
        self.admitted.append(prepared.record.offset)
        await asyncio.Event().wait()


def _record(offset: int) -> ConsumerRecord[bytes, bytes]:
    # Above the service's 1 MiB threshold, so it is decoded in a thread.
    _, message = make_request(np.ones((400, 400)))
    return ConsumerRecord(
        TP.topic, TP.partition, offset, 0, 0, message.key, message.value, None,
        len(message.key or b""), len(message.value), message.headers,
    )  # fmt: skip


async def test_a_record_decoded_across_a_revoke_and_reassign_is_dropped_not_begun_twice(
    monkeypatch: pytest.MonkeyPatch, fault_report: Callable[[str, str], str]
) -> None:
    service = SvdService(ConsumerSettings(pool_size=1, blas_threads=1, drain_timeout_s=0))
    fake = _Consumer()
    handler = _Handler()
    service._consumer = fake  # type: ignore[assignment]
    service._handler = handler  # type: ignore[assignment]
    fake.assigned = {TP}
    await service.on_assigned({TP})
    await service._admit_batch({TP: [_record(7)]})  # in flight: the commit position stays at 7

    decoding, rebalanced = threading.Event(), threading.Event()
    real_prepare = service_module.prepare

    def slow_prepare(*args: Any) -> Prepared:
        decoding.set()
        assert rebalanced.wait(10), "the rebalance did not happen"
        return real_prepare(*args)

    monkeypatch.setattr(service_module, "prepare", slow_prepare)
    # A batch fetched before the rebalance: 8 is being decoded when it happens, 9 comes after.
    stale = asyncio.create_task(service._admit_batch({TP: [_record(8), _record(9)]}))
    assert await asyncio.to_thread(decoding.wait, 10)
    # The rebalance: everything revoked (in-flight work given up after drain_timeout_s=0), the
    # commit stays at 7, and the same partition is assigned straight back.
    await service.on_revoked({TP})
    await service.on_assigned({TP})
    rebalanced.set()
    await stale
    monkeypatch.setattr(service_module, "prepare", real_prepare)

    # The new assignment fetches from the commit again: 7, 8, 9. None may raise.
    await service._admit_batch({TP: [_record(7), _record(8), _record(9)]})
    await asyncio.sleep(0)  # let the request tasks just spawned start
    line = fault_report(
        "a revoke and reassign of the partition while offset 8 (of a batch 8, 9) was decoding",
        f"offsets admitted {handler.admitted}, commits {[c[TP] for c in fake.commits]}, "
        f"in flight on the new assignment {service.offsets.ledger(TP).in_flight}",
    )
    assert fake.commits and all(c == {TP: 7} for c in fake.commits), line
    assert handler.admitted == [7, 7, 8, 9], f"the stale copies of 8 and 9 must be dropped: {line}"
    assert service.offsets.ledger(TP).in_flight == 3, line
    await service._requests.cancel_all()
