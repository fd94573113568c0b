"""Background tasks that cannot die silently (the aiokafka ``sender.py`` done-callback idea).

Per-request tasks report their own failures; if one escapes anyway it is logged with its name.
A long-lived task (commit timer, metrics) that ends while the service runs is fatal: the
``on_fatal`` callback stops the service instead of leaving it half alive.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """Tasks held until they end. ``on_fatal`` is needed only for critical tasks."""

    def __init__(self, on_fatal: Callable[[BaseException | None, str], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_fatal = on_fatal

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str, critical: bool = False
    ) -> asyncio.Task[Any]:
        if critical and self._on_fatal is None:
            coro.close()  # never to be awaited: close it rather than leak a warning
            raise ValueError(f"critical task {name} needs a TaskSet with on_fatal")
        return self.track(asyncio.create_task(coro, name=name), critical=critical)

    def track(self, task: asyncio.Task[Any], *, critical: bool = False) -> asyncio.Task[Any]:
        """Hold a task created elsewhere (a server's connection handler) like a spawned one."""
        if critical and self._on_fatal is None:
            raise ValueError(f"critical task {task.get_name()} needs a TaskSet with on_fatal")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, critical))
        return task

    def _done(self, task: asyncio.Task[Any], critical: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s died: %r", task.get_name(), exc, exc_info=exc)
        if critical and self._on_fatal is not None:
            self._on_fatal(exc, task.get_name())

    async def wait(
        self, seconds: float | None = None, *, stop_early: asyncio.Event | None = None
    ) -> int:
        """Wait for every task, including those spawned meanwhile, up to ``seconds`` (None: no
        limit) or until ``stop_early`` is set; return how many remain. Cancelling the wait
        leaves the tasks running."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if seconds is None else loop.time() + seconds
        while self._tasks and loop.time() < deadline:
            if stop_early is not None and stop_early.is_set():
                break
            waiters: set[asyncio.Future[Any]] = set(self._tasks)
            stop_waiter = None if stop_early is None else asyncio.ensure_future(stop_early.wait())
            if stop_waiter is not None:
                waiters.add(stop_waiter)
            try:
                await asyncio.wait(
                    waiters,
                    timeout=None if seconds is None else deadline - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                if stop_waiter is not None:  # also when this wait is cancelled
                    stop_waiter.cancel()
        return len(self._tasks)

    async def cancel_all(self) -> int:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)
