"""The real consumer service as a subprocess (``svd-consumer run``), for the SDK's end-to-end tests.

Readiness is a real round trip through the SDK, raced against the process exiting: no log
scraping, no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from pathlib import Path

import numpy as np

from localkafka import TopicSettings
from producer_sdk import AsyncSvdClient
from tests.support.service import ServiceProcess


class ConsumerProcess(ServiceProcess):
    """The service process of tests/support, made ready by a real round trip through the SDK."""

    def __init__(
        self, bootstrap: str, topics: TopicSettings, log_path: Path, **settings: object
    ) -> None:
        super().__init__(
            bootstrap, topics, log_path, group_id=f"sdk-tests-{topics.requests}", **settings
        )
        self.bootstrap = bootstrap
        self.topics = topics

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def answer_probe(self, timeout: float = 120.0) -> None:
        """Until the service answered a probe request, or fail at once if it exits."""
        assert self.proc is not None
        exited = _exit_event(self.proc, asyncio.get_running_loop())
        async with AsyncSvdClient(
            bootstrap_servers=self.bootstrap,
            requests_topic=self.topics.requests,
            results_topic=self.topics.results,
        ) as client:
            probe = asyncio.create_task(client.svd(np.eye(2), timeout=timeout))
            gone = asyncio.create_task(exited.wait())
            done, _ = await asyncio.wait({probe, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if probe not in done:
                probe.cancel()
                raise AssertionError(
                    f"svd-consumer exited with {self.proc.returncode} before answering:\n"
                    f"{self.log_tail()}"
                )
            try:
                probe.result()
            except Exception as exc:
                raise AssertionError(
                    f"svd-consumer did not answer a probe ({exc!r}):\n{self.log_tail()}"
                ) from exc


def _exit_event(proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    # A plain daemon thread, not the loop's executor: asyncio.run() would wait for an executor
    # thread blocked on a process that outlives the loop.
    event = asyncio.Event()

    def watch() -> None:
        proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(event.set)

    threading.Thread(target=watch, daemon=True).start()
    return event
