"""ResultsListener: an async iterator over a results topic, for services that only consume answers.

Each item is an ``SvdResult`` or an ``SvdError`` (an error result, or a reply that breaks the
contract); errors are yielded, not raised, so one bad answer does not end the iteration.
Duplicates (at-least-once redelivery) are skipped by request id within a bounded memory.

Two ways to read:
- no ``group_id`` (default): every partition, no consumer group, from the end (or the beginning);
  nothing is committed. Each listener sees every answer.
- ``group_id``: a consumer group shares the partitions among the listeners of that group and
  commits what was processed. An item counts as processed when the next one is asked for (or the
  listener closes), so a crash re-delivers at most the items not yet processed: at-least-once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from objectstore import PayloadStore
from producer_sdk import _wire
from producer_sdk._kafka import TopicReader, topic_partitions
from producer_sdk.errors import SvdError
from producer_sdk.pending import Finished, SeenIds
from producer_sdk.result import SvdResult
from producer_sdk.settings import ClientSettings
from schemas.codec import StoredResult

__all__ = ["ListenerStats", "ResultsListener"]

log = logging.getLogger("producer_sdk")

Item = SvdResult | SvdError
_FETCH_TIMEOUT_S = 0.5
_READ_RETRY_S = 1.0


class ListenerStats:
    __slots__ = ("duplicates", "yielded")

    def __init__(self) -> None:
        self.yielded = 0
        self.duplicates = 0


class ResultsListener:
    """``async with ResultsListener(bootstrap_servers=...) as results: async for item in results``."""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        topic: str | None = None,
        group_id: str | None = None,
        from_beginning: bool = False,
        commit_interval_s: float = 5.0,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = ClientSettings(**overrides)
        elif overrides:
            settings = ClientSettings(**{**settings.model_dump(), **overrides})
        self.settings = settings
        self.topic = topic or settings.results_topic
        self.group_id = group_id
        self.from_beginning = from_beginning
        self.stats = ListenerStats()
        self._commit_interval_s = commit_interval_s
        self._seen = SeenIds(settings.seen_ids_max, settings.seen_ids_ttl_s)
        self._store = PayloadStore(settings.store) if settings.store.enabled else None
        self._reader: TopicReader | None = None
        self._group: AIOKafkaConsumer | None = None
        self._buffer: deque[ConsumerRecord[bytes, bytes]] = deque()
        self._done: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._last: ConsumerRecord[bytes, bytes] | None = None
        self._last_commit = time.monotonic()
        self._closed = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        s = self.settings
        async with asyncio.timeout(s.start_timeout_s):
            if self.group_id is None:
                partitions = await topic_partitions(s, self.topic)
                self._reader = TopicReader(s, self.topic, client_suffix="listener")
                await self._reader.start(partitions, "beginning" if self.from_beginning else "end")
                return
            self._group = AIOKafkaConsumer(
                bootstrap_servers=s.bootstrap_servers,
                client_id=f"{s.client_id}-listener",
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest" if self.from_beginning else "latest",
                fetch_max_bytes=s.fetch_max_bytes,
                max_partition_fetch_bytes=s.fetch_max_bytes,
                isolation_level="read_committed",  # see _kafka.TopicReader
                **s.kafka_security(),
            )
            await self._group.start()
            self._group.subscribe([self.topic], listener=_GroupCallbacks(self))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            self._mark_last_done()
            try:
                await self._commit()
            except KafkaError as exc:
                log.warning("final commit failed (%r); uncommitted results will come again", exc)
            await self._group.stop()
        if self._reader is not None:
            await self._reader.stop()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self

    async def __anext__(self) -> Item:
        if self._closed:
            raise StopAsyncIteration
        self._mark_last_done()
        if (
            self._group is not None
            and time.monotonic() - self._last_commit > self._commit_interval_s
        ):
            await self._commit()
        while True:
            while not self._buffer:
                # Not `self._buffer.extend(await ...)`: a rebalance during the await edits the
                # buffer, and the records must land in the buffer as it is afterwards.
                fetched = await self._fetch()
                self._buffer.extend(fetched)
            record = self._buffer.popleft()
            self._last = record
            item = await self._decode(record)
            if item.request_id is not None:
                if item.request_id in self._seen:
                    self.stats.duplicates += 1
                    self._mark_last_done()
                    continue
                self._seen.add(item.request_id, Finished.ANSWERED)
            self.stats.yielded += 1
            return item

    async def _fetch(self) -> list[ConsumerRecord[bytes, bytes]]:
        try:
            if self._reader is not None:
                return await self._reader.fetch(_FETCH_TIMEOUT_S)
            assert self._group is not None
            batches = await self._group.getmany(timeout_ms=round(_FETCH_TIMEOUT_S * 1000))
            return [r for records in batches.values() for r in records]
        except KafkaError as exc:
            log.warning("reading %s failed (%r); retrying", self.topic, exc)
            await asyncio.sleep(_READ_RETRY_S)
            return []

    async def _decode(self, record: ConsumerRecord[bytes, bytes]) -> Item:
        body = record.value or b""
        try:
            key = record.key.decode("ascii") if record.key else None
        except UnicodeDecodeError:
            key = None
        if len(body) > self.settings.offload_bytes:
            outcome = await asyncio.to_thread(_wire.decode_answer, body, record.headers, key)
        else:
            outcome = _wire.decode_answer(body, record.headers, key)
        if isinstance(outcome, StoredResult):
            # A listener only reads: the requester deletes the object once it has the factors.
            return await _wire.fetch_stored(self._store, outcome, delete=False)
        return outcome

    def _mark_last_done(self) -> None:
        last, self._last = self._last, None
        if last is not None and self._group is not None:
            self._done[TopicPartition(last.topic, last.partition)] = last.offset + 1

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        assert self._group is not None
        offsets = {
            tp: OffsetAndMetadata(offset, "")
            for tp, offset in self._done.items()
            if only is None or tp in only
        }
        if offsets:
            await self._group.commit(offsets)
        for tp in offsets:
            self._done.pop(tp, None)
        self._last_commit = time.monotonic()

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        # A partition the group never committed would start wherever "latest" is at each join,
        # skipping what arrived in between; pinning the first position makes the start fixed.
        assert self._group is not None
        for tp in assigned:
            if await self._group.committed(tp) is None:
                position = await self._group.position(tp)
                await self._group.commit({tp: OffsetAndMetadata(position, "")})

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        # Commit what was processed before the partitions move; what was fetched but not yet
        # yielded is dropped here and delivered by their new owner.
        try:
            await self._commit(revoked)
        except KafkaError as exc:
            log.warning("commit on revocation failed (%r); those results will come again", exc)
        kept = [r for r in self._buffer if TopicPartition(r.topic, r.partition) not in revoked]
        self._buffer.clear()
        self._buffer.extend(kept)


class _GroupCallbacks(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: ResultsListener) -> None:
        self._listener = listener

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._listener._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._listener._assigned(set(assigned))
