"""consumer.pool with real worker processes and real shared memory.

Waits are on conditions with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiokafka.structs import ConsumerRecord

from consumer import admission, worker
from consumer.compute import quality, relative_tolerance
from consumer.jobs import (
    Answered,
    JobOutcome,
    PreparedJob,
    Record,
    Refused,
    WorkerContext,
    prepare_job,
)
from consumer.pool import (
    PoolClosed,
    PoolUnavailable,
    RemoteTraceback,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
    WorkerPool,
    WorkerStartError,
)
from consumer.shm import segment_prefix
from schemas import codec
from schemas.errors import ErrorCode
from schemas.limits import DecodeLimits
from tests.support.kafka_io import make_request

pytestmark = pytest.mark.usefixtures("no_leaked_segments")

DEADLINE = 60.0  # generous: the machine is small and shared


class Lifecycle:
    """Records the pool's hooks, as the consumer's metrics would."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.exited: dict[int, int | None] = {}

    def on_started(self, pid: int) -> None:
        self.started.append(pid)

    def on_exited(self, pid: int, exitcode: int | None) -> None:
        assert pid not in self.exited, "exited twice"
        self.exited[pid] = exitcode


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _until(predicate: Callable[[], bool], limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
def lifecycle() -> Lifecycle:
    return Lifecycle()


@pytest.fixture
async def pool(lifecycle: Lifecycle) -> AsyncIterator[WorkerPool]:
    p = WorkerPool(
        2, 1, on_worker_started=lifecycle.on_started, on_worker_exited=lifecycle.on_exited
    )
    await p.start()
    yield p
    await p.close(timeout=10)
    assert p.workers_alive == 0
    assert sorted(lifecycle.exited) == sorted(lifecycle.started)
    assert not any(_alive(pid) for pid in lifecycle.started)
    assert multiprocessing.active_children() == []


def _matrix(shape: tuple[int, int], dtype: npt.DTypeLike = np.float64, seed: int = 0) -> Any:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


CONTEXT = WorkerContext(DecodeLimits(), instance_id="test", host="here")


@dataclass(frozen=True)
class Task:
    """One request, as a test writes it: a matrix and its options."""

    matrix: Any
    full_matrices: bool = False
    compute_uv: bool = True
    k: int | None = None
    quality: bool = False
    fault: str | None = None

    def record(self) -> Record:
        """The record the producer would send, with the room admission reserves for it."""
        options = {"full_matrices": self.full_matrices, "compute_uv": self.compute_uv,
                   "k": self.k, "quality": self.quality}  # fmt: skip
        _, message = make_request(self.matrix, options=options)
        record = ConsumerRecord(
            topic="svd-requests", partition=0, offset=0, timestamp=0, timestamp_type=0,
            key=message.key, value=message.value, checksum=None, serialized_key_size=0,
            serialized_value_size=len(message.value), headers=tuple(message.headers),
        )  # fmt: skip
        ticket = admission.price(record, CONTEXT.limits)
        return Record(message.value, message.headers, None, ticket.answer_bytes, self.fault)


def _prepare(tasks: list[Task], *, attempt: int = 1) -> PreparedJob:
    return prepare_job([t.record() for t in tasks], CONTEXT, attempt=attempt)


def _reply(prepared: PreparedJob, outcome: JobOutcome, index: int = 0) -> codec.DecodedResult:
    """Item ``index``'s answer, read from the block and decoded as the requester would."""
    item = outcome.items[index]
    assert isinstance(item, Answered), item
    with prepared.answer(index, item) as value:
        reply = codec.decode_reply(bytes(value), list(item.headers))
    assert isinstance(reply, codec.DecodedResult)
    return reply


async def _solve(pool: WorkerPool, task: Task) -> JobOutcome:
    """Run one task and check its factors against the input."""
    with _prepare([task]) as prepared:
        outcome = await pool.run(prepared.job, timeout=DEADLINE)
        _check(prepared, outcome, 0, task)
    return outcome


def _check(prepared: PreparedJob, outcome: JobOutcome, index: int, task: Task) -> None:
    out = _reply(prepared, outcome, index)
    a = task.matrix
    assert out.s.dtype == a.dtype
    reference = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    k = task.k or min(a.shape)
    tol = relative_tolerance(a.dtype, a.size)
    np.testing.assert_allclose(out.s, reference[:k], rtol=0, atol=tol * reference[0])
    if task.compute_uv:
        assert out.u is not None and out.vt is not None
        assert (out.u.shape, out.vt.shape) == ((a.shape[0], k), (k, a.shape[1]))
        recon, orth = quality(a, out.u, out.s, out.vt)
        assert orth < tol
        if task.k is None:
            assert recon < tol
    else:
        assert out.u is None and out.vt is None


async def test_jobs_run_on_all_workers_and_results_are_right(
    pool: WorkerPool, lifecycle: Lifecycle
) -> None:
    tasks = [
        Task(_matrix((60, 20), seed=1), quality=True),
        Task(_matrix((20, 60), np.float32, seed=2)),
        Task(_matrix((33, 33), seed=3), compute_uv=False),
        Task(_matrix((50, 40), np.float32, seed=4), k=7),
        Task(_matrix((30, 10), seed=5), full_matrices=True),
        Task(_matrix((45, 45), seed=6)),
    ]
    # More callers than workers: the extra ones wait for an idle worker.
    checked = await asyncio.gather(*(_full_check(pool, t) for t in tasks))
    outcomes = [outcome for outcome, _ in checked]
    assert {o.pid for o in outcomes} == set(lifecycle.started)  # both workers served
    first = checked[0][1].meta
    assert first.driver == "gesdd" and first.algorithm == "dense"
    assert first.quality is not None and first.quality.reconstruction_error < 1e-12
    assert first.worker.pid == outcomes[0].pid  # the worker that answered says so
    assert checked[3][1].meta.algorithm == "dense-topk"
    assert outcomes[0].blas_threads == 1
    assert pool.idle_workers == pool.workers_alive == 2


async def _full_check(pool: WorkerPool, task: Task) -> tuple[JobOutcome, codec.DecodedResult]:
    with _prepare([task]) as prepared:
        outcome = await pool.run(prepared.job, timeout=DEADLINE)
        out = _reply(prepared, outcome)
        if task.full_matrices:
            m, n = task.matrix.shape
            assert out.u is not None and out.vt is not None
            assert out.u.shape == (m, m) and out.vt.shape == (n, n)
            recon, _ = quality(task.matrix, out.u, out.s, out.vt)
            assert recon < 1e-12
        else:
            _check(prepared, outcome, 0, task)
    return outcome, out


async def test_multi_item_job(pool: WorkerPool) -> None:
    tasks = [
        Task(_matrix((8, 5), seed=7)),
        Task(_matrix((5, 9), np.float32, seed=8), k=2),
        Task(_matrix((6, 6), seed=9), compute_uv=False),
    ]
    with _prepare(tasks) as prepared:
        outcome = await pool.run(prepared.job, timeout=DEADLINE)
        assert len(outcome.items) == 3
        for index, task in enumerate(tasks):
            _check(prepared, outcome, index, task)


async def test_a_hung_worker_does_not_hold_up_the_other(pool: WorkerPool) -> None:
    a = _matrix((10, 10))
    with _prepare([Task(a, fault="hang")]) as hung:
        stuck = asyncio.ensure_future(pool.run(hung.job, timeout=None))
        await _until(lambda: pool.idle_workers == 1)
        await _solve(pool, Task(_matrix((40, 30))))  # served while the other one hangs
        assert not stuck.done()
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    await _until(lambda: pool.idle_workers == 2)


@pytest.mark.parametrize(
    ("fault", "signum"), [("segfault", signal.SIGSEGV), ("kill", signal.SIGKILL)]
)
async def test_crash_affects_only_its_task(
    pool: WorkerPool, lifecycle: Lifecycle, fault: str, signum: signal.Signals
) -> None:
    with (
        _prepare([Task(_matrix((20, 20)), fault=fault)]) as prepared,
        pytest.raises(WorkerCrashed) as caught,
    ):
        await pool.run(prepared.job, timeout=DEADLINE)
    crashed = caught.value
    assert crashed.signal == signum and crashed.exitcode == -signum
    assert crashed.retryable
    assert not _alive(crashed.pid)
    await _until(lambda: pool.workers_alive == 2 and pool.idle_workers == 2)
    assert len(lifecycle.started) == 3
    await _until(lambda: crashed.pid in lifecycle.exited)
    assert lifecycle.exited[crashed.pid] == -signum
    outcomes = await asyncio.gather(*(_solve(pool, Task(_matrix((30, 20)))) for _ in range(4)))
    assert crashed.pid not in {o.pid for o in outcomes}


async def test_timeout_kills_and_replaces_the_worker(
    pool: WorkerPool, lifecycle: Lifecycle
) -> None:
    with _prepare([Task(_matrix((20, 20)), fault="hang")]) as prepared:
        started = time.monotonic()
        with pytest.raises(TaskTimeout) as caught:
            await pool.run(prepared.job, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 10  # and not the hang's "forever"
    assert caught.value.timeout == 0.5 and not caught.value.retryable
    await _until(lambda: lifecycle.exited.get(caught.value.pid) == -signal.SIGKILL)
    await _until(lambda: pool.workers_alive == 2 and pool.idle_workers == 2)
    await _solve(pool, Task(_matrix((25, 15))))


async def test_failures_keep_the_worker(lifecycle: Lifecycle) -> None:
    async with WorkerPool(1, 1, on_worker_started=lifecycle.on_started) as pool:
        # A job that fails as a whole (here its block is gone) is the worker's reply, with the
        # worker's traceback; the worker carries on.
        with _prepare([Task(_matrix((6, 4)))]) as prepared:
            block = replace(prepared.job.block, name=f"{segment_prefix()}no-such-segment")
            with pytest.raises(TaskFailed) as caught:
                await pool.run(replace(prepared.job, block=block), timeout=DEADLINE)
        failed = caught.value
        assert (failed.kind, failed.error_type) == ("internal", "FileNotFoundError")
        assert not failed.retryable
        assert isinstance(failed.__cause__, RemoteTraceback)
        assert "AttachedBlock" in str(failed.__cause__)

        # What fails for one request is that item's answer; its neighbours are answered.
        tasks = [
            Task(_matrix((6, 4)), fault="raise"),  # a bug in the worker
            Task(_matrix((6, 4)), fault="explode"),  # no such fault
            Task(_matrix((6, 4), seed=1)),
        ]
        records = [t.record() for t in tasks]
        records.insert(2, Record(b"not a request", [], None, 4096))
        with prepare_job(records, CONTEXT) as prepared:
            outcome = await pool.run(prepared.job, timeout=DEADLINE)
            raised, unknown, garbage, _ = outcome.items
            assert isinstance(raised, Refused) and raised.code == ErrorCode.INTERNAL
            assert "InjectedFault" in raised.message and raised.computed
            assert isinstance(unknown, Refused) and unknown.code == ErrorCode.INVALID_SCHEMA
            assert "unknown fault" in unknown.message
            assert isinstance(garbage, Refused) and garbage.code == ErrorCode.INVALID_ENCODING
            assert not garbage.computed and garbage.request_id is None
            _check(prepared, outcome, 3, tasks[2])

        again = await _solve(pool, Task(_matrix((6, 4))))
        assert again.pid == outcome.pid == failed.pid  # the same worker, still serving
        assert lifecycle.started == [failed.pid]


def test_failure_kinds() -> None:
    memory = worker._failure(MemoryError("no room"))
    assert (memory.kind, memory.retryable, memory.error_type) == ("resources", True, "MemoryError")
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        bug = worker._failure(exc)
    assert (bug.kind, bug.retryable, bug.message) == ("internal", False, "a bug")
    assert "RuntimeError: a bug" in bug.traceback and "test_failure_kinds" in bug.traceback


@pytest.mark.parametrize("fault", ["segfault_once", "kill_once"])
async def test_once_faults_fire_on_the_first_attempt_only(pool: WorkerPool, fault: str) -> None:
    a = _matrix((12, 9))
    with _prepare([Task(a, fault=fault)]) as prepared:
        assert prepared.job.attempt == 1
        with pytest.raises(WorkerCrashed):
            await pool.run(prepared.job, timeout=DEADLINE)
        retry = replace(prepared.job, attempt=2)  # a retry in the same block
        outcome = await pool.run(retry, timeout=DEADLINE)
        _check(prepared, outcome, 0, Task(a))
    with _prepare([Task(a, fault=fault)], attempt=2) as prepared:
        await pool.run(prepared.job, timeout=DEADLINE)


async def test_cancelling_run_replaces_the_worker(pool: WorkerPool, lifecycle: Lifecycle) -> None:
    with _prepare([Task(_matrix((10, 10)), fault="hang")]) as prepared:
        running = asyncio.ensure_future(pool.run(prepared.job, timeout=None))
        await _until(lambda: pool.idle_workers == 1)
        busy = set(lifecycle.started)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    await _until(lambda: len(lifecycle.exited) == 1)
    (victim,) = lifecycle.exited
    assert victim in busy and lifecycle.exited[victim] == -signal.SIGKILL
    await _until(lambda: pool.workers_alive == 2 and pool.idle_workers == 2)
    await _solve(pool, Task(_matrix((16, 16))))


async def test_cancelling_a_waiting_caller_loses_no_worker(pool: WorkerPool) -> None:
    with _prepare([Task(_matrix((10, 10)), fault="hang")]) as hung:
        stuck = [asyncio.ensure_future(pool.run(hung.job)) for _ in range(2)]
        await _until(lambda: pool.idle_workers == 0)
        waiting = asyncio.ensure_future(_solve(pool, Task(_matrix((8, 8)))))
        await asyncio.sleep(0)  # let it start waiting
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
    await _until(lambda: pool.workers_alive == 2 and pool.idle_workers == 2)
    await asyncio.wait_for(_solve(pool, Task(_matrix((8, 8)))), DEADLINE)


async def test_an_idle_worker_that_dies_is_replaced(pool: WorkerPool, lifecycle: Lifecycle) -> None:
    victim = lifecycle.started[0]
    os.kill(victim, signal.SIGKILL)
    await _until(lambda: lifecycle.exited.get(victim) == -signal.SIGKILL)
    await _until(lambda: pool.workers_alive == 2 and len(lifecycle.started) == 3)
    outcomes = await asyncio.gather(*(_solve(pool, Task(_matrix((20, 20)))) for _ in range(2)))
    assert victim not in {o.pid for o in outcomes}


async def test_close_lets_running_tasks_finish(lifecycle: Lifecycle) -> None:
    pool = WorkerPool(
        1, 1, on_worker_started=lifecycle.on_started, on_worker_exited=lifecycle.on_exited
    )
    await pool.start()
    task = Task(_matrix((300, 300), seed=11))
    with _prepare([task]) as prepared:
        running = asyncio.ensure_future(pool.run(prepared.job, timeout=DEADLINE))
        await _until(lambda: pool.idle_workers == 0)
        await pool.close(timeout=DEADLINE)
        outcome = await running  # finished, not killed
        _check(prepared, outcome, 0, task)
    assert lifecycle.exited == {outcome.pid: 0}  # exited on request, not killed
    with pytest.raises(PoolClosed):
        await pool.run(prepared.job)
    with pytest.raises(PoolClosed):
        await pool.start()


async def test_close_kills_stragglers_and_leaves_no_process(lifecycle: Lifecycle) -> None:
    pool = WorkerPool(
        2, 1, on_worker_started=lifecycle.on_started, on_worker_exited=lifecycle.on_exited
    )
    await pool.start()
    with _prepare([Task(_matrix((10, 10)), fault="hang")]) as prepared:
        stuck = asyncio.ensure_future(pool.run(prepared.job, timeout=None))
        await _until(lambda: pool.idle_workers == 1)
        # One loop step dispatches it: acquiring an idle worker does not suspend.
        quick = asyncio.ensure_future(_solve(pool, Task(_matrix((5, 5)))))
        await asyncio.sleep(0)
        assert pool.idle_workers == 0
        await pool.close(timeout=0.5)
        with pytest.raises(PoolClosed):
            await stuck
        await quick  # it finished within the grace period
    assert pool.workers_alive == pool.idle_workers == 0
    assert sorted(lifecycle.exited) == sorted(lifecycle.started)
    assert sorted(lifecycle.exited.values(), key=str) == sorted([0, -signal.SIGTERM], key=str)
    assert not any(_alive(pid) for pid in lifecycle.started)
    assert multiprocessing.active_children() == []
    await pool.close(timeout=1)  # idempotent


async def test_waiters_are_released_by_close(pool: WorkerPool) -> None:
    with _prepare([Task(_matrix((10, 10)), fault="hang")]) as hung:
        stuck = [asyncio.ensure_future(pool.run(hung.job)) for _ in range(2)]
        await _until(lambda: pool.idle_workers == 0)
        waiting = asyncio.ensure_future(pool.run(hung.job))
        await asyncio.sleep(0)
        await pool.close(timeout=0.2)
        for task in [*stuck, waiting]:
            with pytest.raises(PoolClosed):
                await task


async def test_start_failure_is_surfaced_and_leaves_nothing(lifecycle: Lifecycle) -> None:
    pool = WorkerPool(
        2,
        1,
        start_timeout=1e-6,
        on_worker_started=lifecycle.on_started,
        on_worker_exited=lifecycle.on_exited,
    )
    with pytest.raises(WorkerStartError):
        await pool.start()
    assert pool.workers_alive == 0
    await _until(lambda: sorted(lifecycle.exited) == sorted(lifecycle.started))
    assert not any(_alive(pid) for pid in lifecycle.started)


async def test_failing_replacements_back_off_and_surface(
    pool: WorkerPool, lifecycle: Lifecycle
) -> None:
    pool._start_timeout = 1e-6  # every new worker now "fails to start"
    for pid in list(lifecycle.started):
        os.kill(pid, signal.SIGKILL)
    await _until(lambda: pool.workers_alive == 0 and pool.last_start_error is not None)
    with (
        _prepare([Task(_matrix((4, 4)))]) as prepared,
        pytest.raises(PoolUnavailable) as caught,
    ):
        await pool.run(prepared.job)
    assert isinstance(caught.value.__cause__, WorkerStartError)
    # Not hot: each slot retries after 0.5 s, then 1 s, ... A hot loop would make these four
    # attempts within milliseconds; the backoff needs over a second whatever the load.
    attempts, since = len(lifecycle.started), time.monotonic()
    await _until(lambda: len(lifecycle.started) >= attempts + 4)
    assert time.monotonic() - since >= 1.0
    pool._start_timeout = 60.0  # starting works again: the backoff retries recover the pool
    await _until(lambda: pool.workers_alive == 2 and pool.last_start_error is None)
    await _solve(pool, Task(_matrix((9, 9))))


async def test_spawn_context(lifecycle: Lifecycle) -> None:
    async with WorkerPool(
        1,
        1,
        mp_context="spawn",
        on_worker_started=lifecycle.on_started,
        on_worker_exited=lifecycle.on_exited,
    ) as pool:
        outcome = await _solve(pool, Task(_matrix((20, 10))))
        with (
            _prepare([Task(_matrix((5, 5)), fault="kill")]) as prepared,
            pytest.raises(WorkerCrashed),
        ):
            await pool.run(prepared.job)
        await _until(lambda: pool.workers_alive == 1)
        assert (await _solve(pool, Task(_matrix((20, 10))))).pid != outcome.pid
    assert sorted(lifecycle.exited) == sorted(lifecycle.started)


def test_fork_is_refused() -> None:
    with pytest.raises(ValueError, match="fork"):
        WorkerPool(1, 1, mp_context="fork")
