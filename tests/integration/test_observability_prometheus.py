"""A real Prometheus scrapes the running consumer, and every query of the dashboard returns data.

Prometheus is Debian's package (``make test`` installs it), started here on a free loopback port
with a throw-away config and storage, never as the system service. With CI=true a missing
binary fails the test; elsewhere it is skipped.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from localkafka import TopicSettings
from tests.conftest import missing
from tests.support import dashboard
from tests.support.kafka_io import AnswerReader, make_request, produce
from tests.support.scrape import Endpoint
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "svd-consumer", "static_configs": [{"targets": [target]}]}
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            body = response.read()
        return json.loads(body) if path.startswith("/api/") else body

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self._get("/-/ready")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"Prometheus not ready in {timeout}s:\n{self.log_path.read_text()}")

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; its result as a list of samples (a scalar counts as one)."""
        doc = await asyncio.to_thread(
            self._get, "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        )
        assert doc["status"] == "success", doc
        data = doc["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_for(self, expr: str, what: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Query until ``expr`` returns something (a comparison filters until it holds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = await self.query(expr)
            if result:
                return result
            if loop.time() > deadline:
                raise AssertionError(f"{what}: {expr!r} still empty after {timeout}s")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def prometheus_binary() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if path is None:
        missing("no prometheus binary (Debian package prometheus; make test installs it)")
    return path


@pytest.fixture
def service(kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path) -> Iterator[Endpoint]:
    settings = {"pool_size": 1, "metrics_port": -1, "lag_interval_s": 0.5}
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", **settings) as svc:
        yield Endpoint.of(svc)


async def test_prometheus_scrapes_the_consumer_and_every_dashboard_query_returns_data(
    prometheus_binary: str,
    service: Endpoint,
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
) -> None:
    await service.wait_ready()
    prometheus = Prometheus(prometheus_binary, tmp_path, f"{service.host}:{service.port}")
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        # Scraped before any traffic, so each counter's increase falls inside the rate windows.
        await prometheus.wait_for('up{job="svd-consumer"} == 1', "first scrape")
        await prometheus.wait_for("svd_consumer_lag_messages", "lag series")

        rng = np.random.default_rng(3)
        good = [make_request(rng.standard_normal((60, 40))) for _ in range(20)]
        bad = (b"bad", b"not a request", [])  # an error by code: INVALID_* on the dashboard
        await produce(kafka_bootstrap, topics.requests, [m for _, m in good] + [bad])
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            await reader.collect({i for i, _ in good}, timeout=120, dead_letters=1)

        # Prometheus has seen all 21 and has at least two samples of the error series (what
        # rate() needs), and lag has come back to zero.
        await prometheus.wait_for("svd_requests_received_total == 21", "21 received")
        await prometheus.wait_for(
            "count_over_time(svd_requests_failed_total[1m]) >= 2", "two samples of errors"
        )
        await prometheus.wait_for("sum(svd_consumer_lag_messages) == 0", "lag drained")

        empty = []
        for query in dashboard.queries():
            if not await prometheus.query(dashboard.concrete(query.expr)):
                empty.append(str(query))
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)

        # A few values, not only their presence.
        (ready,) = await prometheus.query("sum(svd_ready)")
        assert float(ready["value"][1]) == 1
        (answered,) = await prometheus.query(
            dashboard.concrete("sum(increase(svd_requests_succeeded_total[$__rate_interval]))")
        )
        assert float(answered["value"][1]) > 0
        by_code = await prometheus.query("sum by (code) (svd_requests_failed_total)")
        assert [float(s["value"][1]) for s in by_code] == [1]
    finally:
        prometheus.stop()
