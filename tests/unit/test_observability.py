"""consumer/http.py and consumer/lag.py without Kafka: the HTTP endpoints, readiness, lag maths.

The same against the real broker and service: tests/integration/test_observability.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from consumer.http import MetricsServer
from consumer.lag import BrokerContact, ComputeMean, LagMonitor
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers, "", ""]
    return "\r\n".join(lines).encode()


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Metrics, dict[str, bool]]]:
    metrics = Metrics()
    checks = {"group": True, "pool": True, "broker": True, "running": True}
    server = MetricsServer(metrics.registry, lambda: dict(checks), host="127.0.0.1", port=0)
    host, port = await server.start()
    assert host == "127.0.0.1" and port > 0
    try:
        yield port, metrics, checks
    finally:
        await server.close()


async def test_metrics_are_served_in_the_format_the_scraper_asks_for(
    served: tuple[int, Metrics, dict[str, bool]],
) -> None:
    port, metrics, _ = served
    metrics.received.inc(3)
    metrics.failed.labels(code="NON_FINITE").inc()
    status, headers, body = await http(port, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("svd_requests_received_total", ())] == 3
    assert samples[("svd_requests_failed_total", (("code", "NON_FINITE"),))] == 1
    accept = "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = await http(port, get("/metrics", accept))
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    # An Accept header prometheus_client cannot parse gets the default format, not an error.
    status, headers, _ = await http(port, get("/metrics", "Accept: text/plain;version=abc"))
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")


async def test_healthz_and_readyz_report_the_checks(
    served: tuple[int, Metrics, dict[str, bool]],
) -> None:
    port, _, checks = served
    assert (await http(port, get("/healthz")))[0] == 200
    status, _, body = await http(port, get("/readyz?verbose=1"))  # a query string is ignored
    assert status == 200
    assert orjson.loads(body) == {"ready": True, "checks": checks}
    checks["broker"] = False
    status, headers, body = await http(port, get("/readyz"))
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["checks"]["broker"] is False


async def test_head_bad_methods_unknown_paths_and_garbage(
    served: tuple[int, Metrics, dict[str, bool]],
) -> None:
    port, _, _ = served
    status, headers, body = await http(port, get("/metrics", method="HEAD"))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, _ = await http(port, get("/metrics", method="POST"))
    assert status == 405 and "GET" in headers["allow"]
    assert (await http(port, get("/nope")))[0] == 404
    assert (await http(port, b"nonsense\r\n\r\n"))[0] == 400
    assert (await http(port, get("/metrics", "no colon here")))[0] == 400


async def test_a_failing_readiness_check_is_a_500_not_a_dead_server() -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("bug")

    server = MetricsServer(Metrics().registry, broken, host="127.0.0.1", port=0)
    _, port = await server.start()
    try:
        assert (await http(port, get("/readyz")))[0] == 500
        assert (await http(port, get("/healthz")))[0] == 200
    finally:
        await server.close()


async def test_a_silent_client_neither_blocks_others_nor_close() -> None:
    metrics = Metrics()
    server = MetricsServer(metrics.registry, dict, host="127.0.0.1", port=0)
    _, port = await server.start()
    _, idle = await asyncio.open_connection("127.0.0.1", port)  # connects, never sends
    try:
        assert (await http(port, get("/healthz")))[0] == 200
        await asyncio.wait_for(server.close(), 5)  # ends the idle connection too
    finally:
        idle.close()


def test_the_broker_counts_as_reachable_only_within_the_window() -> None:
    clock = Clock()
    broker = BrokerContact(10.0, clock)
    assert not broker.reachable()  # no contact yet
    broker.ok()
    clock.now += 10.0
    assert broker.reachable()
    clock.now += 0.1
    assert not broker.reachable()
    broker.ok()
    assert broker.reachable()


def test_the_mean_compute_time_follows_the_window_and_survives_idleness() -> None:
    clock = Clock()
    metrics = Metrics()
    mean = ComputeMean(metrics, window_s=60.0, clock=clock)
    assert mean.seconds() is None  # nothing computed yet
    for _ in range(4):
        metrics.compute.observe(2.0)
    assert mean.seconds() == pytest.approx(2.0)
    clock.now += 61  # the 2 s requests leave the window ...
    assert mean.seconds() == pytest.approx(2.0)
    metrics.compute.observe(0.5)
    metrics.compute.observe(0.5)
    clock.now += 1
    assert mean.seconds() == pytest.approx(0.5)  # ... and only the recent ones count
    clock.now += 600  # idle: the last estimate stays
    assert mean.seconds() == pytest.approx(0.5)


class FakeConsumer:
    """The slice of AIOKafkaConsumer the lag monitor uses."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.ends: dict[TopicPartition, int] = {}
        self.group_committed: dict[TopicPartition, int | None] = {}
        self.starts: dict[TopicPartition, int] = {}
        self.fail: Exception | None = None
        self.failures = 0
        self.metadata_calls = 0  # successful ones
        self.called = asyncio.Condition()  # notified on every metadata call

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.fail is not None:
            raise self.fail
        return {tp: self.ends[tp] for tp in tps}

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.group_committed.get(tp)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.starts.get(tp, 0) for tp in tps}

    async def topics(self) -> set[str]:
        async with self.called:
            self.called.notify_all()
        if self.fail is not None:
            self.failures += 1
            raise self.fail
        self.metadata_calls += 1
        return {"t"}

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5), self.called:
            await self.called.wait_for(condition)


def value(gauge: Gauge) -> float:
    return next(s.value for family in gauge.collect() for s in family.samples)


def lag_samples(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value for family in metrics.lag.collect() for s in family.samples
    }


async def test_lag_is_high_watermark_minus_committed_per_owned_partition() -> None:
    clock = Clock()
    metrics = Metrics()
    offsets = OffsetTracker()
    consumer = FakeConsumer()
    broker = BrokerContact(20.0, clock)
    monitor = LagMonitor(
        consumer,  # type: ignore[arg-type]
        offsets,
        metrics,
        broker,
        pool_size=2,
        timeout_s=5.0,
    )
    p0, p1, p2 = (TopicPartition("t", i) for i in range(3))
    consumer.assigned = {p0, p1, p2}
    consumer.ends = {p0: 100, p1: 50, p2: 7}
    offsets.ledger(p0)
    offsets.committed({p0: 90})  # committed by this member
    consumer.group_committed = {p1: 20, p2: None}  # p1: by a former owner; p2: never
    consumer.starts = {p2: 3}  # log start after retention
    await monitor.refresh()
    assert lag_samples(metrics) == {"0": 10, "1": 30, "2": 4}
    assert broker.reachable()
    # No compute measured yet: a backlog without an estimate is NaN, not 0.
    assert math.isnan(value(metrics.lag_seconds))

    for _ in range(10):
        metrics.compute.observe(0.2)
    consumer.assigned = {p0}  # p1 and p2 revoked: their series go, not freeze
    await monitor.refresh()
    assert lag_samples(metrics) == {"0": 10}
    assert value(metrics.lag_seconds) == pytest.approx(10 * 0.2 / 2)

    offsets.committed({p0: 100})
    await monitor.refresh()
    assert lag_samples(metrics) == {"0": 0}
    assert value(metrics.lag_seconds) == 0

    monitor.forget({p0})  # revoked: gone at once, before the next refresh
    assert lag_samples(metrics) == {}


async def test_an_idle_member_still_checks_the_broker_and_failures_leave_it_stale() -> None:
    clock = Clock()
    metrics = Metrics()
    consumer = FakeConsumer()
    broker = BrokerContact(20.0, clock)
    monitor = LagMonitor(
        consumer,  # type: ignore[arg-type]
        OffsetTracker(),
        metrics,
        broker,
        pool_size=1,
        timeout_s=5.0,
    )
    task = asyncio.create_task(monitor.run(0.01))
    try:
        # No partitions: a metadata call instead of ListOffsets. The 2nd call starts after the
        # 1st refresh recorded its success.
        await consumer.until(lambda: consumer.metadata_calls >= 2)
        assert broker.reachable()
        consumer.fail = KafkaTimeoutError()
        clock.now += 21
        await consumer.until(lambda: consumer.failures >= 3)  # refreshes fail, the task goes on
        assert not task.done()
        assert not broker.reachable()
        consumer.fail = None
        calls = consumer.metadata_calls
        await consumer.until(lambda: consumer.metadata_calls >= calls + 2)
        assert broker.reachable()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
