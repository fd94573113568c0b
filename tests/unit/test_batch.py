"""Micro-batching (consumer/batch.py) with real workers and real shared memory.

Behaviour, not timings: every request of a batch is answered with its own factors, mixed sizes
included; an answer stays in its block until it is released, and the block goes back only when
the last answer in it is; a batch whose worker dies leaves no segment behind and, through the
Dispatcher, every request is still answered correctly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord

from consumer import admission
from consumer.batch import Batcher, BatchFailed, Delivery
from consumer.dispatch import Dispatcher
from consumer.flow import Budget, InFlight
from consumer.jobs import Answered, Record, WorkerContext
from consumer.metrics import Metrics
from consumer.pool import WorkerPool
from consumer.settings import ConsumerSettings
from consumer.shm import SegmentCache
from schemas import SvdRequestMeta, codec
from schemas.limits import DecodeLimits
from tests.support.kafka_io import make_request
from tests.support.sparse import random_sparse

pytestmark = pytest.mark.usefixtures("no_leaked_segments")

DEADLINE = 60.0
LIMITS = DecodeLimits()
CONTEXT = WorkerContext(LIMITS, instance_id="test", host=socket.gethostname())


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    p = WorkerPool(2, 1)
    await p.start()
    yield p
    await p.close(timeout=10)


def _matrix(rows: int, cols: int, seed: int) -> Any:
    return np.random.default_rng(seed).standard_normal((rows, cols))


def _consumer_record(
    message: codec.EncodedMessage, offset: int = 0
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="t", partition=0, offset=offset, timestamp=0, timestamp_type=0,
        key=message.key, value=message.value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(message.value), headers=tuple(message.headers),
    )  # fmt: skip


def _record(message: codec.EncodedMessage, fault: str | None = None) -> Record:
    """A record as the dispatcher hands it over: the room for its answer priced at admission."""
    ticket = admission.price(_consumer_record(message), LIMITS)
    return Record(
        message.value, message.headers, None, ticket.answer_bytes, fault, sparse=ticket.sparse
    )


def _request(a: Any, fault: str | None = None, **fields: Any) -> Record:
    return _record(make_request(a, **fields)[1], fault)


def _factors(delivery: Delivery) -> tuple[Any, Any, Any]:
    """What a caller keeps: the answer decoded (a copy), then the block's share released."""
    try:
        outcome = delivery.outcome
        assert isinstance(outcome, Answered) and delivery.value is not None, outcome
        reply = codec.decode_reply(bytes(delivery.value), list(outcome.headers))
    finally:
        delivery.release()
    assert isinstance(reply, codec.DecodedResult)
    assert reply.u is not None and reply.vt is not None
    return reply.u, reply.s, reply.vt


def _reconstructs(a: Any, factors: tuple[Any, Any, Any]) -> bool:
    u, s, vt = factors
    return bool(np.allclose((u * s) @ vt, a, atol=1e-9 * max(a.shape)))


async def _until(predicate: Callable[[], bool], limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


def _batcher(pool: Any, **options: Any) -> Batcher:
    options = {"max_items": 16, "item_max_bytes": 1 << 20, "timeout_s": DEADLINE, **options}
    return Batcher(pool, CONTEXT, **options)


async def test_every_request_of_a_batch_gets_its_own_factors(pool: WorkerPool) -> None:
    batcher = _batcher(pool)
    shapes = [(8, 8), (32, 32), (40, 12), (12, 40), (64, 64), (1, 5)]
    matrices = [_matrix(*shapes[i % len(shapes)], seed=i) for i in range(90)]
    deliveries = await asyncio.gather(*(batcher.run(_request(a)) for a in matrices))
    results = [_factors(d) for d in deliveries]
    assert all(_reconstructs(a, r) for a, r in zip(matrices, results, strict=True))
    assert batcher.items == 90
    # Two slots and 90 requests at once: all but the first two waited and went in batches.
    assert 2 < batcher.batches <= 2 + -(-88 // 16)


async def test_a_lone_request_goes_at_once_alone(pool: WorkerPool) -> None:
    batcher = _batcher(pool)
    a = _matrix(16, 16, seed=1)
    assert _reconstructs(a, _factors(await batcher.run(_request(a))))
    assert (batcher.batches, batcher.items) == (1, 1)


class Sized:
    size = 2


def test_what_is_batched() -> None:
    batcher = _batcher(Sized(), max_items=8, item_max_bytes=32 * 32 * 8)
    assert batcher.accepts(_request(np.ones((16, 32))))
    assert batcher.accepts(_request(np.ones((20, 20)), encoding=codec.Encoding.JSON))
    assert not batcher.accepts(_request(np.ones((33, 32))))  # too big: alone
    assert not batcher.accepts(_request(np.ones((4, 4)), fault="kill"))
    off = _batcher(Sized(), max_items=1)
    assert not off.accepts(_request(np.ones((4, 4))))


def test_a_matrix_up_to_the_item_size_is_batched() -> None:
    # batch_item_max_bytes: "matrices up to this size are micro-batched" (consumer/settings.py)
    batcher = _batcher(Sized(), max_items=8, item_max_bytes=32 * 32 * 8)
    assert batcher.accepts(_request(np.ones((32, 32))))


def test_a_sparse_matrix_is_never_batched() -> None:
    # Small in bytes, but not in work: a large sparse matrix would hold up the small ones
    # sharing its task, whatever the size of its answer.
    batcher = _batcher(Sized(), max_items=8, item_max_bytes=32 * 32 * 8)
    sparse = random_sparse(np.random.default_rng(1), (5000, 5000), density=1e-5, fmt="coo")
    for options in ({"k": 2}, {"k": 1, "compute_uv": False}):
        meta = SvdRequestMeta(request_id="sparse-1", matrix=sparse.spec(), options=options)
        message = codec.encode_request(meta, sparse, codec.Encoding.BINARY)
        assert len(message.value) <= 32 * 32 * 8
        assert not batcher.accepts(_record(message)), options


async def test_a_batch_whose_worker_dies_fails_as_a_whole_and_leaks_nothing(
    pool: WorkerPool,
) -> None:
    batcher = _batcher(pool, max_items=64, slots=1)
    # The faulty item kills its worker mid-batch (the Dispatcher never batches faults; here it
    # stands for an OOM kill).
    matrices = [_matrix(24, 24, seed=i) for i in range(10)]
    records = [_request(a) for a in matrices]
    records.insert(5, _request(_matrix(24, 24, seed=99), fault="kill"))
    outcomes = await asyncio.gather(*(batcher.run(r) for r in records), return_exceptions=True)
    # The first went alone (one slot, nothing running); the other ten, the faulty one among
    # them, waited and went as one batch.
    assert isinstance(outcomes[0], Delivery)
    assert _reconstructs(matrices[0], _factors(outcomes[0]))
    assert all(isinstance(o, BatchFailed) for o in outcomes[1:])
    # The pool replaced its worker and serves the next batch.
    await _until(lambda: pool.workers_alive == 2)
    a = _matrix(24, 24, seed=7)
    assert _reconstructs(a, _factors(await batcher.run(_request(a))))


async def test_a_cancelled_request_does_not_disturb_its_batch(pool: WorkerPool) -> None:
    cache = SegmentCache(max_bytes=64 << 20)
    batcher = _batcher(pool, max_items=64, slots=1, cache=cache)
    first = asyncio.create_task(batcher.run(_request(_matrix(200, 200, 0))))
    queued = [_matrix(16, 16, seed=i) for i in range(6)]
    waiting = [asyncio.create_task(batcher.run(_request(a))) for a in queued]
    await asyncio.sleep(0)
    waiting[2].cancel()
    results = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    _factors(results[0])  # type: ignore[arg-type]
    for i, a in enumerate(queued):
        if i != 2:
            assert _reconstructs(a, _factors(results[1 + i]))  # type: ignore[arg-type]
    # Every block came back to the cache: the cancelled request's share too.
    assert len(cache.idle_names) == batcher.batches == 2
    cache.close()


class Gated:
    """The pool behind a gate per job: the test lets each job through when it wants."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.size = pool.size
        self.gates: list[asyncio.Event] = []

    async def run(self, job: Any, timeout: float | None = None) -> Any:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return await self.pool.run(job, timeout=timeout)


async def test_a_request_cancelled_while_its_batch_runs_gives_its_share_back(
    pool: WorkerPool,
) -> None:
    cache = SegmentCache(max_bytes=64 << 20)
    gated = Gated(pool)
    batcher = _batcher(gated, max_items=64, slots=1, cache=cache)
    first = asyncio.create_task(batcher.run(_request(_matrix(8, 8, 0))))
    kept = asyncio.create_task(batcher.run(_request(_matrix(8, 8, 1))))
    dropped = asyncio.create_task(batcher.run(_request(_matrix(8, 8, 2))))
    await _until(lambda: len(gated.gates) == 1)
    gated.gates[0].set()  # the first, alone; then kept and dropped, as one batch
    await _until(lambda: len(gated.gates) == 2)
    dropped.cancel()  # its batch is under way: its answer will arrive for nobody
    gated.gates[1].set()
    _factors(await first)
    kept_delivery = await kept
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert len(cache.idle_names) == 1  # the first batch's block; the second is still held
    _factors(kept_delivery)
    assert len(cache.idle_names) == 2  # the last answer released: its block is back too
    cache.close()


async def test_answers_stay_in_their_block_until_released(pool: WorkerPool) -> None:
    cache = SegmentCache(max_bytes=64 << 20)
    batcher = _batcher(pool, max_items=64, slots=1, cache=cache)
    hold = asyncio.create_task(batcher.run(_request(_matrix(150, 150, 0))))
    matrices = [_matrix(10, 10, seed=i) for i in range(5)]
    deliveries = await asyncio.gather(*(batcher.run(_request(a)) for a in matrices))
    _factors(await hold)
    assert batcher.batches == 2 and len(cache.idle_names) == 1
    for delivery in deliveries[:-1]:
        _factors(delivery)
        assert len(cache.idle_names) == 1  # others still read from it
    delivery = deliveries[-1]
    assert _reconstructs(matrices[-1], _factors(delivery))
    assert len(cache.idle_names) == 2
    delivery.release()  # idempotent
    assert len(cache.idle_names) == 2
    cache.close()


async def test_a_worker_killed_under_a_batch_still_answers_every_request() -> None:
    """Through the Dispatcher: the batch fails, each request then runs alone and succeeds."""
    settings = ConsumerSettings(retry_backoff_s=0.0, batch_max_items=64)
    pids: list[int] = []
    pool = WorkerPool(1, 1, on_worker_started=pids.append)
    await pool.start()
    inflight = InFlight(Budget(max_requests=100, max_bytes=1 << 30))
    dispatcher = Dispatcher(settings, pool, Metrics(), inflight)
    try:
        matrices = [_matrix(120, 120, seed=i) for i in range(40)]
        tickets = [
            admission.price(_consumer_record(make_request(a)[1], offset), LIMITS)
            for offset, a in enumerate(matrices)
        ]

        async def answer(ticket: admission.Ticket) -> tuple[tuple[Any, Any, Any], int]:
            delivery, attempts = await dispatcher.run(ticket)
            return _factors(delivery), attempts  # published: its block's share given back

        runs = [asyncio.create_task(answer(t)) for t in tickets]
        # The first request runs alone; the other 39 gather into one batch behind it. Kill the
        # worker once that batch is on it.
        await _until(lambda: dispatcher._batcher.batches == 2)
        os.kill(pids[-1], signal.SIGKILL)
        outcomes = await asyncio.gather(*runs)
        assert dispatcher.segments.reused > 0  # the retries ran in segments given back
    finally:
        await pool.close(timeout=10)
        dispatcher.close()  # unlinks the idle segments; the autouse fixture checks
    assert len(pids) >= 2  # the killed worker was replaced
    # A batch that failed is no attempt of its requests: each was answered on its first.
    assert [attempts for _, attempts in outcomes] == [1] * 40
    for a, (factors, _) in zip(matrices, outcomes, strict=True):
        assert _reconstructs(a, factors)
