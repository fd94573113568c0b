"""SIGKILL the consumer with a full in-flight budget, restart it: every request is answered.

To kill with a known number of requests in flight, the first run has test faults enabled and
two requests at the head of one partition carry the ``hang`` fault: both pool workers block in
them, nothing in flight can finish, and the budget fills to its limit (the "pausing" log line
gives the count) and stays there. SIGKILL then. The restart runs without test faults, so the
two hung requests are computed normally like everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from consumer.admission import TEST_FAULT_HEADER
from localkafka import TopicSettings
from schemas import codec
from tests.support import procs
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all

pytestmark = [pytest.mark.kafka, pytest.mark.faults]


async def test_sigkill_with_a_full_budget_in_flight_then_restart_loses_nothing(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    rng = np.random.default_rng(10)
    max_inflight = 64
    group = f"g-{topics.requests}"
    settings: dict[str, object] = {
        "group_id": group, "pool_size": 2, "blas_threads": 1, "max_inflight": max_inflight,
        "task_timeout_s": 300,  # the hung tasks must still hang when the kill comes
    }  # fmt: skip

    def batch(count: int) -> dict[str, codec.EncodedMessage]:
        return dict(make_request(rng.standard_normal((32, 32))) for _ in range(count))

    warmup, backlog = batch(60), batch(300)
    hung = {}
    for request_id, message in batch(2).items():
        # One key for both: consecutive offsets in one partition, so they are admitted together.
        hung[request_id] = codec.EncodedMessage(
            key=b"hang",
            value=message.value,
            headers=[*message.headers, (TEST_FAULT_HEADER, b"hang")],
        )
    expected = {*warmup, *hung, *backlog}

    first = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "first.log", enable_test_faults="true", **settings
    )
    async with TallyReader(kafka_bootstrap, topics) as reader:
        with first:
            await send_all(kafka_bootstrap, topics.requests, warmup.values())
            await reader.collect(set(warmup), timeout=120)
            await send_all(kafka_bootstrap, topics.requests, [*hung.values(), *backlog.values()])
            full = first.wait_for_log(r"in-flight budget full \((\d+) requests", timeout=120)
            in_flight = int(full.group(1))
            tree = procs.descendants(first.pid)
            answered_before_kill = len(reader.tally.answered())
            first.kill()
            # Nothing may outlive the service: not the fork server, not the hung workers.
            procs.wait_for(
                lambda: not any(map(procs.alive, tree)), 30, f"{tree} to die with the service"
            )
            # The resource tracker unlinks the shared memory the dead service left behind.
            procs.wait_for(
                lambda: not procs.shm_segments(first.pid), 30, "leaked shared memory to go"
            )

        with ServiceProcess(kafka_bootstrap, topics, tmp_path / "second.log", **settings):
            tally = await reader.collect(expected, timeout=180)
            tally = await reader.read_to_end()

    line = fault_report(
        f"SIGKILL of the consumer with {in_flight} requests in flight (budget {max_inflight}; "
        f"both workers hung by 'hang'), {answered_before_kill} answered before; restart without faults",
        tally.report(len(expected), expected),
    )
    assert in_flight >= 50, line
    assert expected <= tally.answered() and tally.ok() == expected, line
    assert not tally.dead_letters and tally.undecodable == 0, line
