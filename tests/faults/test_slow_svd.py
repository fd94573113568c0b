"""One SVD slower than max.poll.interval: the member stays in its group, busy or draining.

aiokafka makes a member leave its group when ``getmany`` is not called for max.poll.interval;
its partitions then go to another member, which reads the request again from the last commit
and answers it a second time. The service keeps polling while its pool computes, so a slow SVD
must cause no rebalance and no second answer, also when SIGTERM comes in the middle of it.

Two members in one group, so a member dropped from the group shows as a rebalance in the other
member's log and as a duplicate answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from localkafka import TopicSettings
from tests.support import groups, procs
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all, wait_committed_to_end
from tests.support.workloads import slow_svd_request

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

MAX_POLL_INTERVAL_S = 1.5
# aiokafka's max.poll.interval is enforced by the client; session and heartbeat are the broker's
# (6 s is the broker's smallest session timeout).
GROUP_TIMINGS = {
    "max_poll_interval_s": MAX_POLL_INTERVAL_S,
    "session_timeout_s": 6,
    "heartbeat_interval_s": 1,
}


@pytest.fixture
def pair(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> Iterator[list[ServiceProcess]]:
    group = f"g-{topics.requests}"
    members = [
        ServiceProcess(
            kafka_bootstrap,
            topics,
            tmp_path / f"{name}.log",
            group_id=group,
            instance_id=name,
            pool_size=1,
            blas_threads=1,
            drain_timeout_s=90,
            **GROUP_TIMINGS,
        )
        for name in ("a", "b")
    ]
    with members[0], members[1]:
        groups.wait_settled(members, topics.requests_partitions)
        yield members


async def test_an_svd_slower_than_max_poll_interval_keeps_the_member_in_its_group(
    kafka_bootstrap: str,
    topics: TopicSettings,
    pair: list[ServiceProcess],
    fault_report: Callable[[str, str], str],
) -> None:
    before = [groups.rebalances(m) for m in pair]
    slow_id, slow = slow_svd_request(80)
    quick = dict(make_request(np.eye(8) * i + 1) for i in range(20))
    async with TallyReader(kafka_bootstrap, topics) as reader:
        await send_all(kafka_bootstrap, topics.requests, [slow, *quick.values()])
        tally = await reader.collect({slow_id, *quick}, timeout=180)
        tally = await reader.read_to_end()
    after = [groups.rebalances(m) for m in pair]

    (reply,) = tally.replies[slow_id]
    expected = {slow_id, *quick}
    line = fault_report(
        f"one {reply.compute_ms / 1000:.1f}s SVD (max.poll.interval {MAX_POLL_INTERVAL_S:g}s) "
        f"with {len(quick)} quick requests, two members; rebalance lines {before} -> {after}",
        tally.report(len(expected), expected),
    )
    assert reply.ok and reply.compute_ms is not None, line
    assert reply.compute_ms > 1.5 * MAX_POLL_INTERVAL_S * 1000, (
        f"not slow enough to prove it: {line}"
    )
    assert after == before, f"a rebalance happened during the slow SVD: {line}"
    assert tally.ok() == expected and tally.duplicates() == 0, line


async def test_sigterm_during_an_svd_slower_than_max_poll_interval_answers_it_once(
    kafka_bootstrap: str,
    topics: TopicSettings,
    pair: list[ServiceProcess],
    fault_report: Callable[[str, str], str],
) -> None:
    """The drain waits for the slow SVD; the member must stay in its group meanwhile, or its
    partition moves to the other member before the offset is committed: a second answer."""
    owner, _ = pair
    group = f"g-{topics.requests}"
    partition = min(groups.owned(owner))
    slow_id, slow = slow_svd_request(81)
    async with TallyReader(kafka_bootstrap, topics) as reader:
        await send_all(kafka_bootstrap, topics.requests, [slow], partition=partition)
        procs.busy_worker(owner.pid, cpu=0.5, timeout=120)
        assert owner.stop(timeout=120) == 0
        summary = owner.wait_for_log(r"in flight at stop (\d+), drained (\d+), cancelled (\d+)")
        tally = await reader.collect({slow_id}, timeout=60)
        # Once the group has committed past the request, no member will answer it again: then
        # every answer there will be is on the topic.
        await wait_committed_to_end(kafka_bootstrap, group, topics.requests, timeout=120)
        tally = await reader.read_to_end()
    (first, *again) = tally.replies[slow_id]
    line = fault_report(
        f"SIGTERM to the owner 0.5s into a {first.compute_ms or 0:.0f} ms SVD "
        f"(max.poll.interval {MAX_POLL_INTERVAL_S:g}s) with another member in the group; "
        f"drain summary {summary.groups()}",
        tally.report(1, {slow_id}),
    )
    assert summary.groups() == ("1", "1", "0"), line
    assert first.ok and first.instance_id == "a", line
    assert not again, f"answered twice (again by {[r.instance_id for r in again]}): {line}"
    assert "commit of" not in owner.log(), f"the drained answer's commit failed: {line}"
