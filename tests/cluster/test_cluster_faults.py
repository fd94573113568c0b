"""The cluster fault suite: a replicated three-node cluster fails under a steady SDK stream.

Each scenario sends a steady stream of small SVDs through the SDK to consumer instances on a
three-node KRaft cluster (replication 3, min.insync.replicas 2), injects one failure, waits for
answers to flow again, then counts from the results topic itself: sent (acknowledged by the
broker), refused (the SDK told its caller the send failed), answered, lost, duplicates, seconds
to recover (from the fault until every request sent before it ended was answered), the longest
gap between two answers, the slowest round trip, and member rebalances (assignments beyond each
process's first).

The promise: nothing sent is lost, no member is stuck (the group commits to the end of every
partition), exactly_once writes no duplicate among committed answers. `make cluster-faults`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from localkafka import LocalCluster, TopicSettings, partition_leaders
from tests.conftest import fresh_topics
from tests.support.service import ServiceProcess
from tests.support.stream import SdkStream, longest_gap
from tests.support.tally import Tally, TallyReader, wait_committed_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.cluster]

_ASSIGNED = re.compile(r"INFO consumer\.service: assigned \[")


class Members:
    """Consumer instances of one group; every process start gets a log file of its own."""

    def __init__(
        self,
        tmp_path: Path,
        bootstrap: str,
        topics: TopicSettings,
        group: str,
        count: int,
        *,
        static: bool,
        **settings: object,
    ) -> None:
        self._make = lambda index, start: ServiceProcess(
            bootstrap,
            topics,
            tmp_path / f"member-{index}-{start}.log",
            group_id=group,
            pool_size=1,
            **({"group_instance_id": f"{group}-{index}"} if static else {}),
            **settings,
        )
        self.processes = [self._make(i, 1) for i in range(count)]
        self.starts = [1] * count
        self.retired: list[ServiceProcess] = []

    def start(self) -> None:
        for process in self.processes:
            process.start()
        for process in self.processes:
            process.wait_ready(timeout=120)

    def restart(self, index: int) -> None:
        """SIGTERM one instance (drain, commit, close), start it again, wait for its partitions."""
        old = self.processes[index]
        assert old.stop(timeout=120) == 0, old.log()[-3000:]
        self.retired.append(old)
        self.starts[index] += 1
        new = self._make(index, self.starts[index])
        self.processes[index] = new.start()
        new.wait_ready(timeout=120)

    def rebalances(self) -> int:
        return sum(
            max(0, len(_ASSIGNED.findall(p.log())) - 1) for p in [*self.retired, *self.processes]
        )

    def logs(self) -> str:
        return "\n".join(p.log() for p in [*self.retired, *self.processes])

    def stop(self) -> list[int]:
        alive = [p.proc is not None and p.proc.poll() is None for p in self.processes]
        assert all(alive), f"a member died: {alive}\n{self.logs()[-4000:]}"
        return [p.stop(timeout=120) for p in self.processes]


@dataclass(frozen=True)
class Outcome:
    sent: int
    refused: int
    answered: int
    lost: int
    duplicates: int
    errors: dict[str, str]
    recovery_s: float
    longest_gap_s: float
    slowest_s: float
    rebalances: int
    exit_codes: list[int]
    logs: str

    def line(self) -> str:
        return (
            f"sent {self.sent}, refused {self.refused}, answered {self.answered}, "
            f"lost {self.lost}, duplicates {self.duplicates}, errors {len(self.errors)}, "
            f"recovered in {self.recovery_s:.1f} s, longest answer gap "
            f"{self.longest_gap_s:.1f} s, slowest answer {self.slowest_s:.1f} s, "
            f"member rebalances {self.rebalances}"
        )


def _leader(cluster: LocalCluster, topic: str, partition: int = 0) -> int:
    return asyncio.run(partition_leaders(cluster.bootstrap, topic))[partition]


def run_under_stream(
    cluster: LocalCluster,
    tmp_path: Path,
    fault: Callable[[TopicSettings, Members], None],
    *,
    members: int = 2,
    static: bool = False,
    guarantee: str = "at_least_once",
) -> Outcome:
    topics = fresh_topics(cluster.bootstrap)
    group = f"g-{topics.requests}"
    group_members = Members(
        tmp_path, cluster.bootstrap, topics, group, members,
        static=static, processing_guarantee=guarantee,
    )  # fmt: skip
    group_members.start()
    initial_rebalances = group_members.rebalances()
    stream = SdkStream(cluster.bootstrap, topics).start()
    try:
        began = time.monotonic()
        stream.wait_answered_after(began, 40, timeout=120)
        fault_at = time.monotonic()
        fault(topics, group_members)
        fault_over = time.monotonic()
        stream.wait_answered_after(fault_over, 40, timeout=240)
    finally:
        record = stream.stop()
    ended = time.monotonic()
    sent = set(record.submitted) - set(record.refused)
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"

    async def tally() -> Tally:
        async with TallyReader(cluster.bootstrap, topics, isolation_level=isolation) as reader:
            await reader.collect(sent, timeout=180)
            await wait_committed_to_end(cluster.bootstrap, group, topics.requests, timeout=120)
            return await reader.read_to_end()

    try:
        answers = asyncio.run(tally())
    finally:
        codes = group_members.stop()
    caught = [rid for rid in sent if record.submitted[rid] <= fault_over]
    recovered_at = max(record.answered.get(rid, ended) for rid in caught)
    return Outcome(
        sent=len(sent),
        refused=len(record.refused),
        answered=len(answers.answered() & sent),
        lost=len(sent - answers.answered()),
        duplicates=answers.duplicates(sent),
        errors=record.errors,
        recovery_s=recovered_at - fault_at,
        longest_gap_s=longest_gap(list(record.answered.values()), began, ended),
        slowest_s=max(t - record.submitted[rid] for rid, t in record.answered.items()),
        rebalances=group_members.rebalances() - initial_rebalances,
        exit_codes=codes,
        logs=group_members.logs(),
    )


def _check(outcome: Outcome, line: str, *, exactly_once: bool = False) -> None:
    assert outcome.lost == 0, line
    assert not outcome.errors, f"{line}\n{list(outcome.errors.items())[:5]}"
    assert outcome.exit_codes == [0] * len(outcome.exit_codes), line
    assert "Traceback" not in outcome.logs, line
    if exactly_once:
        assert outcome.duplicates == 0, line


@pytest.mark.parametrize("topic_kind", ["requests", "results"])
def test_a_partition_leader_killed_loses_nothing(
    healthy_cluster: LocalCluster,
    tmp_path: Path,
    cluster_report: Callable[[str, str], str],
    topic_kind: str,
) -> None:
    killed: list[int] = []

    def kill_leader(topics: TopicSettings, _: Members) -> None:
        topic = topics.requests if topic_kind == "requests" else topics.results
        node = _leader(healthy_cluster, topic)
        killed.append(node)
        healthy_cluster.node(node).kill()

    outcome = run_under_stream(healthy_cluster, tmp_path, kill_leader)
    line = cluster_report(
        f"SIGKILL node {killed[0]}, leader of {topic_kind} partition 0 (2 members)", outcome.line()
    )
    _check(outcome, line)


def test_a_broker_paused_past_the_session_timeout_loses_nothing(
    healthy_cluster: LocalCluster, tmp_path: Path, cluster_report: Callable[[str, str], str]
) -> None:
    paused: list[int] = []

    def pause_leader(topics: TopicSettings, _: Members) -> None:
        node = _leader(healthy_cluster, topics.requests)
        paused.append(node)
        healthy_cluster.node(node).pause()
        # Past the broker's session with the controller (9 s) and the members' (10 s).
        time.sleep(15)
        healthy_cluster.node(node).resume()

    outcome = run_under_stream(healthy_cluster, tmp_path, pause_leader)
    line = cluster_report(
        f"SIGSTOP node {paused[0]} (leader of requests partition 0) for 15 s, then SIGCONT",
        outcome.line(),
    )
    _check(outcome, line)


def test_a_rolling_restart_of_the_brokers_loses_nothing(
    healthy_cluster: LocalCluster, tmp_path: Path, cluster_report: Callable[[str, str], str]
) -> None:
    from tests.cluster.conftest import restore

    def rolling(_: TopicSettings, __: Members) -> None:
        for node_id in healthy_cluster.node_ids:
            node = healthy_cluster.node(node_id)
            node.stop()
            node.start(die_with_parent=True)
            restore(healthy_cluster)  # the next node waits until every replica is back in sync

    outcome = run_under_stream(healthy_cluster, tmp_path, rolling)
    line = cluster_report("rolling restart of nodes 1, 2, 3 (SIGTERM, start)", outcome.line())
    _check(outcome, line)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_a_rolling_restart_of_the_consumers(
    healthy_cluster: LocalCluster,
    tmp_path: Path,
    cluster_report: Callable[[str, str], str],
    static: bool,
) -> None:
    def rolling(_: TopicSettings, members: Members) -> None:
        for index in range(3):
            members.restart(index)

    outcome = run_under_stream(healthy_cluster, tmp_path, rolling, members=3, static=static)
    membership = "static membership" if static else "dynamic membership"
    line = cluster_report(
        f"rolling restart of 3 consumers with {membership} (SIGTERM, start)", outcome.line()
    )
    _check(outcome, line)
    if static:
        # Each instance came back as itself: nobody else's partitions moved.
        assert outcome.rebalances == 0, line
    else:
        assert outcome.rebalances > 0, line


def test_exactly_once_with_a_leader_killed_writes_no_duplicate(
    healthy_cluster: LocalCluster, tmp_path: Path, cluster_report: Callable[[str, str], str]
) -> None:
    killed: list[int] = []

    def kill_leader(topics: TopicSettings, _: Members) -> None:
        node = _leader(healthy_cluster, topics.requests)
        killed.append(node)
        healthy_cluster.node(node).kill()

    outcome = run_under_stream(healthy_cluster, tmp_path, kill_leader, guarantee="exactly_once")
    line = cluster_report(
        f"exactly_once: SIGKILL node {killed[0]}, leader of requests partition 0", outcome.line()
    )
    _check(outcome, line, exactly_once=True)


def test_the_quorum_lost_for_30_s_then_back_loses_nothing(
    healthy_cluster: LocalCluster, tmp_path: Path, cluster_report: Callable[[str, str], str]
) -> None:
    down: list[int] = []

    def lose_quorum(topics: TopicSettings, _: Members) -> None:
        leader = _leader(healthy_cluster, topics.requests)
        other = next(i for i in healthy_cluster.node_ids if i != leader)
        down.extend([leader, other])
        for node_id in down:
            healthy_cluster.node(node_id).kill()
        time.sleep(30)
        nodes = [healthy_cluster.node(i) for i in down]
        for node, state in [(n, n.launch(die_with_parent=True)) for n in nodes]:
            node.wait_ready(state)

    outcome = run_under_stream(healthy_cluster, tmp_path, lose_quorum)
    line = cluster_report(
        f"SIGKILL nodes {down} (no quorum, writes refused) for 30 s, then start both",
        outcome.line(),
    )
    _check(outcome, line)
