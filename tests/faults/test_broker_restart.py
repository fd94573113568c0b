"""The real broker stops and comes back mid-stream: the consumer reconnects and finishes.

A broker of its own (the session broker is shared by every test), in this test's tmp_path,
restarted from the same work directory (its data) on the same ports (its clients' bootstrap).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from localkafka import LocalBroker
from tests.conftest import fresh_topics
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import Tally, TallyReader, send_all, wait_committed_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.faults]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_broker_stop_and_restart_mid_stream_loses_nothing(
    own_broker: LocalBroker,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
    guarantee: str,
) -> None:
    # A plain test, with asyncio.run per step: LocalBroker.start runs its own event loop, and
    # must run on the main thread (its JVM dies with the thread that started it).
    state = own_broker.status()
    assert state is not None
    bootstrap = state.bootstrap
    # exactly_once readers see committed transactions only, and then each answer once.
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    topics = fresh_topics(bootstrap)
    rng = np.random.default_rng(60)
    requests = dict(make_request(rng.standard_normal((200, 200))) for _ in range(400))
    ids = set(requests)
    group = f"g-{topics.requests}"
    asyncio.run(send_all(bootstrap, topics.requests, requests.values()))

    async def answered_so_far(count: int) -> int:
        async with TallyReader(bootstrap, topics, isolation_level=isolation) as reader:
            return len((await reader.wait_answered(count, ids, timeout=120)).answered())

    async def every_answer() -> Tally:
        async with TallyReader(bootstrap, topics, isolation_level=isolation) as reader:
            await reader.collect(ids, timeout=240)
            await wait_committed_to_end(bootstrap, group, topics.requests, timeout=60)
            return await reader.read_to_end()

    service = ServiceProcess(
        bootstrap,
        topics,
        tmp_path / "svc.log",
        group_id=group,
        pool_size=2,
        max_inflight=16,
        processing_guarantee=guarantee,
    )
    with service:
        answered_before_stop = asyncio.run(answered_so_far(100))
        own_broker.stop()
        # The outage lasts until the service has run into it, not for a guessed time.
        service.wait_for_log(
            r"(commit of .* failed|publish to .* failed|transaction on .* failed|"
            r"reading partition lag failed)",
            timeout=120,
        )
        assert service.proc is not None and service.proc.poll() is None, "died with the broker"
        restarted = own_broker.start(die_with_parent=True)
        assert restarted.bootstrap == bootstrap
        tally = asyncio.run(every_answer())
        stopped = service.stop(timeout=120)

    line = fault_report(
        f"{guarantee}: broker stopped (SIGTERM) after {answered_before_stop} of {len(ids)} answers, "
        "restarted on the same port once the service had hit the outage",
        tally.report(len(ids), ids),
    )
    assert stopped == 0, line
    assert tally.ok() == ids, line  # duplicates are allowed: commits failed during the outage
    assert "Traceback" not in service.log(), line
    if guarantee == "exactly_once":
        assert tally.duplicates() == 0, line
