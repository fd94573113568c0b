"""consumer.pool with real worker processes and real shared memory.

Waits are on conditions with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from consumer import worker
from consumer.compute import quality, relative_tolerance
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
from consumer.shm import SHM_DIR, segment_prefix
from consumer.worker import JobOutcome, PreparedJob, SvdTask, prepare_job

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


def _segments() -> list[str]:
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(segment_prefix()))


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


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = _segments()
    yield
    assert _segments() == before


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


async def _solve(pool: WorkerPool, task: SvdTask) -> JobOutcome:
    """Run one task and check its factors against the input."""
    with prepare_job([task]) as prepared:
        outcome = await pool.run(prepared.job, timeout=DEADLINE)
        _check(prepared, outcome, 0, task)
    return outcome


def _check(prepared: PreparedJob, outcome: JobOutcome, index: int, task: SvdTask) -> None:
    out = prepared.outputs(outcome, index)
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
        SvdTask(_matrix((60, 20), seed=1), quality=True),
        SvdTask(_matrix((20, 60), np.float32, seed=2)),
        SvdTask(_matrix((33, 33), seed=3), compute_uv=False),
        SvdTask(_matrix((50, 40), np.float32, seed=4), k=7),
        SvdTask(_matrix((30, 10), seed=5), full_matrices=True),
        SvdTask(_matrix((45, 45), seed=6)),
    ]
    # More callers than workers: the extra ones wait for an idle worker.
    outcomes = await asyncio.gather(*(_full_check(pool, t) for t in tasks))
    assert {o.pid for o in outcomes} == set(lifecycle.started)  # both workers served
    first = outcomes[0].items[0]
    assert first.driver == "gesdd" and first.algorithm == "dense"
    assert first.quality is not None and first.quality.reconstruction < 1e-12
    assert outcomes[3].items[0].algorithm == "dense-topk"
    assert outcomes[0].blas_threads == 1
    assert pool.idle_workers == pool.workers_alive == 2


async def _full_check(pool: WorkerPool, task: SvdTask) -> JobOutcome:
    with prepare_job([task]) as prepared:
        outcome = await pool.run(prepared.job, timeout=DEADLINE)
        out = prepared.outputs(outcome)
        if task.full_matrices:
            m, n = task.matrix.shape
            assert out.u is not None and out.vt is not None
            assert out.u.shape == (m, m) and out.vt.shape == (n, n)
            recon, _ = quality(task.matrix, out.u, out.s, out.vt)
            assert recon < 1e-12
        else:
            _check(prepared, outcome, 0, task)
    return outcome


async def test_multi_item_job(pool: WorkerPool) -> None:
    tasks = [
        SvdTask(_matrix((8, 5), seed=7)),
        SvdTask(_matrix((5, 9), np.float32, seed=8), k=2),
        SvdTask(_matrix((6, 6), seed=9), compute_uv=False),
    ]
    with prepare_job(tasks) as prepared:
        outcome = await pool.run(prepared.job, timeout=DEADLINE)
        assert len(outcome.items) == 3
        for index, task in enumerate(tasks):
            _check(prepared, outcome, index, task)


async def test_a_hung_worker_does_not_hold_up_the_other(pool: WorkerPool) -> None:
    a = _matrix((10, 10))
    with prepare_job([SvdTask(a, fault="hang")]) as hung:
        stuck = asyncio.ensure_future(pool.run(hung.job, timeout=None))
        await _until(lambda: pool.idle_workers == 1)
        await _solve(pool, SvdTask(_matrix((40, 30))))  # served while the other one hangs
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
        prepare_job([SvdTask(_matrix((20, 20)), fault=fault)]) as prepared,
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
    outcomes = await asyncio.gather(*(_solve(pool, SvdTask(_matrix((30, 20)))) for _ in range(4)))
    assert crashed.pid not in {o.pid for o in outcomes}


async def test_timeout_kills_and_replaces_the_worker(
    pool: WorkerPool, lifecycle: Lifecycle
) -> None:
    with prepare_job([SvdTask(_matrix((20, 20)), fault="hang")]) as prepared:
        started = time.monotonic()
        with pytest.raises(TaskTimeout) as caught:
            await pool.run(prepared.job, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 10  # and not the hang's "forever"
    assert caught.value.timeout == 0.5 and not caught.value.retryable
    await _until(lambda: lifecycle.exited.get(caught.value.pid) == -signal.SIGKILL)
    await _until(lambda: pool.workers_alive == 2 and pool.idle_workers == 2)
    await _solve(pool, SvdTask(_matrix((25, 15))))


async def test_compute_error_keeps_the_worker(lifecycle: Lifecycle) -> None:
    async with WorkerPool(1, 1, on_worker_started=lifecycle.on_started) as pool:
        with (
            prepare_job([SvdTask(_matrix((6, 4)), fault="raise")]) as prepared,
            pytest.raises(TaskFailed) as caught,
        ):
            await pool.run(prepared.job, timeout=DEADLINE)
        failed = caught.value
        assert (failed.kind, failed.error_type) == ("internal", "InjectedFault")
        assert not failed.retryable
        assert isinstance(failed.__cause__, RemoteTraceback)
        assert "_inject" in str(failed.__cause__)

        # An invalid request that slipped past the parent's checks fails in compute.svd.
        with prepare_job([SvdTask(_matrix((6, 4)), k=2)]) as prepared:
            bad = replace(prepared.job, items=(replace(prepared.job.items[0], k=9),))
            with pytest.raises(TaskFailed) as caught:
                await pool.run(bad, timeout=DEADLINE)
        assert (caught.value.kind, caught.value.error_type) == ("invalid", "ValueError")

        outcome = await _solve(pool, SvdTask(_matrix((6, 4))))
        assert outcome.pid == failed.pid == caught.value.pid  # the same worker, still serving
        assert lifecycle.started == [failed.pid]


def test_failure_kinds() -> None:
    from consumer.compute import ComputeError

    linalg = worker._failure(ComputeError("did not converge"))
    assert (linalg.kind, linalg.retryable) == ("linalg", False)
    assert worker._failure(np.linalg.LinAlgError("x")).kind == "linalg"
    assert (worker._failure(MemoryError()).kind, worker._failure(MemoryError()).retryable) == (
        "resources",
        True,
    )


@pytest.mark.parametrize("fault", ["segfault_once", "kill_once"])
async def test_once_faults_fire_on_the_first_attempt_only(pool: WorkerPool, fault: str) -> None:
    a = _matrix((12, 9))
    with prepare_job([SvdTask(a, fault=fault)]) as prepared:
        assert prepared.job.attempt == 1
        with pytest.raises(WorkerCrashed):
            await pool.run(prepared.job, timeout=DEADLINE)
        outcome = await pool.run(prepared.with_attempt(2), timeout=DEADLINE)  # same block
        _check(prepared, outcome, 0, SvdTask(a))
    with prepare_job([SvdTask(a, fault=fault)], attempt=2) as prepared:
        await pool.run(prepared.job, timeout=DEADLINE)


async def test_cancelling_run_replaces_the_worker(pool: WorkerPool, lifecycle: Lifecycle) -> None:
    with prepare_job([SvdTask(_matrix((10, 10)), fault="hang")]) as prepared:
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
    await _solve(pool, SvdTask(_matrix((16, 16))))


async def test_cancelling_a_waiting_caller_loses_no_worker(pool: WorkerPool) -> None:
    with prepare_job([SvdTask(_matrix((10, 10)), fault="hang")]) as hung:
        stuck = [asyncio.ensure_future(pool.run(hung.job)) for _ in range(2)]
        await _until(lambda: pool.idle_workers == 0)
        waiting = asyncio.ensure_future(_solve(pool, SvdTask(_matrix((8, 8)))))
        await asyncio.sleep(0)  # let it start waiting
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
    await _until(lambda: pool.workers_alive == 2 and pool.idle_workers == 2)
    await asyncio.wait_for(_solve(pool, SvdTask(_matrix((8, 8)))), DEADLINE)


async def test_an_idle_worker_that_dies_is_replaced(pool: WorkerPool, lifecycle: Lifecycle) -> None:
    victim = lifecycle.started[0]
    os.kill(victim, signal.SIGKILL)
    await _until(lambda: lifecycle.exited.get(victim) == -signal.SIGKILL)
    await _until(lambda: pool.workers_alive == 2 and len(lifecycle.started) == 3)
    outcomes = await asyncio.gather(*(_solve(pool, SvdTask(_matrix((20, 20)))) for _ in range(2)))
    assert victim not in {o.pid for o in outcomes}


async def test_close_lets_running_tasks_finish(lifecycle: Lifecycle) -> None:
    pool = WorkerPool(
        1, 1, on_worker_started=lifecycle.on_started, on_worker_exited=lifecycle.on_exited
    )
    await pool.start()
    task = SvdTask(_matrix((300, 300), seed=11))
    with prepare_job([task]) as prepared:
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
    with prepare_job([SvdTask(_matrix((10, 10)), fault="hang")]) as prepared:
        stuck = asyncio.ensure_future(pool.run(prepared.job, timeout=None))
        await _until(lambda: pool.idle_workers == 1)
        # One loop step dispatches it: acquiring an idle worker does not suspend.
        quick = asyncio.ensure_future(_solve(pool, SvdTask(_matrix((5, 5)))))
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
    with prepare_job([SvdTask(_matrix((10, 10)), fault="hang")]) as hung:
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
        prepare_job([SvdTask(_matrix((4, 4)))]) as prepared,
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
    await _solve(pool, SvdTask(_matrix((9, 9))))


async def test_spawn_context(lifecycle: Lifecycle) -> None:
    async with WorkerPool(
        1,
        1,
        mp_context="spawn",
        on_worker_started=lifecycle.on_started,
        on_worker_exited=lifecycle.on_exited,
    ) as pool:
        outcome = await _solve(pool, SvdTask(_matrix((20, 10))))
        with (
            prepare_job([SvdTask(_matrix((5, 5)), fault="kill")]) as prepared,
            pytest.raises(WorkerCrashed),
        ):
            await pool.run(prepared.job)
        await _until(lambda: pool.workers_alive == 1)
        assert (await _solve(pool, SvdTask(_matrix((20, 10))))).pid != outcome.pid
    assert sorted(lifecycle.exited) == sorted(lifecycle.started)


def test_fork_is_refused() -> None:
    with pytest.raises(ValueError, match="fork"):
        WorkerPool(1, 1, mp_context="fork")


def test_invalid_tasks_fail_before_allocating() -> None:
    a = _matrix((4, 3))
    for bad in (
        SvdTask(a, k=4),
        SvdTask(a, fault="explode"),
        SvdTask(a.astype(np.int32)),
        SvdTask(a[0]),
    ):
        with pytest.raises(ValueError):
            prepare_job([bad])
    with pytest.raises(ValueError):
        prepare_job([])


def test_big_endian_input_is_computed_natively() -> None:
    a = _matrix((5, 4)).astype(">f8")
    with prepare_job([SvdTask(a)]) as prepared:
        region = prepared.block.array(prepared.job.items[0].a)
        assert region.dtype == np.dtype("<f8")
        np.testing.assert_array_equal(region, a)
