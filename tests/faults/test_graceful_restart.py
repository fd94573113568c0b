"""SIGTERM drains: stopped and restarted mid-stream again and again, nothing is answered twice.

A graceful stop finishes what is in flight, commits past it and leaves the group; the next
instance starts exactly where it ended. Each stop comes with a backlog and a full in-flight
budget, so there is always work to drain.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from localkafka import TopicSettings
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all, wait_committed_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

DRAIN_SUMMARY = r"in flight at stop (\d+), drained (\d+), cancelled (\d+)"


async def test_repeated_sigterm_and_restart_answers_every_request_exactly_once(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    rng = np.random.default_rng(90)
    # 300x300: tens of milliseconds each, so a full budget of 16 is real work to drain.
    requests = dict(make_request(rng.standard_normal((300, 300))) for _ in range(400))
    ids = set(requests)
    group = f"g-{topics.requests}"
    settings: dict[str, object] = {"group_id": group, "pool_size": 2, "max_inflight": 16}
    stops = 3
    drains: list[tuple[int, int, int]] = []
    async with TallyReader(kafka_bootstrap, topics) as reader:
        await send_all(kafka_bootstrap, topics.requests, requests.values())
        for run in range(stops):
            service = ServiceProcess(
                kafka_bootstrap, topics, tmp_path / f"run{run}.log", **settings
            )
            with service:
                # Stop at a quarter, a half and three quarters of the stream.
                await reader.wait_answered(len(ids) * (run + 1) // (stops + 1), ids, timeout=180)
                assert service.stop(timeout=120) == 0
            summary = service.wait_for_log(DRAIN_SUMMARY)
            drains.append((int(summary.group(1)), int(summary.group(2)), int(summary.group(3))))
        with ServiceProcess(kafka_bootstrap, topics, tmp_path / "last.log", **settings):
            await reader.collect(ids, timeout=240)
            await wait_committed_to_end(kafka_bootstrap, group, topics.requests)
        tally = await reader.read_to_end()

    line = fault_report(
        f"SIGTERM x{stops} mid-stream, each followed by a restart; "
        f"(in flight, drained, cancelled) per stop: {drains}",
        tally.report(len(ids), ids),
    )
    assert tally.ok() == ids, line
    assert tally.duplicates() == 0, line
    assert all(
        in_flight == drained and cancelled == 0 for in_flight, drained, cancelled in drains
    ), line
    assert sum(in_flight for in_flight, _, _ in drains) > 0, (
        f"nothing was in flight to drain: {line}"
    )
