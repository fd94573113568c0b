"""Static membership on the real broker: a restarted member is itself again, and two processes
sharing one group_instance_id are told so (aiokafka itself would let them take turns for ever)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from localkafka import TopicSettings
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka

_ASSIGNED = r"INFO consumer\.service: assigned \["


def test_a_static_member_restarted_gets_its_partitions_back_without_a_rebalance(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    def member(name: str, start: int) -> ServiceProcess:
        return ServiceProcess(
            kafka_bootstrap, topics, tmp_path / f"{name}-{start}.log",
            pool_size=1, group_instance_id=f"{topics.requests}-{name}",
        )  # fmt: skip

    stays, leaves = member("a", 1), member("b", 1)
    with stays:
        stays.wait_ready()
        with leaves:
            leaves.wait_ready()
            # b's join is a rebalance for a: it now holds what it keeps.
            kept = stays.wait_for_log(_ASSIGNED, count=2).group(0)
            first = leaves.wait_for_log(r"assigned (\[[^\]]*\])").group(1)
        assert leaves.proc is not None and leaves.proc.returncode == 0
        with member("b", 2) as again:
            again.wait_ready()
            assert again.wait_for_log(r"assigned (\[[^\]]*\])").group(1) == first
        # Neither the stop nor the return moved a's partitions: no rebalance for it at all.
        assert len(re.findall(_ASSIGNED, stays.log())) == 2, f"{kept}\n{stays.log()[-2000:]}"


def test_two_processes_sharing_one_instance_id_are_told_to_fix_it(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    twins = [
        ServiceProcess(
            kafka_bootstrap,
            topics,
            tmp_path / f"twin-{i}.log",
            pool_size=1,
            group_instance_id=f"{topics.requests}-twin",
        )
        for i in range(2)
    ]
    with twins[0], twins[1]:
        twins[0].wait_ready()
        # They take turns every heartbeat (3 s); the third drop within a minute names the cause.
        pattern = r"ERROR consumer\.broker_events: .* dropped this member 3 times in 60 s: .*"
        line = _first_of(twins, pattern, timeout=90)
    assert f"group_instance_id '{topics.requests}-twin'" in line
    assert "SVD_GROUP_INSTANCE_ID" in line


def _first_of(processes: list[ServiceProcess], pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if match := re.search(pattern, process.log()):
                return match.group(0)
        time.sleep(0.2)
    tails = "\n---\n".join(p.log()[-2000:] for p in processes)
    raise AssertionError(f"{pattern!r} in neither log within {timeout} s:\n{tails}")
