"""A three-node KRaft cluster of this suite's own, healthy at the start of every test.

The cluster is started once per session (about 10 s) in a temporary directory; each test uses
topics of its own on it. A test that kills, stops or pauses nodes leaves the cluster to this
fixture, which brings every node back and waits until no partition is under-replicated before
the next test (a test that finds the cluster otherwise would measure the last one's damage).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator

import pytest

from localkafka import BrokerError, LocalCluster
from localkafka.topics import under_replicated
from tests.conftest import missing
from tests.support.report import CountsReport

_REPORT = CountsReport("cluster", "cluster fault counts")


def broker_properties() -> dict[str, str]:
    """SVD_CLUSTER_BROKER_PROPERTIES="k=v,k=v": broker settings to try under the same faults,
    e.g. broker.session.timeout.ms (docs/operations.md, "A replicated cluster")."""
    given = os.environ.get("SVD_CLUSTER_BROKER_PROPERTIES", "")
    pairs = [item.split("=", 1) for item in given.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise pytest.UsageError(f"SVD_CLUSTER_BROKER_PROPERTIES: not k=v,k=v: {given!r}")
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        workdir=tmp_path_factory.mktemp("cluster"), size=3, extra_properties=broker_properties()
    )
    try:
        local.start(die_with_parent=True)
    except BrokerError as exc:
        missing(f"the three-node cluster could not start: {exc}")
    try:
        yield local
    finally:
        local.destroy()


def restore(cluster: LocalCluster, timeout: float = 120.0) -> None:
    """Every node running and resumed, every partition led and fully in sync."""
    for node_id in cluster.node_ids:
        node = cluster.node(node_id)
        if node.status() is not None:
            node.resume()
    down = [cluster.node(i) for i in cluster.node_ids if cluster.node(i).status() is None]
    # Launched together: two nodes down have no quorum until both run.
    for node, state in [(n, n.launch(die_with_parent=True)) for n in down]:
        node.wait_ready(state)
    deadline = time.monotonic() + timeout
    while lagging := asyncio.run(under_replicated(cluster.bootstrap)):
        if time.monotonic() > deadline:
            raise AssertionError(f"still under-replicated after {timeout:g} s: {lagging}")
        time.sleep(0.5)


@pytest.fixture
def healthy_cluster(cluster: LocalCluster) -> Iterator[LocalCluster]:
    restore(cluster)
    try:
        yield cluster
    finally:
        restore(cluster)


@pytest.fixture
def cluster_report(request: pytest.FixtureRequest) -> Callable[[str, str], str]:
    """``cluster_report(injected, counts)``: one line of the report; returns it."""
    return _REPORT.recorder(request)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _REPORT.summary(terminalreporter)
