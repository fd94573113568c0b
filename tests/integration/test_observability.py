"""Every metric of the consumer moves as it should, and /healthz and /readyz tell the truth.

The real service (a subprocess) against the real broker, read through its own HTTP endpoint
the way Prometheus and an orchestrator's probes read it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from localkafka import TopicSettings, ensure_topics
from schemas import codec
from tests.support.kafka_io import AnswerReader, make_request, produce
from tests.support.scrape import Endpoint, Samples, http_get
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka

FAULT = "svd-test-fault"
MIB = 1 << 20


def _with_fault(
    message: codec.EncodedMessage, fault: str
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return message.key, message.value, [*message.headers, (FAULT, fault.encode())]


def _requests(count: int, seed: int) -> list[tuple[str, codec.EncodedMessage]]:
    rng = np.random.default_rng(seed)
    return [make_request(rng.standard_normal((40, 30))) for _ in range(count)]


def _lag_total(samples: Samples) -> float:
    return sum(samples.by("svd_consumer_lag_messages", "partition").values())


async def test_every_metric_moves_as_the_service_works(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    settings = {
        "pool_size": 1,
        "max_inflight": 2,
        "metrics_port": -1,
        "lag_interval_s": 0.5,
        "enable_test_faults": "true",
        "max_attempts": 2,
        "retry_backoff_s": 0.05,
        # Holds the hung request long enough to watch the saturation, however slow the machine.
        "task_timeout_s": 15,
    }
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", **settings) as svc:
        endpoint = Endpoint.of(svc)
        ready = await endpoint.wait_ready()
        assert ready == {
            "ready": True,
            "checks": {"group": True, "pool": True, "broker": True, "running": True},
        }
        start = await endpoint.wait_for(
            lambda s: len(s.by("svd_consumer_lag_messages", "partition")) == 4, "lag per partition"
        )
        assert start["svd_requests_received_total"] == 0
        assert start["svd_pool_size"] == start["svd_pool_workers_alive"] == 1
        assert start["svd_pool_workers_busy"] == 0
        assert start["svd_inflight_requests_limit"] == 2
        assert start["svd_inflight_bytes_limit"] == 256 * MIB
        assert start["svd_assigned_partitions"] == 4
        assert start["svd_paused_partitions"] == 0
        assert start["svd_ready"] == 1
        assert set(start.by("svd_consumer_lag_messages", "topic")) == {topics.requests}
        assert _lag_total(start) == 0 and start["svd_consumer_lag_seconds"] == 0

        # 1. Each outcome once: results, a retry after a worker crash, an expired request, and
        #    a record that is not a request at all.
        good = _requests(4, seed=1)
        crash_id, crash = make_request(np.eye(5))
        expired_id, expired = make_request(np.eye(5), deadline_ms=int(time.time() * 1000) - 60_000)
        garbage = (None, b"this is not a request", [])  # no key: no requester to answer
        sent = [m for _, m in good] + [_with_fault(crash, "kill_once"), expired, garbage]
        await produce(kafka_bootstrap, topics.requests, sent)
        value_bytes = sum(
            len(m.value if isinstance(m, codec.EncodedMessage) else m[1]) for m in sent
        )
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect(
                {i for i, _ in good} | {crash_id, expired_id}, timeout=120, dead_letters=2
            )
        garbage_code = next(
            str(d.meta.code) for d in answers.dead_letters if d.meta.request_id is None
        )
        after = await endpoint.wait_for(
            lambda s: (
                s["svd_end_to_end_seconds_count"] == 7
                and s["svd_pool_workers_alive"] == 1
                and _lag_total(s) == 0
            ),
            "all 7 answered, the crashed worker replaced, everything committed",
        )
        assert after["svd_requests_received_total"] == 7
        assert after["svd_requests_succeeded_total"] == 5  # the crashed one succeeded on retry
        assert after.by("svd_requests_failed_total", "code") == {"EXPIRED": 1, garbage_code: 1}
        assert after["svd_requests_retried_total"] == 1
        assert after["svd_dead_letters_total"] == 2
        assert after["svd_requests_expired_total"] == 1
        assert after["svd_compute_seconds_count"] == after["svd_queue_wait_seconds_count"] == 5
        assert after["svd_compute_seconds_sum"] > 0
        assert after["svd_request_bytes_count"] == 7
        assert after["svd_request_bytes_sum"] == value_bytes
        assert after["svd_end_to_end_seconds_sum"] > 0
        assert after["svd_inflight_requests"] == after["svd_inflight_bytes"] == 0
        assert after["svd_consumer_lag_seconds"] == 0

        # 2. Saturation: a request that hangs its worker holds the only one, the next one waits
        #    for it, and with two in flight the budget is full: every partition pauses and the
        #    backlog shows as lag, in messages and in estimated seconds.
        hang_id, hang = make_request(np.eye(6))
        await produce(kafka_bootstrap, topics.requests, [_with_fault(hang, "hang")])
        await endpoint.wait_for(
            lambda s: s["svd_pool_workers_busy"] == 1 and s["svd_inflight_requests"] == 1,
            "the hanging request on the worker",
        )
        backlog = _requests(6, seed=2)
        await produce(kafka_bootstrap, topics.requests, [m for _, m in backlog])
        full = await endpoint.wait_for(
            lambda s: (
                s["svd_inflight_requests"] == 2
                and s["svd_paused_partitions"] == 4
                and _lag_total(s) == 7
            ),
            "budget full, partitions paused, 7 behind",
        )
        assert full["svd_inflight_bytes"] > 0
        assert full["svd_pool_workers_busy"] == 1
        # 7 behind at the recent mean compute time each (milliseconds here), on a pool of one;
        # the exact formula is unit-tested (tests/unit/test_observability.py).
        assert 0 < full["svd_consumer_lag_seconds"] < 7
        assert full["svd_ready"] == 1  # saturated is not unready
        assert (await endpoint.readyz())[0] == 200

        # The task limit kills the hung worker: TIMEOUT, a new worker, and the backlog drains.
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect({hang_id} | {i for i, _ in backlog}, timeout=120)
        assert [e.code for e in answers.errors[hang_id]] == ["TIMEOUT"]
        drained = await endpoint.wait_for(
            lambda s: (
                s["svd_end_to_end_seconds_count"] == 14
                and s["svd_paused_partitions"] == 0
                and s["svd_pool_workers_alive"] == 1
                and _lag_total(s) == 0
            ),
            "drained and committed",
        )
        assert drained.get("svd_requests_failed_total", code="TIMEOUT") == 1
        assert drained["svd_requests_succeeded_total"] == 11
        assert drained["svd_inflight_requests"] == drained["svd_inflight_bytes"] == 0
        assert drained["svd_consumer_lag_seconds"] == 0
        assert drained["svd_pool_workers_busy"] == 0
        assert svc.stop() == 0


async def test_a_spare_member_with_no_partition_is_ready(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two members, one partition: the one without a partition is a hot spare, and ready."""
    suffix = tmp_path.name[-12:].replace("_", "-")
    single = TopicSettings(
        requests=f"svd-requests-one-{suffix}",
        results=f"svd-results-one-{suffix}",
        dlq=f"svd-dlq-one-{suffix}",
        requests_partitions=1,
    )
    await ensure_topics(kafka_bootstrap, single)
    common = {
        "pool_size": 1,
        "metrics_port": -1,
        "lag_interval_s": 0.5,
        "group_id": "spare-" + suffix,
    }
    with (
        ServiceProcess(kafka_bootstrap, single, tmp_path / "a.log", **common) as a,
        ServiceProcess(kafka_bootstrap, single, tmp_path / "b.log", **common) as b,
    ):
        endpoints = [Endpoint.of(a), Endpoint.of(b)]
        for endpoint in endpoints:
            await endpoint.wait_ready()
        scrapes = [await e.wait_for(lambda s: s["svd_ready"] == 1, "ready") for e in endpoints]
        assert sorted(s["svd_assigned_partitions"] for s in scrapes) == [0, 1]
        spare = scrapes[0] if scrapes[0]["svd_assigned_partitions"] == 0 else scrapes[1]
        assert spare.by("svd_consumer_lag_messages", "partition") == {}  # owns nothing to report


async def test_a_draining_service_is_alive_but_not_ready(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    settings = {
        "pool_size": 1,
        "metrics_port": -1,
        "enable_test_faults": "true",
        "task_timeout_s": 10,  # the drain lasts until the hung request times out
        "drain_timeout_s": 30,
    }
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", **settings) as svc:
        endpoint = Endpoint.of(svc)
        await endpoint.wait_ready()
        _, hang = make_request(np.eye(4))
        await produce(kafka_bootstrap, topics.requests, [_with_fault(hang, "hang")])
        await endpoint.wait_for(lambda s: s["svd_pool_workers_busy"] == 1, "the hang on the worker")
        assert svc.proc is not None
        svc.proc.terminate()  # SIGTERM: drain the hung request (up to its task limit)
        deadline = time.monotonic() + 30
        while True:
            status, body = await endpoint.readyz()
            if status == 503:
                break
            assert time.monotonic() < deadline, "/readyz never turned 503 during the drain"
            await asyncio.sleep(0.05)
        checks = body["checks"]
        assert isinstance(checks, dict) and checks["running"] is False
        assert (await http_get(endpoint.host, endpoint.port, "/healthz"))[0] == 200
        assert svc.proc.wait(60) == 0
        svc.wait_for_log(r"stopped after .*drained 1")
