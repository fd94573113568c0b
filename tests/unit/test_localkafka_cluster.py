"""The local cluster's layout and its nodes' configs, without starting a JVM; static membership
in the consumer's settings."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from consumer.kafka_clients import KafkaClients
from consumer.settings import ConsumerSettings
from localkafka import BrokerError, BrokerSettings, LocalBroker, LocalCluster, TopicSettings
from localkafka.cluster import local_kafka
from tests.unit.test_security_broker import properties

CLUSTER_ID = "q1Sh-9_ISia_zwGINzRvyQ"


def _saved(workdir: Path, nodes: int = 3) -> LocalCluster:
    workdir.mkdir(parents=True)
    ports = {str(i): [19090 + i, 19190 + i] for i in range(1, nodes + 1)}
    (workdir / "cluster.json").write_text(json.dumps({"cluster_id": CLUSTER_ID, "ports": ports}))
    return LocalCluster(workdir=workdir)


def test_every_node_is_a_voter_with_its_own_ports_and_replicated_internal_topics(
    tmp_path: Path,
) -> None:
    cluster = _saved(tmp_path / "c")
    assert cluster.size == 3  # from cluster.json, not the settings' default of one node
    assert cluster.bootstrap == "127.0.0.1:19091,127.0.0.1:19092,127.0.0.1:19093"
    voters = "1@127.0.0.1:19191,2@127.0.0.1:19192,3@127.0.0.1:19193"
    for node_id in (1, 2, 3):
        node = cluster.node(node_id)
        assert node.workdir == (tmp_path / "c" / f"node-{node_id}").resolve()
        assert node.quorum is not None and node.quorum.cluster_id == CLUSTER_ID
        node.workdir.mkdir()
        props = properties(
            node._write_configs(node.settings.port, node.settings.controller_port, {})
        )
        assert props["node.id"] == str(node_id)
        assert props["controller.quorum.voters"] == voters
        assert props["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{19090 + node_id},CONTROLLER://127.0.0.1:{19190 + node_id}"
        )
        # Offsets and transactions survive a node, and refuse writes that only one node holds.
        for key in (
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "default.replication.factor",
        ):
            assert props[key] == "3", key
        assert props["transaction.state.log.min.isr"] == "2"
        assert props["min.insync.replicas"] == "2"


def test_a_single_broker_keeps_its_one_node_config(tmp_path: Path) -> None:
    props = properties(LocalBroker(workdir=tmp_path)._write_configs(9092, 9093, {}))
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["min.insync.replicas"] == "1"


def test_a_node_that_is_not_there_and_a_size_that_does_not_match_are_refused(
    tmp_path: Path,
) -> None:
    cluster = _saved(tmp_path / "c")
    with pytest.raises(BrokerError, match="no node 4"):
        cluster.node(4)
    with pytest.raises(BrokerError, match="a cluster of 3 nodes, not 5"):
        LocalCluster(workdir=tmp_path / "c", size=5).node(1)


def test_a_cluster_never_started_has_no_status_and_stops_nothing(tmp_path: Path) -> None:
    cluster = LocalCluster(workdir=tmp_path / "never")
    assert cluster.status() is None
    assert cluster.stop() is False
    assert not (tmp_path / "never").exists()  # asking created nothing


@pytest.mark.parametrize(
    ("brokers", "expected"), [(1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))]
)
def test_topics_follow_the_cluster_size(brokers: int, expected: tuple[int, int]) -> None:
    assert TopicSettings().replication_for(brokers) == expected
    assert TopicSettings(replication_factor=2, min_insync_replicas=2).replication_for(3) == (2, 2)


def test_local_kafka_is_a_cluster_when_asked_for_nodes() -> None:
    assert isinstance(local_kafka(BrokerSettings()), LocalBroker)
    cluster = local_kafka(BrokerSettings(nodes=5))
    assert isinstance(cluster, LocalCluster) and cluster.size == 5


async def test_static_membership_names_the_instance_and_lengthens_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dynamic = ConsumerSettings()
    assert dynamic.group_instance_id is None and dynamic.session_timeout_s == 10.0
    monkeypatch.setenv("SVD_GROUP_INSTANCE_ID", "svd-{hostname}")
    static = ConsumerSettings()
    assert static.group_instance_id == f"svd-{socket.gethostname()}"
    assert static.session_timeout_s == 45.0  # a restart fits in it
    consumer = KafkaClients(static).requests_consumer()
    try:
        assert consumer._group_instance_id == static.group_instance_id
    finally:
        await consumer.stop()  # never started: closes its client
    monkeypatch.setenv("SVD_SESSION_TIMEOUT_S", "20")
    assert ConsumerSettings().session_timeout_s == 20.0  # an explicit value wins
    monkeypatch.setenv("SVD_GROUP_INSTANCE_ID", "")
    with pytest.raises(ValueError, match="group_instance_id"):
        ConsumerSettings()
