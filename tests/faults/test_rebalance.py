"""Rebalances under load: members join, stop gracefully and die, and no request is lost.

The steps, each with a backlog waiting: member A alone; B joins; A is stopped (SIGTERM); C
joins; B is killed (SIGKILL) and C takes its partitions over after the session timeout.

The in-flight budget is tiny (2 requests), so members are paused most of the time, and the
requests are over 1 MiB, so they are decoded in a thread (the loop awaits mid-batch). After each
rebalance the new partitions must be paused exactly when the member's budget is full: aiokafka
forgets pause flags on reassignment, and a member that failed to re-apply them would fetch
past its budget. Each member logs, per assignment, how many partitions aiokafka holds paused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer

from localkafka import TopicSettings
from tests.support import groups, procs
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all, wait_committed_to_end
from tests.support.workloads import slow_svd_request

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

MIB = 1 << 20
PEAK = r"peak in flight (\d+)/(\d+) requests, (\d+)/(\d+) bytes"


async def test_join_leave_and_crash_under_load_lose_nothing_and_keep_pauses_right(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    rng = np.random.default_rng(50)
    # 400x400 float64: 1.28 MB, above the 1 MiB threshold for decoding in a thread.
    requests = dict(make_request(rng.standard_normal((400, 400))) for _ in range(300))
    ids = set(requests)
    partitions = topics.requests_partitions
    group = f"g-{topics.requests}"

    def member(name: str) -> ServiceProcess:
        return ServiceProcess(
            kafka_bootstrap, topics, tmp_path / f"{name}.log", group_id=group, instance_id=name,
            pool_size=1, blas_threads=1, max_inflight=2, max_inflight_bytes=16 * MIB,
            session_timeout_s=6, heartbeat_interval_s=1,
        )  # fmt: skip

    a, b, c = member("a"), member("b"), member("c")
    everyone = set(range(partitions))
    try:
        async with TallyReader(kafka_bootstrap, topics) as reader:
            await send_all(kafka_bootstrap, topics.requests, requests.values())
            a.start()
            await reader.wait_answered(30, ids, timeout=120)
            b.start()
            groups.wait_settled([a, b], partitions)
            await reader.wait_answered(70, ids, timeout=120)
            stop_a = a.stop(timeout=120)
            procs.wait_for(lambda: groups.owned(b) == everyone, 60, "b to take every partition")
            await reader.wait_answered(110, ids, timeout=120)
            c.start()
            groups.wait_settled([b, c], partitions)
            await reader.wait_answered(150, ids, timeout=120)
            duplicates_before_kill = reader.tally.duplicates()
            assert b.proc is not None and b.proc.poll() is None, "b died on its own"
            b.kill()
            procs.wait_for(lambda: groups.owned(c) == everyone, 60, "c to take every partition")
            tally = await reader.collect(ids, timeout=240)
            await wait_committed_to_end(kafka_bootstrap, group, topics.requests)
            stop_c = c.stop(timeout=120)
            tally = await reader.read_to_end()
    finally:
        for m in (a, b, c):
            if m.proc is not None and m.proc.poll() is None:
                m.kill()

    per_member = {m.log_path.stem: groups.assignments(m) for m in (a, b, c)}
    while_full = sum(x.reason == "budget full" for xs in per_member.values() for x in xs)
    line = fault_report(
        "a alone; b joins; a SIGTERM; c joins; b SIGKILL (in-flight budget 2 requests); "
        f"{sum(map(len, per_member.values()))} assignments, {while_full} of them while paused; "
        f"duplicates before the SIGKILL {duplicates_before_kill}",
        tally.report(len(ids), ids),
    )
    assert stop_a == 0 and stop_c == 0, line
    assert tally.ok() == ids, line  # nothing lost; duplicates are allowed after a SIGKILL
    for name, assigned in per_member.items():
        for x in assigned:
            want = len(x.partitions) if x.reason in ("budget full", "stopping") else 0
            assert x.paused == want, f"{name}: {x} ({line})"
            if x.reason != "stopping":
                assert (x.reason == "budget full") == x.paused_before, f"{name}: {x}"
    for m in (a, c):  # the graceful stops report their peaks
        peak = m.wait_for_log(PEAK)
        peak_requests, max_requests, peak_bytes, max_bytes = map(int, peak.groups())
        assert peak_requests <= max_requests and peak_bytes <= max_bytes, (m.log_path.stem, line)


async def test_a_member_with_a_full_budget_pauses_what_a_rebalance_gives_it(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    """In the test above members have drained by the time they are assigned (the revocation
    waits for in-flight work), so their budget is open. Here it cannot drain: a budget of one
    request, held by a long SVD that outlasts the revocation's wait (drain_timeout_s=0.5). The
    rebalance comes from a bare aiokafka consumer joining the group, which takes a second where
    a second service would take several, so it lands well inside the SVD even on a fast core."""
    group = f"g-{topics.requests}"
    settings: dict[str, object] = {
        "group_id": group, "instance_id": "a", "pool_size": 1, "blas_threads": 1,
        "max_inflight": 1, "drain_timeout_s": 0.5, "session_timeout_s": 6,
        "heartbeat_interval_s": 0.3,
    }  # fmt: skip
    rng = np.random.default_rng(51)
    slow_id, slow = slow_svd_request(52)
    quick = dict(make_request(rng.standard_normal((16, 16))) for _ in range(40))
    ids = {slow_id, *quick}
    a = ServiceProcess(kafka_bootstrap, topics, tmp_path / "a.log", **settings)
    joiner = AIOKafkaConsumer(
        topics.requests, bootstrap_servers=kafka_bootstrap, group_id=group,
        client_id="zz-joiner", enable_auto_commit=False, heartbeat_interval_ms=300,
    )  # fmt: skip
    async with TallyReader(kafka_bootstrap, topics) as reader:
        with a:
            await send_all(kafka_bootstrap, topics.requests, [slow])
            a.wait_ready()
            procs.busy_worker(a.pid, cpu=0.3, timeout=120)  # the SVD holds a's whole budget
            # What is fetched now cannot be admitted: a pauses.
            await send_all(kafka_bootstrap, topics.requests, quick.values())
            a.wait_for_log("pausing", timeout=60)
            before = len(groups.assignments(a))
            await joiner.start()
            try:
                procs.wait_for(
                    lambda: len(groups.assignments(a)) > before, 60, "a to be assigned again"
                )
            finally:
                await joiner.stop()  # leaves the group: a takes every partition back
            tally = await reader.collect(ids, timeout=240)
            await wait_committed_to_end(kafka_bootstrap, group, topics.requests)
        tally = await reader.read_to_end()
    assigned = groups.assignments(a)
    while_full = assigned[before]
    line = fault_report(
        "a rebalance (a consumer joins) while a's budget of 1 is held by a slow SVD; a's "
        f"assignments: {assigned}",
        tally.report(len(ids), ids),
    )
    assert while_full.reason == "budget full" and while_full.paused_before, line
    assert while_full.paused == len(while_full.partitions) > 0, line
    for x in assigned:  # the one after the joiner left too, whichever state a was in then
        assert x.paused == (len(x.partitions) if x.reason != "budget open" else 0), line
    assert tally.ok() == ids, line
    # The slow request was in flight when its partition was revoked: it is computed again when
    # the partition is read from its last commit (at-least-once), even by the same member.
    assert tally.duplicates(ids - {slow_id}) == 0, line
    peak = a.wait_for_log(PEAK)
    assert int(peak.group(1)) <= 1, line
