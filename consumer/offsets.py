"""Which offset may be committed, per partition, when requests finish out of order.

A request counts as done only once its answer (result, error result or dead letter) has been
acknowledged by the broker. The commit position of a partition is the offset of the oldest
request not yet done, or one past the newest request when all are done. Offsets are tracked in
arrival order rather than assumed contiguous, because compaction and transaction markers leave
gaps in a partition's offsets.

Each assignment of a partition gets its own ``PartitionLedger``. A request keeps a reference to
the ledger it was admitted under, so a request that finishes after its partition was revoked
(and perhaps assigned back) can never move the new owner's commit position.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass(eq=False)
class PartitionLedger:
    tp: TopicPartition
    _pending: deque[int] = field(default_factory=deque)
    _done: set[int] = field(default_factory=set)
    _next: int | None = None  # one past the newest offset seen, or None before the first
    revoked: bool = False

    def begin(self, offset: int) -> None:
        if self._next is not None and offset < self._next:
            raise ValueError(f"{self.tp}: offset {offset} arrived after {self._next - 1}")
        self._pending.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        if self.revoked:
            return
        self._done.add(offset)
        while self._pending and self._pending[0] in self._done:
            self._done.discard(self._pending.popleft())

    def ready_prefix(self, ready: Container[int]) -> list[int]:
        """The oldest pending offsets, in order, as long as each is in ``ready``."""
        prefix: list[int] = []
        for offset in self._pending:
            if offset not in ready:
                break
            prefix.append(offset)
        return prefix

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def commit_position(self) -> int | None:
        """The offset to commit (the next one to read), or None if nothing was seen yet."""
        if self._pending:
            return self._pending[0]
        return self._next


class OffsetTracker:
    """The ledgers of the partitions this member owns now, and what was last committed."""

    def __init__(self) -> None:
        self._ledgers: dict[TopicPartition, PartitionLedger] = {}
        self._committed: dict[TopicPartition, int] = {}

    def ledger(self, tp: TopicPartition) -> PartitionLedger:
        ledger = self._ledgers.get(tp)
        if ledger is None:
            ledger = self._ledgers[tp] = PartitionLedger(tp)
        return ledger

    def revoke(self, tps: set[TopicPartition] | list[TopicPartition]) -> None:
        for tp in tps:
            ledger = self._ledgers.pop(tp, None)
            if ledger is not None:
                ledger.revoked = True
            self._committed.pop(tp, None)

    def owned(self) -> list[TopicPartition]:
        return list(self._ledgers)

    def to_commit(self, tps: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Positions that moved since the last successful commit."""
        out: dict[TopicPartition, int] = {}
        for tp, ledger in self._ledgers.items():
            if tps is not None and tp not in tps:
                continue
            position = ledger.commit_position()
            if position is not None and position != self._committed.get(tp):
                out[tp] = position
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def last_committed(self, tp: TopicPartition) -> int | None:
        return self._committed.get(tp)
