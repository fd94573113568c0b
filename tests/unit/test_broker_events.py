"""consumer/broker_events.py without a broker: aiokafka's records in, one line per event out.

Records go through the real "aiokafka" logger (and, where it matters, through aiokafka's own
code failing to connect); the cluster metadata is aiokafka's ClusterMetadata fed with metadata
responses. The same against a broker that stops and comes back:
tests/faults/test_broker_events.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import types
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiokafka.client
import aiokafka.consumer.fetcher
import aiokafka.consumer.group_coordinator
import aiokafka.producer.sender
import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import (
    KafkaConnectionError,
    NodeNotReadyError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    StaleMetadata,
)

from consumer import broker_events, logs
from consumer.broker_events import BrokerEvents
from consumer.metrics import Metrics

EVENTS = "consumer.broker_events"
REFUSED = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def metadata(
    brokers: dict[int, int], leaders: dict[str, dict[int, int]] | None = None
) -> SimpleNamespace:
    """A MetadataResponse (v1 layout) as ClusterMetadata.update_metadata reads it:
    ``brokers`` node -> port on 127.0.0.1, ``leaders`` topic -> partition -> leader."""
    return SimpleNamespace(
        API_VERSION=1,
        controller_id=min(brokers, default=-1),
        brokers=[(node, "127.0.0.1", port, None) for node, port in brokers.items()],
        topics=[
            (0, topic, False, [(0, p, leader, [leader], [leader]) for p, leader in parts.items()])
            for topic, parts in (leaders or {}).items()
        ],
    )


class FakeClient:
    """What the watcher uses of an AIOKafkaClient: its cluster, send (the probe), and a
    metadata refresh. Nodes in ``answering`` answer."""

    def __init__(self, brokers: dict[int, int]) -> None:
        self.cluster = ClusterMetadata(bootstrap_servers="127.0.0.1:9092")
        self.cluster.update_metadata(metadata(brokers))
        self.answering: set[int] = set()
        self.probed: list[int] = []
        self.refreshes = 0

    async def send(self, node_id: int, request: object) -> object:
        self.probed.append(node_id)
        if node_id in self.answering:
            return object()
        raise NodeNotReadyError(f"node {node_id} is not ready")

    def force_metadata_update(self) -> None:
        self.refreshes += 1


class Watched:
    """BrokerEvents on a fresh registry and clock, attached to the "aiokafka" logger."""

    def __init__(self, **options: Any) -> None:
        self.metrics = Metrics()
        self.clock = Clock()
        self.events = BrokerEvents(self.metrics, clock=self.clock, **options)
        self.events.attach()

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    async def poll_until(
        self, condition: Callable[[], bool], what: str, timeout: float = 5.0
    ) -> None:
        """Poll (probes run as tasks) until ``condition``; fail naming ``what``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.events.poll()
            if condition():
                return
            if loop.time() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}")
            await asyncio.sleep(0.005)


@pytest.fixture
def watched() -> Iterator[Watched]:
    w = Watched()
    try:
        yield w
    finally:
        w.events.close()


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Callable[[int | None], list[str]]:
    caplog.set_level(logging.INFO, logger=EVENTS)

    def of(level: int | None = None) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == EVENTS and (level is None or r.levelno == level)
        ]

    return of


def aiokafka_log(name: str) -> logging.Logger:
    return logging.getLogger(f"aiokafka.{name}")


def retries_of_node(node: int) -> None:
    """What aiokafka logs while ``node`` is down: every client, every retry."""
    for _ in range(20):
        aiokafka_log("client").error("Unable connect to node with id %s: %s", node, REFUSED)
        aiokafka_log("consumer.fetcher").error(
            "Failed fetch messages from %s: %s", node, NodeNotReadyError("not ready")
        )
        aiokafka_log("consumer.fetcher").error(
            "Failed fetch offsets from %s: %s", node, RequestTimedOutError()
        )
        aiokafka_log("producer.sender").warning(
            "Cannot send %r to %s: %r", object, node, NodeNotReadyError("not ready")
        )
        aiokafka_log("client").warning(
            "Unable to request metadata from node with id %s: %r",
            node,
            KafkaConnectionError("Connection at 127.0.0.1:9 closed"),
        )
        aiokafka_log("client").error("Unable to update metadata from %s", [node])


# -- the templates -----------------------------------------------------------------------------


def test_every_template_is_one_aiokafka_logs() -> None:
    """The watcher matches record.msg exactly: an aiokafka upgrade that rewords one fails here."""
    # The compiled constants, where a message split over two source lines is one string again.
    constants: set[str] = set()

    def collect(code: types.CodeType) -> None:
        for const in code.co_consts:
            if isinstance(const, str):
                constants.add(const)
            elif isinstance(const, types.CodeType):
                collect(const)

    for module in (
        aiokafka.client,
        aiokafka.consumer.fetcher,
        aiokafka.consumer.group_coordinator,
        aiokafka.producer.sender,
    ):
        collect(compile(inspect.getsource(module), module.__name__, "exec"))
    templates = [v for k, v in vars(broker_events).items() if k.startswith("_") and k.isupper()]
    templates = [t for t in templates if isinstance(t, str)]
    assert len(templates) == len(broker_events._TEMPLATES) == 12
    for template in templates:
        assert template in constants, template


async def test_aiokafkas_own_failed_connects_make_one_warning_per_node(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    """A real AIOKafkaClient failing to reach a node, again and again: one line, one count."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000)
    client.cluster.update_metadata(metadata({2: port}))
    watched.events.watch(client)
    try:
        for _ in range(5):
            assert await client.ready(2) is False
    finally:
        await client.close()
    assert lines(logging.WARNING) == [
        f"lost connection to broker 2 (127.0.0.1:{port}): ConnectionRefusedError: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {port}); retrying, requests for the "
        "partitions it leads wait until it is back or another broker leads them"
    ]
    assert watched.value("svd_broker_connection_losses_total", node="2") == 1
    assert watched.value("svd_brokers_unreachable") == 1


async def test_aiokafkas_failed_bootstrap_names_the_address(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000)
    try:
        for _ in range(3):
            with pytest.raises(KafkaConnectionError):
                await client.bootstrap()
    finally:
        await client.close()
    [line] = lines(logging.WARNING)
    assert line.startswith(f"lost connection to bootstrap server 127.0.0.1:{port}: ")
    assert watched.value("svd_broker_connection_losses_total", node=f"127.0.0.1:{port}") == 1


def test_every_retry_of_every_client_is_one_outage_per_node(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    retries_of_node(2)
    retries_of_node(3)
    retries_of_node(2)
    assert lines(logging.WARNING) == [
        "lost connection to broker 2: ConnectionRefusedError: [Errno 111] Connect call failed "
        "('127.0.0.1', 9); retrying, requests for the partitions it leads wait until it is "
        "back or another broker leads them",
        "lost connection to broker 3: ConnectionRefusedError: [Errno 111] Connect call failed "
        "('127.0.0.1', 9); retrying, requests for the partitions it leads wait until it is "
        "back or another broker leads them",
    ]
    assert watched.value("svd_broker_connection_losses_total", node="2") == 1
    assert watched.value("svd_broker_connection_losses_total", node="3") == 1
    assert watched.value("svd_brokers_unreachable") == 2


def test_other_records_and_errors_that_are_not_a_lost_connection_are_ignored(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    fetcher = aiokafka_log("consumer.fetcher")
    fetcher.error("Failed fetch messages from %s: %s", 2, NotLeaderForPartitionError())
    fetcher.error("Unexpected error in fetcher routine")
    aiokafka_log("client").error(
        "Unable connect to node with id %s: %s", 5, StaleMetadata("Broker id 5 not in metadata")
    )
    aiokafka_log("client").error("Unable connect to node with id %s: %s", "bootstrap", REFUSED)
    aiokafka_log("client").error("Unable to update metadata from %s", ["bootstrap"])
    aiokafka_log("conn").warning("Sending username and password in the clear")
    # Formatted text that reads like a template is not one.
    aiokafka_log("client").error("Unable connect to node with id 2: refused")
    logging.getLogger("elsewhere").error("Unable connect to node with id %s: %s", 2, REFUSED)
    assert lines(None) == []
    assert watched.value("svd_brokers_unreachable") == 0


def test_heartbeat_failures_name_the_coordinator(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    consumer = SimpleNamespace(_client=None, _coordinator=SimpleNamespace(coordinator_id=3))
    watched.events.watch_consumer(consumer, ["t"], "g")
    coordinator = aiokafka_log("consumer.group_coordinator")
    coordinator.error(
        "Heartbeat send request failed: %s. Will retry.", NotLeaderForPartitionError()
    )
    assert lines(logging.WARNING) == []
    coordinator.error("Heartbeat send request failed: %s. Will retry.", RequestTimedOutError())
    coordinator.error("Heartbeat session expired - marking coordinator dead")
    [line] = lines(logging.WARNING)
    assert line.startswith("lost connection to broker 3: [Error 7] RequestTimedOutError; retrying")


# -- recovery ----------------------------------------------------------------------------------


async def test_the_first_answer_closes_the_outage_once(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    client = FakeClient({1: 9091, 2: 9092})
    watched.events.watch(client)
    retries_of_node(2)
    watched.clock.now += 3.0
    watched.events.poll()
    await asyncio.sleep(0.01)  # the probe ran: not answering
    assert client.probed == [2]
    watched.events.poll()  # within the probe interval: no second probe yet
    assert client.probed == [2]
    assert lines(logging.INFO) == []
    client.answering.add(2)
    watched.clock.now += 9.3
    await watched.poll_until(lambda: bool(lines(logging.INFO)), "the recovery line")
    assert lines(logging.INFO) == ["broker 2 (127.0.0.1:9092) reachable again after 12.3 s"]
    assert watched.value("svd_brokers_unreachable") == 0
    for _ in range(5):
        watched.events.poll()
        await asyncio.sleep(0)
    assert len(lines(logging.INFO)) == 1
    assert client.probed == [2, 2]  # nothing probed once it answered
    # Stragglers of the outage just closed are not a new one...
    retries_of_node(2)
    assert len(lines(logging.WARNING)) == 1
    # ...failures after the quiet period are.
    watched.clock.now += 2.5
    retries_of_node(2)
    assert len(lines(logging.WARNING)) == 2
    assert watched.value("svd_broker_connection_losses_total", node="2") == 2
    assert watched.value("svd_brokers_unreachable") == 1


async def test_a_broker_out_of_the_metadata_is_said_once_then_forgotten(
    lines: Callable[[int | None], list[str]],
) -> None:
    w = Watched(gone_after_s=60.0, refresh_metadata_s=10.0)
    try:
        client = FakeClient({1: 9091, 2: 9092})
        w.events.watch(client)
        retries_of_node(2)
        client.cluster.update_metadata(metadata({1: 9091}))  # fenced: another broker answers
        for _ in range(5):
            w.events.poll()
            w.clock.now += 1.0
        assert lines(logging.INFO) == [
            "broker 2 (127.0.0.1:9092) is no longer in the cluster metadata (stopped, fenced or "
            "removed); its partitions need leaders on other brokers until it rejoins"
        ]
        assert client.probed == []  # a node the metadata does not list cannot be asked
        assert client.refreshes == 1  # one refresh per refresh_metadata_s, to see it rejoin
        w.clock.now += 10.0
        w.events.poll()
        assert client.refreshes == 2
        assert w.value("svd_brokers_unreachable") == 1
        w.clock.now += 60.0
        w.events.poll()
        assert lines(logging.INFO)[-1] == (
            "broker 2 (127.0.0.1:9092) has not been in the cluster metadata for 75 s: no longer "
            "counted as unreachable (it is logged when it rejoins)"
        )
        assert w.value("svd_brokers_unreachable") == 0
        client.cluster.update_metadata(metadata({1: 9091, 2: 9092}))
        w.events.poll()
        w.events.poll()
        assert lines(logging.INFO)[-1] == "broker 2 is in the cluster metadata again"
        assert len(lines(logging.INFO)) == 3
    finally:
        w.events.close()


async def test_a_bootstrap_address_becomes_its_node_once_the_metadata_names_it(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    client = FakeClient({1: 9091})
    watched.events.watch(client)
    aiokafka_log("client").error('Unable connect to "%s:%s": %s', "127.0.0.1", 9092, REFUSED)
    assert watched.value("svd_broker_connection_losses_total", node="127.0.0.1:9092") == 1
    client.cluster.update_metadata(metadata({1: 9091, 2: 9092}))
    watched.events.poll()
    retries_of_node(2)  # the same outage, now under its node id
    assert len(lines(logging.WARNING)) == 1
    client.answering.add(2)
    await watched.poll_until(lambda: bool(lines(logging.INFO)), "the recovery line")
    assert lines(logging.INFO) == ["broker 2 (127.0.0.1:9092) reachable again after 0.0 s"]
    assert watched.value("svd_brokers_unreachable") == 0


# -- leaders and the coordinator --------------------------------------------------------------


def test_leader_changes_are_diffed_between_polls(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    client = FakeClient({1: 9091, 2: 9092, 3: 9093})
    leaders = {"req": {0: 2, 1: 2, 2: 1, 3: 2}, "other": {0: 2}}
    client.cluster.update_metadata(metadata({1: 9091, 2: 9092, 3: 9093}, leaders))
    watched.events.watch(client, ["req"])
    watched.events.poll()
    watched.events.poll()
    assert lines(None) == []  # the first sight is the baseline
    assert watched.value("svd_partition_leader_changes_total", topic="req") == 0

    def leaders_now(req: dict[int, int]) -> None:
        client.cluster.update_metadata(
            metadata({1: 9091, 2: 9092, 3: 9093}, {"req": req, "other": {0: 3}})
        )
        watched.events.poll()
        watched.events.poll()

    leaders_now({0: 1, 1: -1, 2: 1, 3: 3})
    assert lines(logging.WARNING) == [
        "partitions without a leader: req-1 (was 2); requests and answers on them wait until "
        "one is elected"
    ]
    assert lines(logging.INFO) == ["partition leaders changed: req-0 2->1, req-3 2->3"]
    assert watched.value("svd_partition_leader_changes_total", topic="req") == 2
    assert watched.value("svd_partitions_without_leader") == 1
    leaders_now({0: 1, 1: 3, 2: 1, 3: 3})
    assert lines(logging.INFO)[-1] == "partition leaders changed: req-1 none->3"
    assert watched.value("svd_partition_leader_changes_total", topic="req") == 3
    assert watched.value("svd_partitions_without_leader") == 0
    # A metadata refresh that leaves the topic out (or fails) is not a change.
    client.cluster.update_metadata(metadata({1: 9091, 2: 9092, 3: 9093}, {}))
    watched.events.poll()
    assert len(lines(None)) == 3
    assert watched.value("svd_partition_leader_changes_total", topic="other") is None


def test_the_group_coordinator_lost_found_and_moved(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    coordinator = SimpleNamespace(coordinator_id=None)
    watched.events.watch_consumer(SimpleNamespace(_coordinator=coordinator), ["t"], "g")
    watched.events.poll()  # not found yet at start: not a loss
    coordinator.coordinator_id = 1
    watched.events.poll()
    assert lines(None) == []

    def marked_dead(node: int) -> None:
        for _ in range(3):
            aiokafka_log("consumer.group_coordinator").warning(
                "Marking the coordinator dead (node %s)for group %s.", node, "g"
            )

    # Marked dead and found again before the next poll (a broker moving its coordinators
    # away as it shuts down): one INFO, no warning.
    marked_dead(1)
    watched.clock.now += 0.2
    watched.events.poll()
    assert lines(None) == [
        "group coordinator of group g (broker 1) was marked dead and found again within 0.2 s"
    ]
    # Still unknown at the poll: one WARNING, then one INFO when found.
    marked_dead(1)
    coordinator.coordinator_id = None
    watched.clock.now += 4.5
    watched.events.poll()
    watched.events.poll()
    assert lines(logging.WARNING) == [
        "lost the group coordinator of group g (broker 1); commits and rebalances wait until "
        "it is found again"
    ]
    coordinator.coordinator_id = 1
    watched.events.poll()
    assert lines(logging.INFO)[-1] == "group coordinator of group g is broker 1 again after 4.5 s"
    coordinator.coordinator_id = 3
    watched.events.poll()
    watched.events.poll()
    assert lines(logging.INFO)[-1] == "group coordinator of group g moved: broker 1 -> 3"
    coordinator.coordinator_id = None  # lost without aiokafka's record (seen by the poll)
    watched.events.poll()
    coordinator.coordinator_id = 2
    watched.clock.now += 1.0
    watched.events.poll()
    assert lines(logging.INFO)[-1] == (
        "group coordinator of group g moved to broker 2 (was 3, lost for 1.0 s)"
    )
    assert len(lines(logging.WARNING)) == 2
    assert watched.value("svd_group_coordinator_changes_total") == 4
    assert len(lines(None)) == 6


# -- never taking the service down -------------------------------------------------------------


async def test_a_failing_watcher_reports_once_and_keeps_going(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    class Broken:
        @property
        def cluster(self) -> object:
            raise RuntimeError("metadata exploded")

    watched.events.watch(Broken(), ["t"])
    task = asyncio.create_task(watched.events.run(0.001))
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while watched.events._failures < 5:
            assert asyncio.get_running_loop().time() < deadline, "the watcher stopped polling"
            await asyncio.sleep(0.005)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [line] = lines(logging.WARNING)
    assert line.startswith("the broker event watcher failed watching the cluster")


def test_a_failure_on_a_record_never_reaches_aiokafka(
    watched: Watched,
    lines: Callable[[int | None], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(*args: object) -> None:
        raise ValueError("bug")

    monkeypatch.setattr(watched.events, "_lost", explode)
    retries_of_node(2)  # would raise out of aiokafka's logging call if the handler let it
    [line] = lines(logging.WARNING)
    assert line.startswith("the broker event watcher failed reading an aiokafka log record")


async def test_after_close_nothing_is_read(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    task = asyncio.create_task(watched.events.run(0.001))
    await asyncio.sleep(0.01)
    task.cancel()  # the shutdown cancels it before the clients close
    await asyncio.gather(task, return_exceptions=True)
    retries_of_node(2)
    assert lines(None) == []
    assert watched.events._listener not in logging.getLogger("aiokafka").handlers


# -- consumer/logs.py --------------------------------------------------------------------------


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_the_service_log_drops_aiokafkas_retries_but_not_its_critical_lines() -> None:
    quiet = logs.QuietAiokafka()
    assert not quiet.filter(record("aiokafka.client", logging.ERROR))
    assert not quiet.filter(record("aiokafka", logging.WARNING))
    assert quiet.filter(record("aiokafka.client", logging.CRITICAL))
    assert quiet.filter(record("consumer.broker_events", logging.WARNING))
    assert quiet.filter(record("aiokafkaesque", logging.ERROR))


@pytest.mark.parametrize(
    ("level", "aiokafka_level", "filtered"),
    [("INFO", logging.WARNING, True), ("DEBUG", logging.DEBUG, False)],
)
def test_configure_lets_the_watcher_read_aiokafka(
    level: str, aiokafka_level: int, filtered: bool
) -> None:
    root, aiokafka_logger = logging.getLogger(), logging.getLogger("aiokafka")
    saved = root.handlers[:], root.level, aiokafka_logger.level
    try:
        logs.configure(level)
        assert aiokafka_logger.level == aiokafka_level
        [handler] = root.handlers
        assert any(isinstance(f, logs.QuietAiokafka) for f in handler.filters) is filtered
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        aiokafka_logger.setLevel(saved[2])


# -- the member dropped by its coordinator -------------------------------------------------------

_UNKNOWN = "Heartbeat failed: local member_id was not recognized; resetting and re-joining group"


def test_a_dynamic_member_dropped_says_so_each_time_and_never_blames_a_duplicate(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    consumer = SimpleNamespace(_client=None, _coordinator=SimpleNamespace(coordinator_id=1))
    watched.events.watch_consumer(consumer, ["t"], "g")
    for _ in range(5):
        aiokafka_log("consumer.group_coordinator").warning(_UNKNOWN)
        watched.clock.now += 3.0
    assert len(lines(logging.WARNING)) == 5
    assert all("no longer knew this member" in line for line in lines(logging.WARNING))
    assert lines(logging.ERROR) == []
    assert watched.value("svd_group_member_drops_total") == 5


def test_a_static_member_dropped_again_and_again_is_told_its_id_is_shared(
    watched: Watched, lines: Callable[[int | None], list[str]]
) -> None:
    consumer = SimpleNamespace(_client=None, _coordinator=SimpleNamespace(coordinator_id=1))
    watched.events.watch_consumer(consumer, ["t"], "g", "svd-0")
    coordinator = aiokafka_log("consumer.group_coordinator")
    coordinator.warning(_UNKNOWN)  # once: a session that expired, not a duplicate
    watched.clock.now += 61.0
    coordinator.warning(_UNKNOWN)
    watched.clock.now += 3.0
    assert lines(logging.ERROR) == []
    for _ in range(20):  # two processes taking turns, a heartbeat interval apart
        coordinator.warning(_UNKNOWN)
        watched.clock.now += 3.0
    [error] = lines(logging.ERROR)
    assert "dropped this member 3 times in 60 s" in error
    assert "group_instance_id 'svd-0'" in error and "SVD_GROUP_INSTANCE_ID" in error
    watched.clock.now += 600.0
    for _ in range(3):
        coordinator.warning(_UNKNOWN)
    assert len(lines(logging.ERROR)) == 2  # said again ten minutes on, while it lasts
    assert watched.value("svd_group_member_drops_total") == 25
