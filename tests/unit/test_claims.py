"""consumer/claims.py: a stored request's object is deleted only once its answer is final."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import TopicPartition

from consumer.claims import Claims
from consumer.metrics import Metrics
from consumer.tasks import TaskSet
from objectstore import PayloadStore, StoreSettings

TP0, TP1 = TopicPartition("svd-requests", 0), TopicPartition("svd-requests", 1)


def _objects(store: PayloadStore) -> set[str]:
    return {entry.url.rsplit("/", 1)[-1] for entry in store.list()}


async def test_objects_are_deleted_once_the_commit_passed_their_offsets(tmp_path: Path) -> None:
    store = PayloadStore(StoreSettings(url=f"file://{tmp_path}"))
    urls = {name: store.write(f"requests/{name}", [b"x"]).url for name in ("a", "b", "c", "d")}
    tasks, metrics = TaskSet(), Metrics()
    claims = Claims(store, tasks, metrics)
    claims.answered(TP0, 10, urls["a"])
    claims.answered(TP0, 12, urls["b"])
    claims.answered(TP1, 3, urls["c"])
    claims.answered(TP1, 4, urls["d"])
    claims.committed({TP0: 11})  # the position past offset 10 only
    await tasks.wait(10)
    assert _objects(store) == {"b", "c", "d"}
    assert claims.pending == 3
    claims.forget({TP1})  # revoked before its commit: the next owner answers and deletes
    claims.committed({TP0: 13, TP1: 5})
    await tasks.wait(10)
    assert _objects(store) == {"c", "d"}
    assert claims.pending == 0
    assert metrics.store_deletes.labels("deleted")._value.get() == 2


async def test_a_failed_delete_is_counted_and_left_to_the_lifecycle_rule(tmp_path: Path) -> None:
    store = PayloadStore(StoreSettings(url=f"file://{tmp_path}"))
    tasks, metrics = TaskSet(), Metrics()
    claims = Claims(store, tasks, metrics)
    claims.delete(f"file://{tmp_path.parent}/elsewhere")  # not ours: refused, never touched
    await asyncio.wait_for(tasks.wait(), 10)
    assert metrics.store_deletes.labels("failed")._value.get() == 1


def test_without_a_store_nothing_is_pending() -> None:
    claims = Claims(None, TaskSet(), Metrics())
    claims.answered(TP0, 1, "s3://svd-payloads/requests/a")
    assert claims.pending == 0
