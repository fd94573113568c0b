"""Micro-batching (consumer/batch.py) with real workers and real shared memory.

Behaviour, not timings: every request of a batch is answered with its own factors, mixed sizes
included; a batch whose worker dies leaves no segment behind and, through the Computer, every
request is still answered correctly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import scipy.sparse
from aiokafka.structs import ConsumerRecord

from consumer.batch import Batcher, BatchFailed
from consumer.handler import prepare
from consumer.metrics import Metrics
from consumer.pool import WorkerPool
from consumer.settings import ConsumerSettings
from consumer.shm import SHM_DIR, segment_prefix
from consumer.work import Computer
from consumer.worker import ItemOutcome, Outputs, SvdTask
from schemas import codec
from schemas.limits import DecodeLimits
from tests.support.kafka_io import make_request

DEADLINE = 60.0


def _segments() -> list[str]:
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(segment_prefix()))


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = _segments()
    yield
    assert _segments() == before


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    p = WorkerPool(2, 1)
    await p.start()
    yield p
    await p.close(timeout=10)


def _matrix(rows: int, cols: int, seed: int) -> Any:
    return np.random.default_rng(seed).standard_normal((rows, cols))


def _copy(item: ItemOutcome, out: Outputs, pid: int, dispatched: float) -> tuple[Any, Any, Any]:
    """What a caller keeps: copies, since the views die with the block."""
    assert out.u is not None and out.vt is not None
    return out.u.copy(), out.s.copy(), out.vt.copy()


def _reconstructs(a: Any, factors: tuple[Any, Any, Any]) -> bool:
    u, s, vt = factors
    return bool(np.allclose((u * s) @ vt, a, atol=1e-9 * max(a.shape)))


async def _until(predicate: Callable[[], bool], limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


async def test_every_request_of_a_batch_gets_its_own_factors(pool: WorkerPool) -> None:
    batcher: Batcher[tuple[Any, Any, Any]] = Batcher(
        pool, max_items=16, item_max_bytes=1 << 20, timeout_s=DEADLINE
    )
    shapes = [(8, 8), (32, 32), (40, 12), (12, 40), (64, 64), (1, 5)]
    matrices = [_matrix(*shapes[i % len(shapes)], seed=i) for i in range(90)]
    results = await asyncio.gather(*(batcher.run(SvdTask(matrix=a), _copy) for a in matrices))
    assert all(_reconstructs(a, r) for a, r in zip(matrices, results, strict=True))
    assert batcher.items == 90
    # Two slots and 90 requests at once: all but the first two waited and went in batches.
    assert 2 < batcher.batches <= 2 + -(-88 // 16)


async def test_a_lone_request_goes_at_once_alone(pool: WorkerPool) -> None:
    batcher: Batcher[tuple[Any, Any, Any]] = Batcher(
        pool, max_items=16, item_max_bytes=1 << 20, timeout_s=DEADLINE
    )
    a = _matrix(16, 16, seed=1)
    assert _reconstructs(a, await batcher.run(SvdTask(matrix=a), _copy))
    assert (batcher.batches, batcher.items) == (1, 1)


def test_what_is_batched() -> None:
    class Sized:
        size = 2

    batcher: Batcher[Any] = Batcher(
        Sized(),  # type: ignore[arg-type]
        max_items=8,
        item_max_bytes=32 * 32 * 8,
        timeout_s=1,
    )
    assert batcher.accepts(SvdTask(matrix=np.ones((32, 32))))
    assert not batcher.accepts(SvdTask(matrix=np.ones((33, 32))))  # too big: alone
    assert not batcher.accepts(SvdTask(matrix=np.ones((4, 4)), fault="kill"))
    sparse = scipy.sparse.random(5000, 5000, density=1e-5, format="csr", random_state=1)
    assert not batcher.accepts(SvdTask(matrix=sparse))  # small in bytes, not in work
    off: Batcher[Any] = Batcher(Sized(), max_items=1, item_max_bytes=1 << 20, timeout_s=1)  # type: ignore[arg-type]
    assert not off.accepts(SvdTask(matrix=np.ones((4, 4))))


async def test_a_batch_whose_worker_dies_fails_as_a_whole_and_leaks_nothing(
    pool: WorkerPool,
) -> None:
    batcher: Batcher[tuple[Any, Any, Any]] = Batcher(
        pool, max_items=64, item_max_bytes=1 << 20, timeout_s=DEADLINE, slots=1
    )
    # The faulty item kills its worker mid-batch (faults are never batched by the Computer;
    # here it stands for an OOM kill).
    tasks = [SvdTask(matrix=_matrix(24, 24, seed=i)) for i in range(10)]
    tasks.insert(5, SvdTask(matrix=_matrix(24, 24, seed=99), fault="kill"))
    outcomes = await asyncio.gather(*(batcher.run(t, _copy) for t in tasks), return_exceptions=True)
    # The first went alone (one slot, nothing running); the other ten, the faulty one among
    # them, waited and went as one batch.
    assert _reconstructs(tasks[0].matrix, outcomes[0])  # type: ignore[arg-type]
    assert all(isinstance(o, BatchFailed) for o in outcomes[1:])
    # The pool replaced its worker and serves the next batch.
    await _until(lambda: pool.workers_alive == 2)
    a = _matrix(24, 24, seed=7)
    assert _reconstructs(a, await batcher.run(SvdTask(matrix=a), _copy))


async def test_a_cancelled_request_does_not_disturb_its_batch(pool: WorkerPool) -> None:
    batcher: Batcher[tuple[Any, Any, Any]] = Batcher(
        pool, max_items=64, item_max_bytes=1 << 20, timeout_s=DEADLINE, slots=1
    )
    first = asyncio.create_task(batcher.run(SvdTask(matrix=_matrix(200, 200, 0)), _copy))
    queued = [_matrix(16, 16, seed=i) for i in range(6)]
    waiting = [asyncio.create_task(batcher.run(SvdTask(matrix=a), _copy)) for a in queued]
    await asyncio.sleep(0)
    waiting[2].cancel()
    results = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    for i, a in enumerate(queued):
        if i != 2:
            assert _reconstructs(a, results[1 + i])


def _record(message: codec.EncodedMessage, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="t", partition=0, offset=offset, timestamp=0, timestamp_type=0,
        key=message.key, value=message.value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(message.value), headers=tuple(message.headers),
    )  # fmt: skip


async def test_a_worker_killed_under_a_batch_still_answers_every_request() -> None:
    """Through the Computer: the batch fails, each request then runs alone and succeeds."""
    settings = ConsumerSettings(retry_backoff_s=0.0, batch_max_items=64)
    pids: list[int] = []
    pool = WorkerPool(1, 1, on_worker_started=pids.append)
    await pool.start()
    computer = Computer(settings, pool, Metrics())
    try:
        matrices = [_matrix(120, 120, seed=i) for i in range(40)]
        prepared = [
            prepare(_record(make_request(a)[1], offset), DecodeLimits())
            for offset, a in enumerate(matrices)
        ]
        answers = [asyncio.create_task(computer.compute(p, "host")) for p in prepared]
        # The first request runs alone; the other 39 gather into one batch behind it. Kill the
        # worker once that batch is on it.
        await _until(lambda: computer._batcher.batches == 2)
        os.kill(pids[-1], signal.SIGKILL)
        messages = await asyncio.gather(*answers)
        assert computer.segments.reused > 0  # the retries ran in segments given back
    finally:
        await pool.close(timeout=10)
        computer.close()  # unlinks the idle segments; the autouse fixture checks
    assert len(pids) >= 2  # the killed worker was replaced
    for a, message in zip(matrices, messages, strict=True):
        reply = codec.decode_reply(message.value, message.headers)
        assert isinstance(reply, codec.DecodedResult)
        assert reply.u is not None and reply.vt is not None
        assert _reconstructs(a, (reply.u, reply.s, reply.vt))
