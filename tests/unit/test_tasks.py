"""TaskSet: every task held until it ends, failures logged, critical ones fatal."""

from __future__ import annotations

import asyncio
import logging

import pytest

from consumer.tasks import TaskSet


async def _fail() -> None:
    raise RuntimeError("boom")


async def test_a_failure_is_logged_with_the_task_name(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()
    task = tasks.spawn(_fail(), name="doomed")
    assert len(tasks) == 1
    assert await tasks.wait() == 0
    assert task.done()
    assert "task doomed died: RuntimeError('boom')" in caplog.text


async def test_a_critical_task_that_ends_is_fatal() -> None:
    fatal: list[tuple[BaseException | None, str]] = []
    tasks = TaskSet(on_fatal=lambda exc, name: fatal.append((exc, name)))
    tasks.spawn(asyncio.sleep(0), name="timer", critical=True)
    tasks.spawn(asyncio.sleep(0), name="request")
    await tasks.wait()
    assert fatal == [(None, "timer")]


async def test_critical_tasks_need_on_fatal() -> None:
    tasks = TaskSet()
    # The coroutine is closed, not left unawaited (warnings are errors in this suite).
    with pytest.raises(ValueError, match="needs a TaskSet with on_fatal"):
        tasks.spawn(asyncio.sleep(0), name="timer", critical=True)
    task = asyncio.create_task(asyncio.sleep(0))
    with pytest.raises(ValueError, match="needs a TaskSet with on_fatal"):
        tasks.track(task, critical=True)
    await task
    assert len(tasks) == 0


async def test_a_tracked_task_is_held_and_cancelled_like_a_spawned_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet()
    started = asyncio.Event()

    async def serve() -> None:
        started.set()
        await asyncio.Event().wait()

    task = tasks.track(asyncio.create_task(serve(), name="connection"))
    await started.wait()
    assert len(tasks) == 1
    assert await tasks.cancel_all() == 1
    assert task.cancelled()
    assert len(tasks) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_wait_without_a_limit_includes_tasks_spawned_meanwhile() -> None:
    tasks = TaskSet()
    finished: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        finished.append("second")

    async def first() -> None:
        tasks.spawn(second(), name="second")
        finished.append("first")

    tasks.spawn(first(), name="first")
    assert await tasks.wait() == 0
    assert finished == ["first", "second"]


async def test_wait_with_a_limit_returns_what_remains() -> None:
    tasks = TaskSet()
    tasks.spawn(asyncio.Event().wait(), name="forever")
    assert await tasks.wait(0.01) == 1
    assert await tasks.cancel_all() == 1
