"""Records the service cannot read: found one offset at a time, each answered with a dead letter.

A batch compressed with a codec this build cannot decode, one whose checksum does not match,
or a record whose header name is not UTF-8 makes aiokafka's ``getmany`` raise, and raise again
on every call after it: the fetch position never passes the batch, so without this one bad
producer stops the whole service (it used to exit, and exit again on every restart). Worse,
the failing call drops whatever it had already taken from other partitions, and moves their
positions past it.

So on such an error the service rewinds every partition to the offset after the last record it
actually received, then reads each partition alone, one record per call: a call that fails
names the offset at the partition's position as unreadable. That offset becomes an
``UnreadableRecord`` (nothing is left of it: no key, headers or value), the position steps one
past it, and the request path answers it like any record it must refuse: a dead letter with
code ``UNREADABLE_RECORD``, counted, and the commit moves on. A batch of n records costs n
fetches, once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CorruptRecordException, UnsupportedCodecError
from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)

# Above aiokafka's fetch_max_wait_ms (500 ms by default, which the service keeps): how long a
# partition that was just sought may take to return records.
_REFETCH_TIMEOUT_MS = 1500

# What getmany raises for records it cannot read; anything else is not about the records.
# aiokafka decodes header names as UTF-8 and lets the UnicodeDecodeError out (kcat sends any
# bytes); since each fetch parses a batch from its start, the rest of that batch is unreadable
# to this client too.
UNREADABLE_ERRORS = (UnsupportedCodecError, CorruptRecordException, UnicodeDecodeError)


@dataclass
class UnreadableRecord(ConsumerRecord[bytes, bytes]):  # type: ignore[misc]
    """An offset whose record could not be read; ``reason`` says why."""

    reason: str = ""


def unreadable_record(tp: TopicPartition, offset: int, exc: Exception) -> UnreadableRecord:
    return UnreadableRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=0,  # unknown: latency then counts from when the service met it
        timestamp_type=0,
        key=None,
        value=None,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=(),
        reason=f"the record at {tp.topic}-{tp.partition}@{offset} could not be read: {exc!r}",
    )


class UnreadableReader:
    """Reads partitions record by record after an unreadable fetch (see the module doc)."""

    def __init__(
        self, consumer: AIOKafkaConsumer, *, poll_timeout_ms: int, max_records: int, max_bytes: int
    ) -> None:
        self._consumer = consumer
        self._poll_timeout_ms = poll_timeout_ms
        self._max_records = max_records
        self._max_bytes = max_bytes

    async def rewind(
        self,
        tps: set[TopicPartition],
        received: dict[TopicPartition, int],
        current: Callable[[], bool],
    ) -> None:
        """Put each of ``tps`` back at the offset after the last record the service received
        from it, or at the group's commit when it received none since it was assigned. Stops
        once ``current()`` turns false: a rebalance has put every position back itself."""
        for tp in tps:
            offset = received.get(tp)
            if offset is None:
                offset = await self._consumer.committed(tp)
            if not current():
                return
            if offset is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)

    async def read(self, tp: TopicPartition) -> list[ConsumerRecord[bytes, bytes]]:
        """The next records of ``tp`` in offset order, unreadable offsets among them.

        Stops when nothing more comes within a poll, at the limits, or at the first readable
        record after an unreadable stretch (the normal fetch is faster from there).
        """
        records: list[ConsumerRecord[bytes, bytes]] = []
        size = 0
        stepped = False
        seeked = True  # by rewind, before the first call
        while len(records) < self._max_records and size < self._max_bytes:
            position = await self._consumer.position(tp)
            # After a seek the partition is fetched anew, and that fetch can queue behind a long
            # poll for the other partitions: nothing within a short poll then means nothing yet.
            timeout_ms = _REFETCH_TIMEOUT_MS if seeked else self._poll_timeout_ms
            seeked = False
            try:
                got = await self._consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
            except UNREADABLE_ERRORS as exc:
                log.warning(
                    "%s-%d@%d cannot be read (%r); it gets a dead letter and the partition "
                    "moves on",
                    tp.topic, tp.partition, position, exc,
                )  # fmt: skip
                records.append(unreadable_record(tp, position, exc))
                self._consumer.seek(tp, position + 1)
                stepped = seeked = True
                continue
            fetched = got.get(tp, [])
            records.extend(fetched)
            size += sum(len(r.value or b"") for r in fetched)
            if not fetched or stepped:
                break
        return records
