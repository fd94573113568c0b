"""Counting answers without keeping them, producing without holding a backlog, reading commits.

``AnswerReader`` (kafka_io.py) keeps every decoded result, factors included: right for checking
numbers, wrong for a gigabyte of answers. ``TallyReader`` decodes each answer fully (so a
malformed one is noticed) and keeps only what the fault tests count: who answered what, how.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import RecordMetadata

from localkafka import TopicSettings
from schemas import codec
from schemas.deadletter import DeadLetter, read_dead_letter
from schemas.errors import ContractError
from schemas.models import ErrorResult

MIB = 1 << 20

Outgoing = codec.EncodedMessage | tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


@dataclass(frozen=True)
class Reply:
    """One answer on the results topic, without its factors."""

    request_id: str
    code: str | None  # None for a result, the error code for an error result
    instance_id: str | None = None
    worker_pid: int | None = None
    compute_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


def counts_line(*, sent: int, answered: int, duplicates: int, dead_lettered: int, lost: int) -> str:
    """The line every fault test prints (and puts in its assertion messages)."""
    return (
        f"sent {sent}, answered {answered}, duplicates {duplicates}, "
        f"dead-lettered {dead_lettered}, lost {lost}"
    )


@dataclass
class Tally:
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    undecodable: int = 0  # records on the results topic that are not valid answers

    def answered(self) -> set[str]:
        return set(self.replies)

    def ok(self) -> set[str]:
        return {rid for rid, rs in self.replies.items() if any(r.ok for r in rs)}

    def codes(self, request_id: str) -> list[str | None]:
        return [r.code for r in self.replies.get(request_id, [])]

    def duplicates(self, ids: set[str] | None = None) -> int:
        """Answers beyond the first, per request (over ``ids`` only, when given)."""
        counts = Counter({k: len(v) for k, v in self.replies.items() if ids is None or k in ids})
        return sum(n - 1 for n in counts.values() if n > 1)

    def report(self, sent: int, expected: set[str]) -> str:
        return counts_line(
            sent=sent,
            answered=len(self.answered() & expected),
            duplicates=self.duplicates(),
            dead_lettered=len(self.dead_letters),
            lost=len(expected - self.answered()),
        )


class TallyReader:
    """Reads the results and DLQ topics from the beginning and tallies them."""

    def __init__(
        self, bootstrap: str, topics: TopicSettings, *, isolation_level: str = "read_uncommitted"
    ) -> None:
        self._consumer = AIOKafkaConsumer(
            topics.results,
            topics.dlq,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=64 * MIB,
            max_partition_fetch_bytes=64 * MIB,
            isolation_level=isolation_level,
        )
        self._dlq = topics.dlq
        self.tally = Tally()

    async def __aenter__(self) -> TallyReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> None:
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        for records in batch.values():
            for record in records:
                self._take(record)

    def _take(self, record: Any) -> None:
        headers = list(record.headers)
        if record.topic == self._dlq:
            self.tally.dead_letters.append(read_dead_letter(record.value, headers))
            return
        try:
            reply = codec.decode_reply(record.value, headers)
        except ContractError:
            self.tally.undecodable += 1
            return
        if isinstance(reply, ErrorResult):
            self._add(Reply(reply.request_id or "", str(reply.code)))
            return
        meta = reply.meta
        self._add(
            Reply(
                meta.request_id,
                None,
                instance_id=meta.worker.instance_id if meta.worker else None,
                worker_pid=meta.worker.pid if meta.worker else None,
                compute_ms=meta.timings.compute_ms if meta.timings else None,
            )
        )

    def _add(self, reply: Reply) -> None:
        self.tally.replies.setdefault(reply.request_id, []).append(reply)

    async def collect(
        self, ids: set[str], timeout: float = 120.0, *, dead_letters: int = 0
    ) -> Tally:
        """Poll until every id in ``ids`` is answered and ``dead_letters`` arrived, or fail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tally = self.tally
        while not (ids <= tally.answered() and len(tally.dead_letters) >= dead_letters):
            if loop.time() > deadline:
                missing = ids - tally.answered()
                raise AssertionError(
                    f"{len(missing)} of {len(ids)} requests unanswered after {timeout:g}s "
                    f"(dead letters {len(tally.dead_letters)}/{dead_letters}); "
                    f"e.g. {sorted(missing)[:5]}"
                )
            await self.poll()
        return tally

    async def wait_answered(self, count: int, ids: set[str], timeout: float = 120.0) -> Tally:
        """Poll until at least ``count`` of ``ids`` are answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.tally.answered() & ids) < count:
            if loop.time() > deadline:
                raise AssertionError(
                    f"only {len(self.tally.answered() & ids)} of {count} answers after {timeout:g}s"
                )
            await self.poll()
        return self.tally

    async def read_to_end(self, timeout: float = 60.0) -> Tally:
        """Read every record written so far (up to the end offsets taken now): late duplicates."""
        assignment = self._consumer.assignment()
        ends = await self._consumer.end_offsets(list(assignment))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            positions = {tp: await self._consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return self.tally
            if loop.time() > deadline:
                raise AssertionError(f"read {positions}, short of the ends {ends}, in {timeout}s")
            await self.poll()


# --- producing ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def producer(bootstrap: str, **options: Any) -> AsyncIterator[AIOKafkaProducer]:
    started = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=64 * MIB,
        linger_ms=5,
        **options,
    )
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def send_all(
    bootstrap: str,
    topic: str,
    messages: Iterable[Outgoing],
    *,
    window: int = 64,
    partition: int | None = None,
) -> list[RecordMetadata]:
    """Produce ``messages`` in order with at most ``window`` unacknowledged, so a generator of a
    gigabyte of requests never sits in this process at once. Returns each record's metadata.
    ``partition`` sends them all there instead of where their keys would go."""
    out: list[RecordMetadata] = []
    pending: list[asyncio.Future[RecordMetadata]] = []
    async with producer(bootstrap) as kafka:
        for message in messages:
            if isinstance(message, codec.EncodedMessage):
                key, value, headers = message.key, message.value, message.headers
            else:
                key, value, headers = message
            pending.append(
                await kafka.send(topic, value, key=key, headers=headers, partition=partition)
            )
            if len(pending) >= window:
                out.append(await pending.pop(0))
        out.extend(await asyncio.gather(*pending))
    return out


# --- offsets --------------------------------------------------------------------------------------


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def wait_committed_to_end(
    bootstrap: str, group: str, topic: str, timeout: float = 30.0
) -> dict[int, int]:
    """Wait until ``group`` has committed every partition of ``topic`` up to its end."""
    ends = await end_offsets(bootstrap, topic)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        committed = await committed_offsets(bootstrap, group, topic)
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            return committed
        if loop.time() > deadline:
            raise AssertionError(
                f"group {group} committed {committed}, short of the ends {ends}, in {timeout:g}s"
            )
        await asyncio.sleep(0.25)
