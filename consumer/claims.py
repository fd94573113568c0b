"""Deleting stored request objects once nobody can need them again (the claim check's end).

A stored request's object is deleted after its result is safe: in exactly_once, once the
transaction holding the result and the offset past it committed; in at_least_once, once the
group's committed offset passed the request, since until then a restart redelivers it and it
would be read again. A failed request keeps its object, for its dead letter's replay. A revoked
partition's pending deletions are dropped: its next owner answers again and deletes then.
Anything left behind (a crash between commit and delete) is the bucket lifecycle rule's
(docs/operations.md, "Object store").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from aiokafka import TopicPartition

from consumer.metrics import Metrics
from consumer.tasks import TaskSet
from objectstore import PayloadStore, StoreError

log = logging.getLogger(__name__)


class Claims:
    """Pending deletions, per partition, in the order answers were delivered."""

    def __init__(self, store: PayloadStore | None, tasks: TaskSet, metrics: Metrics) -> None:
        self._store = store
        self._tasks = tasks
        self._metrics = metrics
        self._pending: dict[TopicPartition, list[tuple[int, str]]] = {}

    def answered(self, tp: TopicPartition, offset: int, url: str) -> None:
        """The request at ``offset`` was answered; delete its object once that is committed."""
        if self._store is not None:
            self._pending.setdefault(tp, []).append((offset, url))

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        """The group's positions now stand at ``offsets``: every answer below is final."""
        for tp, position in offsets.items():
            pending = self._pending.get(tp)
            if not pending:
                continue
            done = [url for offset, url in pending if offset < position]
            self._pending[tp] = [(o, u) for o, u in pending if o >= position]
            for url in done:
                self.delete(url)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._pending.pop(tp, None)

    def delete(self, url: str) -> None:
        """Delete now (its answer is committed), in the background."""
        if self._store is not None:
            self._tasks.spawn(self._delete(self._store, url), name=f"delete {url[:80]}")

    async def _delete(self, store: PayloadStore, url: str) -> None:
        try:
            await store.delete_async(url)
        except StoreError as exc:
            self._metrics.store_deletes.labels("failed").inc()
            log.warning(
                "could not delete the answered request's object %s (%s); the bucket's "
                "lifecycle rule removes it", url, exc.message,
            )  # fmt: skip
            return
        self._metrics.store_deletes.labels("deleted").inc()

    @property
    def pending(self) -> int:
        return sum(len(p) for p in self._pending.values())
