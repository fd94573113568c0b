"""Background tasks that cannot die silently (the aiokafka ``sender.py`` done-callback idea).

Per-request tasks report their own failures; if one escapes anyway it is logged with its name.
A long-lived task (commit timer, metrics) that ends while the service runs is fatal: the
``on_fatal`` callback stops the service instead of leaving it half alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self, on_fatal: Callable[[BaseException | None, str], None]) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_fatal = on_fatal

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str, critical: bool = False
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
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
        if critical:
            self._on_fatal(exc, task.get_name())

    async def wait(self, seconds: float, *, stop_early: asyncio.Event | None = None) -> int:
        """Wait for every task, up to ``seconds`` or until ``stop_early`` is set; return how many remain."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._tasks and loop.time() < deadline:
            if stop_early is not None and stop_early.is_set():
                break
            waiters: set[asyncio.Future[Any]] = set(self._tasks)
            if stop_early is not None:
                waiters.add(asyncio.ensure_future(stop_early.wait()))
            _, pending = await asyncio.wait(
                waiters, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for fut in pending - self._tasks:
                fut.cancel()  # the stop_early waiter
        return len(self._tasks)

    async def cancel_all(self) -> int:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)
