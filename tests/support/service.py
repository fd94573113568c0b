"""Run the real consumer service as a subprocess, the way operators run it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from localkafka import TopicSettings

REPO = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """``python -m consumer run`` with its log in a file; stop it gently or kill it."""

    def __init__(
        self,
        bootstrap: str,
        topics: TopicSettings,
        log_path: Path,
        *,
        group_id: str | None = None,
        extra_env: dict[str, str] | None = None,
        **settings: object,
    ) -> None:
        self.log_path = log_path
        env = {
            **os.environ,
            "SVD_BOOTSTRAP_SERVERS": bootstrap,
            "SVD_REQUESTS_TOPIC": topics.requests,
            "SVD_RESULTS_TOPIC": topics.results,
            "SVD_DLQ_TOPIC": topics.dlq,
            "SVD_GROUP_ID": group_id or f"svd-{topics.requests}",
            "SVD_METRICS_PORT": "0",
            "SVD_LOG_LEVEL": "INFO",
        }
        env.update({f"SVD_{k.upper()}": str(v) for k, v in settings.items()})
        self._env = {**env, **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumer", "run"],
                cwd=REPO,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 60.0, *, count: int = 1) -> re.Match[str]:
        """Wait until ``pattern`` has appeared ``count`` times in the log; fail with the log tail."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            matches = list(regex.finditer(self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.log().splitlines()[-40:])
        raise AssertionError(
            f"{pattern!r} x{count} not in the service log within {timeout}s:\n{tail}"
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for_log(r"INFO consumer\.service: assigned \[", timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path (drain, commit, close); SIGKILL if it hangs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise

    def kill(self) -> None:
        """SIGKILL: no drain, no commit; workers die with their parent."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(timeout=60)
