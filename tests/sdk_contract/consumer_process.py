"""The real consumer service as a subprocess (``svd-consumer run``), for the SDK's end-to-end tests.

Readiness is a real round trip through the SDK, raced against the process exiting: no log
scraping, no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from localkafka import TopicSettings
from producer_sdk import AsyncSvdClient

REPO = Path(__file__).resolve().parents[2]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("svd-consumer")
    if script.exists():
        return [str(script), "run"]
    found = shutil.which("svd-consumer")
    return [found, "run"] if found else [sys.executable, "-m", "consumer", "run"]


class ConsumerProcess:
    def __init__(
        self, bootstrap: str, topics: TopicSettings, log_path: Path, **settings: object
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.log_path = log_path
        self.env = {
            **os.environ,
            "SVD_BOOTSTRAP_SERVERS": bootstrap,
            "SVD_REQUESTS_TOPIC": topics.requests,
            "SVD_RESULTS_TOPIC": topics.results,
            "SVD_DLQ_TOPIC": topics.dlq,
            "SVD_GROUP_ID": f"sdk-tests-{topics.requests}",
            "SVD_METRICS_PORT": "0",
            **{f"SVD_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                _command(),
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, timeout: float = 120.0) -> None:
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

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the graceful drain; SIGKILL if it does not end in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(30)


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
