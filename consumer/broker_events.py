"""What happens to the Kafka cluster, as an operator reads it: broker connections lost and
recovered, partition leaders moving, the group coordinator lost or moved. Once per event.

aiokafka has no callbacks for any of this. It logs each failed attempt (every retry, at ERROR),
and its clients hold the cluster metadata and the coordinator. So there are two halves:

- Loss, from aiokafka's log records. A handler on the "aiokafka" logger matches records by
  their template (``record.msg``) and arguments, never by formatted text, and turns a broker's
  first failure into one WARNING and a count; every further retry for the same broker is
  absorbed until it is reachable again. consumer/logs.py keeps those per-retry records off the
  service's own log (they are still printed at SVD_LOG_LEVEL=DEBUG).
- Recovery and changes, by polling about once a second (``run``): a broker with an open outage
  is asked for (empty) metadata through a watched client, and its first answer closes the outage
  with one INFO; the leaders of the watched topics' partitions and the group coordinator are
  compared with the previous round.

Node ids are the cluster's, so every client of the service (the requests consumer, the answers
producer, exactly_once's transactional producers, the admin client) reports into the same
outages; the first two are also watched for metadata and probing. The module reads aiokafka
internals, each guarded and checked against aiokafka 0.14.0: the log templates below, the
consumer's ``_client`` and ``_coordinator.coordinator_id``, the clients' ``cluster``. Nothing
here may take the service down: a failure is logged once and the watcher carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    NodeNotReadyError,
    RequestTimedOutError,
    StaleMetadata,
)
from aiokafka.protocol.metadata import MetadataRequest

from consumer.metrics import Metrics
from consumer.tasks import TaskSet

log = logging.getLogger(__name__)

AIOKAFKA_LOGGER = "aiokafka"
POLL_INTERVAL_S = 1.0

# aiokafka 0.14.0's log templates (record.msg), and what their arguments are.
# A failed connection attempt: any error but StaleMetadata (a node no longer in the metadata).
_CONNECT_NODE = "Unable connect to node with id %s: %s"  # client.py _get_conn: (node_id, err)
_CONNECT_ADDRESS = 'Unable connect to "%s:%s": %s'  # client.py bootstrap: (host, port, err)
# A failed request: a loss only for the connection errors below (not e.g. NotLeaderForPartition).
_METADATA_NODE = "Unable to request metadata from node with id %s: %r"  # (node_id, err)
_METADATA_ADDRESS = 'Unable to request metadata from "%s:%s": %s'  # bootstrap: (host, port, err)
_FETCH = "Failed fetch messages from %s: %s"  # consumer/fetcher.py: (node_id, err)
_OFFSETS = "Failed fetch offsets from %s: %s"  # consumer/fetcher.py: (node_id, err)
_SEND = "Cannot send %r to %s: %r"  # producer/sender.py: (request class, node_id, err)
# Every known node failed a metadata request (each also logged one of the above): (node_ids,).
_METADATA_ALL = "Unable to update metadata from %s"
# The group coordinator (consumer/group_coordinator.py): the node is the coordinator's id.
_HEARTBEAT_FAILED = "Heartbeat send request failed: %s. Will retry."  # (err,)
_SESSION_EXPIRED = "Heartbeat session expired - marking coordinator dead"  # ()
_COORDINATOR_DEAD = "Marking the coordinator dead (node %s)for group %s."  # (node_id, group)
# The coordinator no longer knows this member: its session expired, or (static membership)
# another process joined with the same group.instance.id and took its place. aiokafka sends its
# heartbeats without the instance id, so the broker answers UNKNOWN_MEMBER_ID, not
# FENCED_INSTANCE_ID, and aiokafka rejoins; two processes with one id then take turns for ever.
_MEMBER_UNKNOWN = (
    "Heartbeat failed: local member_id was not recognized; resetting and re-joining group"
)
# Dropped this often within the window, a static member is almost surely sharing its id.
_DROPS_FOR_DUPLICATE = 3
_DROPS_WINDOW_S = 60.0

_CONNECTION_ERRORS = (
    KafkaConnectionError,
    NodeNotReadyError,
    RequestTimedOutError,
    OSError,
    TimeoutError,
)


_TEMPLATES = frozenset(
    (
        _CONNECT_NODE, _CONNECT_ADDRESS, _METADATA_NODE, _METADATA_ADDRESS, _FETCH, _OFFSETS,
        _SEND, _METADATA_ALL, _HEARTBEAT_FAILED, _SESSION_EXPIRED, _COORDINATOR_DEAD,
        _MEMBER_UNKNOWN,
    )
)  # fmt: skip


def _describe(err: object) -> str:
    if isinstance(err, KafkaError):
        return str(err)  # names its class already
    if isinstance(err, BaseException):
        text = str(err)
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return str(err)


@dataclass
class _Outage:
    """One broker (or an unresolved bootstrap address) since its first failure."""

    key: str  # the metric's node label: the node id, or host:port of a bootstrap server
    node: int | None
    address: str | None
    since: float
    probe: asyncio.Task[bool] | None = None
    last_probe: float = -1e18
    left_metadata_at: float | None = None

    def name(self) -> str:
        if self.node is None:
            return f"bootstrap server {self.address}"
        return f"broker {self.node}" + (f" ({self.address})" if self.address else "")


@dataclass
class _CoordinatorLoss:
    node: int
    since: float
    said: bool = False  # the WARNING was logged


class _Listener(logging.Handler):
    """Hands aiokafka's records to the watcher; never raises into aiokafka's code."""

    def __init__(self, events: BrokerEvents) -> None:
        super().__init__(logging.DEBUG)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._events.on_record(record)
        except Exception as exc:  # a bug here must not break aiokafka's logging call
            self._events.failed("reading an aiokafka log record", exc)


class BrokerEvents:
    """Watches the cluster for the service; ``attach`` before the clients start, then ``run``.

    ``quiet_after_recovery_s``: failures of a broker this soon after it answered again are
    taken as stragglers of the outage just closed (requests that failed before it was back),
    not as a new one. ``gone_after_s``: a broker out of the cluster metadata this long stops
    counting as unreachable (removed from the cluster). ``refresh_metadata_s``: while a broker
    with an outage is missing from the metadata, how often a refresh is asked for (aiokafka
    otherwise refreshes every five minutes), to notice it rejoining.

    Everything runs on the event loop's thread (aiokafka logs from its tasks), so no lock.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        tasks: TaskSet | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe_interval_s: float = POLL_INTERVAL_S,
        quiet_after_recovery_s: float = 2.0,
        gone_after_s: float = 600.0,
        refresh_metadata_s: float = 10.0,
    ) -> None:
        self._metrics = metrics
        self._tasks = tasks or TaskSet()  # the probes: the service's registry, so none is lost
        self._clock = clock
        self._probe_interval_s = probe_interval_s
        self._quiet_after_recovery_s = quiet_after_recovery_s
        self._gone_after_s = gone_after_s
        self._refresh_metadata_s = refresh_metadata_s
        self._listener = _Listener(self)
        self._logger: logging.Logger | None = None
        self._closing = False
        self._outages: dict[str, _Outage] = {}
        self._recovered_at: dict[str, float] = {}
        self._gone: set[int] = set()
        self._last_refresh = -1e18
        # Watched aiokafka clients (AIOKafkaClient), each with the topics whose leaders it tracks.
        self._clients: list[tuple[Any, tuple[str, ...]]] = []
        self._leaders: dict[TopicPartition, int] = {}  # last seen leader, -1 for none
        self._consumer: Any = None
        self._group: str | None = None
        self._coordinator: int | None = None  # the last coordinator seen
        self._coordinator_lost: _CoordinatorLoss | None = None
        self._instance_id: str | None = None  # static membership's group.instance.id
        self._drops: list[float] = []  # when the coordinator last dropped this member
        self._duplicate_said_at: float | None = None
        self._failures = 0

    # -- set-up --------------------------------------------------------------------------------
    def attach(self, logger_name: str = AIOKAFKA_LOGGER) -> None:
        """Read aiokafka's records: its logger must pass WARNING (consumer/logs.py sets it)."""
        if self._logger is None:
            self._logger = logging.getLogger(logger_name)
            self._logger.addHandler(self._listener)

    def close(self) -> None:
        """Detach from the logger and stop the probes in flight. Idempotent."""
        self._closing = True
        if self._logger is not None:
            self._logger.removeHandler(self._listener)
            self._logger = None
        for outage in self._outages.values():
            if outage.probe is not None:
                outage.probe.cancel()

    def watch(self, client: Any, topics: Iterable[str] = ()) -> None:
        """An aiokafka client (AIOKafkaClient): its metadata, its connections for the probes,
        and the leaders of ``topics``' partitions as it sees them."""
        if client is None or any(c is client for c, _ in self._clients):
            return
        tracked = tuple(t for t in topics if t not in self._tracked_topics())
        self._clients.append((client, tracked))
        for topic in tracked:  # exposed at 0, so that increase() works from the first change
            self._metrics.partition_leader_changes.labels(topic=topic)

    def watch_producer(self, producer: Any, topics: Iterable[str] = ()) -> None:
        self.watch(getattr(producer, "client", None), topics)

    def watch_consumer(
        self,
        consumer: Any,
        topics: Iterable[str],
        group_id: str,
        instance_id: str | None = None,
    ) -> None:
        # aiokafka 0.14.0: AIOKafkaConsumer._client, ._coordinator (GroupCoordinator).
        self.watch(getattr(consumer, "_client", None), topics)
        self._consumer = consumer
        self._group = group_id
        self._instance_id = instance_id

    def _tracked_topics(self) -> set[str]:
        return {t for _, topics in self._clients for t in topics}

    # -- loss: aiokafka's records --------------------------------------------------------------
    def on_record(self, record: logging.LogRecord) -> None:
        if self._closing or not isinstance(record.msg, str) or record.msg not in _TEMPLATES:
            return
        template, args = record.msg, record.args if isinstance(record.args, tuple) else ()
        now = self._clock()
        if template == _CONNECT_NODE and len(args) == 2:
            if not isinstance(args[1], StaleMetadata):
                self._lost(args[0], None, args[1], now)
        elif template in (_METADATA_NODE, _FETCH, _OFFSETS) and len(args) == 2:
            if isinstance(args[1], _CONNECTION_ERRORS):
                self._lost(args[0], None, args[1], now)
        elif template == _SEND and len(args) == 3:
            if isinstance(args[2], _CONNECTION_ERRORS):
                self._lost(args[1], None, args[2], now)
        elif template == _CONNECT_ADDRESS and len(args) == 3:
            self._lost(None, (str(args[0]), args[1]), args[2], now)
        elif template == _METADATA_ADDRESS and len(args) == 3:
            if isinstance(args[2], _CONNECTION_ERRORS):
                self._lost(None, (str(args[0]), args[1]), args[2], now)
        elif template == _METADATA_ALL and len(args) == 1 and isinstance(args[0], list | tuple):
            for node in args[0]:
                self._lost(node, None, "no answer to a metadata request", now)
        elif template == _HEARTBEAT_FAILED and len(args) == 1:
            node = self._current_coordinator()
            if node is not None and isinstance(args[0], _CONNECTION_ERRORS):
                self._lost(node, None, args[0], now)
        elif template == _SESSION_EXPIRED:
            node = self._current_coordinator()
            if node is not None:
                self._lost(node, None, "no heartbeat answered within the session timeout", now)
        elif template == _COORDINATOR_DEAD and len(args) == 2 and isinstance(args[0], int):
            self._coordinator_gone(args[0], now)
        elif template == _MEMBER_UNKNOWN:
            self._dropped(now)

    def _dropped(self, now: float) -> None:
        """The coordinator dropped this member: one line per drop, and for a static member
        dropped again and again, one ERROR naming the likely cause (every ten minutes)."""
        self._metrics.member_drops.inc()
        self._drops = [t for t in self._drops if now - t < _DROPS_WINDOW_S] + [now]
        if self._instance_id is None or len(self._drops) < _DROPS_FOR_DUPLICATE:
            log.warning(
                "the coordinator of group %s no longer knew this member (its session expired "
                "or it was replaced); rejoining, its partitions are reassigned",
                self._group,
            )
            return
        said = self._duplicate_said_at
        if said is None or now - said >= 10 * _DROPS_WINDOW_S:
            self._duplicate_said_at = now
            log.error(
                "the coordinator of group %s dropped this member %d times in %.0f s: another "
                "running process most likely uses group_instance_id %r too, and each join "
                "fences the other (both keep rebalancing, and answer requests twice). Give "
                "every instance its own SVD_GROUP_INSTANCE_ID",
                self._group, len(self._drops), _DROPS_WINDOW_S, self._instance_id,
            )  # fmt: skip

    def _lost(
        self, node: object, address: tuple[str, object] | None, err: object, now: float
    ) -> None:
        if address is None:
            node_id, address = self._node_and_address(node)
        else:
            node_id = self._node_at(*address)
        if node_id is None and address is None:
            return  # nothing to name it by (aiokafka's own "bootstrap" pseudo node)
        where = f"{address[0]}:{address[1]}" if address is not None else None
        key = str(node_id) if node_id is not None else str(where)
        if key in self._outages:
            return
        recovered = self._recovered_at.get(key)
        if recovered is not None and now - recovered < self._quiet_after_recovery_s:
            return
        outage = _Outage(key=key, node=node_id, address=where, since=now)
        self._outages[key] = outage
        self._metrics.broker_connection_losses.labels(node=key).inc()
        self._metrics.brokers_unreachable.set(len(self._outages))
        if node_id is None:
            log.warning("lost connection to %s: %s; retrying", outage.name(), _describe(err))
        else:
            log.warning(
                "lost connection to %s: %s; retrying, requests for the partitions it leads "
                "wait until it is back or another broker leads them",
                outage.name(), _describe(err),
            )  # fmt: skip

    def _node_and_address(self, node: object) -> tuple[int | None, tuple[str, object] | None]:
        """A node id from a record: the cluster's int id, or aiokafka's "bootstrap-N" ids for
        the bootstrap servers before the first metadata (resolved to a node when possible)."""
        for client, _ in self._clients:
            cluster = _cluster(client)
            broker = cluster.broker_metadata(node) if cluster is not None else None
            if broker is not None:
                address = (str(broker.host), broker.port)
                if isinstance(node, int):
                    return node, address
                return self._node_at(*address), address
        return (node, None) if isinstance(node, int) else (None, None)

    def _node_at(self, host: str, port: object) -> int | None:
        for node, broker in self._brokers().items():
            if str(broker.host) == host and str(broker.port) == str(port):
                return node
        return None

    def _brokers(self) -> dict[int, Any]:
        """The brokers of the cluster metadata (not the bootstrap placeholders), over every
        watched client."""
        brokers: dict[int, Any] = {}
        for client, _ in self._clients:
            cluster = _cluster(client)
            for broker in cluster.brokers() if cluster is not None else ():
                if isinstance(broker.nodeId, int):
                    brokers.setdefault(broker.nodeId, broker)
        return brokers

    def _freshest(self) -> Any:
        """The watched client with the newest metadata: the one to ask who is in the cluster
        (the others' may be minutes old: aiokafka refreshes on errors or every five minutes)."""
        clients = [c for c, _ in self._clients if _node_ids(_cluster(c))]
        # aiokafka 0.14.0: ClusterMetadata._last_successful_refresh_ms.
        return max(
            clients,
            key=lambda c: getattr(_cluster(c), "_last_successful_refresh_ms", 0) or 0,
            default=None,
        )

    def _members(self) -> set[int]:
        return _node_ids(_cluster(self._freshest()))

    # -- the watcher ---------------------------------------------------------------------------
    async def run(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Poll until cancelled; a failure is reported (once) and the next round goes on."""
        try:
            while True:
                try:
                    self.poll()
                except Exception as exc:
                    self.failed("watching the cluster", exc)
                await asyncio.sleep(interval_s)
        finally:
            self.close()

    def poll(self) -> None:
        """One round: outages, partition leaders, the group coordinator."""
        now = self._clock()
        self._poll_outages(now)
        self._poll_leaders()
        self._poll_coordinator(now)

    def failed(self, doing: str, exc: BaseException) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning(
                "the broker event watcher failed %s (%r); carrying on (further failures are "
                "logged at DEBUG)",
                doing, exc, exc_info=exc,
            )  # fmt: skip
        else:
            log.debug("the broker event watcher failed %s again: %r", doing, exc)

    # -- recovery ------------------------------------------------------------------------------
    def _poll_outages(self, now: float) -> None:
        brokers = self._brokers()
        self._forget_returned(brokers)
        if not self._outages:
            return
        members = self._members()
        for outage in list(self._outages.values()):
            probe = outage.probe
            if probe is not None and probe.done():
                outage.probe = None
                if not probe.cancelled() and probe.exception() is None and probe.result():
                    self._recovered(outage, now)
                    continue
            if outage.node is None:
                self._resolve(outage, brokers)
                if outage.key not in self._outages:
                    continue
            if outage.node is not None and members and outage.node not in members:
                self._missing_from_metadata(outage, now)
                continue
            outage.left_metadata_at = None
            if outage.probe is None and now - outage.last_probe >= self._probe_interval_s:
                probe_coro = self._probe(outage)
                if probe_coro is not None:
                    outage.last_probe = now
                    outage.probe = self._tasks.spawn(probe_coro, name=f"broker-probe {outage.key}")

    def _resolve(self, outage: _Outage, brokers: dict[int, Any]) -> None:
        """A bootstrap address whose node the metadata now names becomes that node's outage."""
        assert outage.address is not None
        host, _, port = outage.address.rpartition(":")
        node = next(
            (n for n, b in brokers.items() if str(b.host) == host and str(b.port) == port), None
        )
        if node is None:
            return
        del self._outages[outage.key]
        if str(node) in self._outages:  # already counted under its node
            self._metrics.brokers_unreachable.set(len(self._outages))
            if outage.probe is not None:
                outage.probe.cancel()
            return
        outage.key, outage.node = str(node), node
        outage.address = f"{host}:{port}"
        if outage.probe is not None:
            outage.probe.cancel()
            outage.probe = None
        self._outages[outage.key] = outage

    def _missing_from_metadata(self, outage: _Outage, now: float) -> None:
        if outage.left_metadata_at is None:
            outage.left_metadata_at = now
            log.info(
                "%s is no longer in the cluster metadata (stopped, fenced or removed); "
                "its partitions need leaders on other brokers until it rejoins",
                outage.name(),
            )
        elif now - outage.left_metadata_at >= self._gone_after_s:
            self._close(outage)
            assert outage.node is not None
            self._gone.add(outage.node)
            log.info(
                "%s has not been in the cluster metadata for %.0f s: no longer counted as "
                "unreachable (it is logged when it rejoins)",
                outage.name(), now - outage.left_metadata_at,
            )  # fmt: skip
            return
        client = self._freshest()
        if client is not None and now - self._last_refresh >= self._refresh_metadata_s:
            self._last_refresh = now
            # aiokafka 0.14.0: wakes the client's metadata synchronizer (a future to ignore).
            client.force_metadata_update()

    def _forget_returned(self, brokers: dict[int, Any]) -> None:
        for node in sorted(self._gone & set(brokers)):
            self._gone.discard(node)
            log.info("broker %d is in the cluster metadata again", node)

    def _probe(self, outage: _Outage) -> Coroutine[Any, Any, bool] | None:
        """A coroutine answering whether the broker answers now; None if it cannot be asked."""
        if outage.node is None:
            assert outage.address is not None
            host, _, port = outage.address.rpartition(":")
            return _answers_tcp(host, int(port))
        client = next((c for c, _ in self._clients if outage.node in _node_ids(_cluster(c))), None)
        if client is None:
            return None
        return _answers_metadata(client, outage.node)

    def _recovered(self, outage: _Outage, now: float) -> None:
        self._close(outage)
        self._recovered_at[outage.key] = now
        log.info("%s reachable again after %.1f s", outage.name(), now - outage.since)

    def _close(self, outage: _Outage) -> None:
        self._outages.pop(outage.key, None)
        if outage.probe is not None:
            outage.probe.cancel()
            outage.probe = None
        self._metrics.brokers_unreachable.set(len(self._outages))

    # -- partition leaders ---------------------------------------------------------------------
    def _poll_leaders(self) -> None:
        moved: list[str] = []
        leaderless: list[str] = []
        for client, topics in self._clients:
            cluster = _cluster(client)
            if cluster is None:
                continue
            for topic in topics:
                for partition in sorted(cluster.partitions_for_topic(topic) or ()):
                    tp = TopicPartition(topic, partition)
                    leader = cluster.leader_for_partition(tp)
                    if not isinstance(leader, int):
                        continue  # unknown to this metadata: keep what was seen
                    leader = max(leader, -1)
                    before = self._leaders.get(tp)
                    self._leaders[tp] = leader
                    if before == leader:
                        continue
                    name = f"{topic}-{partition}"
                    if leader == -1:
                        leaderless.append(f"{name} (was {_leader(before)})")
                    elif before is not None:
                        moved.append(f"{name} {_leader(before)}->{leader}")
                        self._metrics.partition_leader_changes.labels(topic=topic).inc()
        self._metrics.partitions_without_leader.set(
            sum(1 for leader in self._leaders.values() if leader == -1)
        )
        if leaderless:
            log.warning(
                "partitions without a leader: %s; requests and answers on them wait until one "
                "is elected",
                ", ".join(leaderless),
            )
        if moved:
            log.info("partition leaders changed: %s", ", ".join(moved))

    # -- the group coordinator -----------------------------------------------------------------
    def _current_coordinator(self) -> int | None:
        # aiokafka 0.14.0: GroupCoordinator.coordinator_id, None while unknown or marked dead.
        node = getattr(getattr(self._consumer, "_coordinator", None), "coordinator_id", None)
        return node if isinstance(node, int) else None

    def _coordinator_gone(self, node: int, now: float) -> None:
        """Marked dead: counted now, said at the next poll, as a loss if it is still unknown
        then, or as a blip if aiokafka found it again meanwhile (a broker shutting down first
        answers that it is not the coordinator, and the lookup still finds it)."""
        if self._coordinator_lost is None:
            self._coordinator_lost = _CoordinatorLoss(node, now)
            self._coordinator = node
            self._metrics.group_coordinator_changes.inc()

    def _poll_coordinator(self, now: float) -> None:
        if self._consumer is None:
            return
        node = self._current_coordinator()
        lost = self._coordinator_lost
        if node is None:
            if lost is None and self._coordinator is not None:
                self._coordinator_gone(self._coordinator, now)
                lost = self._coordinator_lost
            if lost is not None and not lost.said:
                lost.said = True
                log.warning(
                    "lost the group coordinator of group %s (broker %d); commits and "
                    "rebalances wait until it is found again",
                    self._group, lost.node,
                )  # fmt: skip
            return
        if lost is not None:
            self._coordinator_lost = None
            if node != lost.node:
                log.info(
                    "group coordinator of group %s moved to broker %d (was %d, lost for %.1f s)",
                    self._group, node, lost.node, now - lost.since,
                )  # fmt: skip
            elif lost.said:
                log.info(
                    "group coordinator of group %s is broker %d again after %.1f s",
                    self._group, node, now - lost.since,
                )  # fmt: skip
            else:
                log.info(
                    "group coordinator of group %s (broker %d) was marked dead and found again "
                    "within %.1f s",
                    self._group, node, now - lost.since,
                )  # fmt: skip
        elif self._coordinator is not None and node != self._coordinator:
            self._metrics.group_coordinator_changes.inc()
            log.info(
                "group coordinator of group %s moved: broker %d -> %d",
                self._group, self._coordinator, node,
            )  # fmt: skip
        self._coordinator = node


def _cluster(client: Any) -> Any:
    # aiokafka 0.14.0: AIOKafkaClient.cluster (ClusterMetadata).
    return getattr(client, "cluster", None)


def _node_ids(cluster: Any) -> set[int]:
    if cluster is None:
        return set()
    return {b.nodeId for b in cluster.brokers() if isinstance(b.nodeId, int)}


def _leader(node: int | None) -> str:
    return "none" if node is None or node < 0 else str(node)


async def _answers_metadata(client: Any, node: int) -> bool:
    """An empty metadata request to ``node`` through ``client``: connecting (aiokafka's
    ``ready``) and a round trip, bounded by the client's request timeout."""
    try:
        await client.send(node, MetadataRequest([]))
    except (KafkaError, OSError, TimeoutError):
        return False
    return True


async def _answers_tcp(host: str, port: int) -> bool:
    """A bootstrap server no metadata names (yet): does anything accept connections there?"""
    try:
        async with asyncio.timeout(10.0):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
