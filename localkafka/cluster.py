"""A replicated KRaft cluster on this machine: N nodes, each a broker and a controller voter.

Combined nodes rather than separate controllers: three JVMs instead of six on a two-core
machine, and the failure a cluster test cares about is still there (kill a node and both its
partition leaderships and its controller vote go; kill two of three and the quorum is lost).
Production clusters usually separate the roles; the clients cannot tell the difference.

Each node is a ``LocalBroker`` in ``<workdir>/node-<id>`` given a ``Quorum``. ``cluster.json``
keeps the cluster id and every node's ports, so a node restarted alone, or the whole cluster
started again, comes back where the voters list and the clients expect it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from localkafka.broker import BrokerState, LocalBroker, Quorum, free_port, random_cluster_id
from localkafka.errors import BrokerError
from localkafka.jars import ensure_jars
from localkafka.settings import BrokerSettings, TopicSettings


@dataclass(frozen=True)
class ClusterState:
    """The running nodes, by node id; ``bootstrap`` lists every node, running or not."""

    nodes: dict[int, BrokerState]
    bootstrap: str

    @property
    def pids(self) -> dict[int, int]:
        return {node_id: state.pid for node_id, state in self.nodes.items()}


class LocalCluster:
    """``size`` nodes in ``workdir``; ``start`` is idempotent, ``stop`` leaves no JVM behind."""

    def __init__(
        self,
        settings: BrokerSettings | None = None,
        topics: TopicSettings | None = None,
        workdir: Path | None = None,
        *,
        size: int | None = None,
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings or BrokerSettings()
        self.topics = topics or TopicSettings()
        self.workdir = (workdir or self.settings.home / "cluster").resolve()
        # Unless told, a cluster started before keeps its size (`svd-broker down`, `node`).
        self.size = size or self._saved_size() or max(self.settings.nodes, 3)
        self.extra_properties = dict(extra_properties or {})  # every node's, over the defaults
        self._nodes: dict[int, LocalBroker] | None = None

    def _saved_size(self) -> int:
        try:
            return len(json.loads(self.layout_file.read_text())["ports"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    @property
    def layout_file(self) -> Path:
        return self.workdir / "cluster.json"

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.size + 1))

    def node(self, node_id: int) -> LocalBroker:
        """One node, to stop, kill, pause, resume or start on its own."""
        nodes = self._layout()
        if node_id not in nodes:
            raise BrokerError(f"no node {node_id}: this cluster has nodes {self.node_ids}")
        return nodes[node_id]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{n.settings.host}:{n.settings.port}" for n in self._layout().values())

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, *, die_with_parent: bool = False) -> ClusterState:
        """Start every node not running, then wait for each to answer (they need a quorum)."""
        nodes = self._layout()
        launched = {i: n.launch(die_with_parent=die_with_parent) for i, n in nodes.items()}
        try:
            for node_id, state in launched.items():
                nodes[node_id].wait_ready(state)
        except BaseException:
            self.stop()
            raise
        return ClusterState(launched, self.bootstrap)

    def status(self) -> ClusterState | None:
        """The running nodes, or None when none runs (or the cluster was never started)."""
        if not self.layout_file.exists():
            return None
        running = {i: s for i, n in self._layout().items() if (s := n.status()) is not None}
        return ClusterState(running, self.bootstrap) if running else None

    def stop(self) -> bool:
        """Stop every node (SIGTERM, then SIGKILL after the timeout). True if any ran."""
        if not self.layout_file.exists():
            return False
        return any([node.stop() for node in self._layout().values()])

    def destroy(self) -> None:
        """Stop and delete the work directory (ephemeral clusters of a test session)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(
            f"--- node {i}: {n.log_file}\n{n.log_tail(lines)}" for i, n in self._layout().items()
        )

    # -- layout --------------------------------------------------------------------------------
    def _layout(self) -> dict[int, LocalBroker]:
        """The nodes, from ``cluster.json`` or, on the first start, a new id and free ports."""
        if self._nodes is not None:
            return self._nodes
        host = self.settings.host
        try:
            saved = json.loads(self.layout_file.read_text())
            cluster_id, ports = saved["cluster_id"], {int(k): v for k, v in saved["ports"].items()}
        except FileNotFoundError:
            java = shutil.which("java")
            if java is None:
                raise BrokerError(
                    "Java is not installed: install OpenJDK 17+ "
                    "(apt-get install openjdk-17-jre-headless)"
                ) from None
            libs = ensure_jars(self.settings.libs_dir, self.settings.kafka_version)
            cluster_id = random_cluster_id(java, libs)
            ports = {i: [free_port(host), free_port(host)] for i in self.node_ids}
            self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.layout_file.write_text(json.dumps({"cluster_id": cluster_id, "ports": ports}))
        except (OSError, ValueError, KeyError) as exc:
            raise BrokerError(f"{self.layout_file} is unreadable ({exc}); remove it") from None
        if sorted(ports) != self.node_ids:
            raise BrokerError(
                f"{self.workdir} holds a cluster of {len(ports)} nodes, not {self.size}: "
                "stop it and remove the directory to change its size"
            )
        replication, min_insync = self.topics.replication_for(self.size)
        voters = ",".join(f"{i}@{host}:{ports[i][1]}" for i in self.node_ids)
        self._nodes = {
            i: LocalBroker(
                self.settings.model_copy(
                    update={"port": ports[i][0], "controller_port": ports[i][1], "workdir": None}
                ),
                self.topics,
                self.workdir / f"node-{i}",
                extra_properties=self.extra_properties,
                quorum=Quorum(i, voters, cluster_id, replication, min_insync),
            )
            for i in self.node_ids
        }
        return self._nodes


def local_kafka(
    settings: BrokerSettings | None = None, topics: TopicSettings | None = None
) -> LocalBroker | LocalCluster:
    """The project's local Kafka: one broker, or a cluster when ``SVD_BROKER_NODES`` > 1."""
    settings = settings or BrokerSettings()
    if settings.nodes > 1:
        return LocalCluster(settings, topics, size=settings.nodes)
    return LocalBroker(settings, topics)
