"""``svd-broker up|down|status|topics|node``: the project's local Kafka, one broker or a cluster.

``up --nodes 3`` (or ``SVD_BROKER_NODES=3``) starts a replicated KRaft cluster; ``node ID
stop|kill|start|restart|pause|resume`` acts on one of its nodes, for trying failures by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from localkafka.broker import LocalBroker, wait_for_interrupt
from localkafka.cluster import LocalCluster, local_kafka
from localkafka.errors import BrokerError
from localkafka.settings import BrokerSettings, TopicSettings
from localkafka.topics import ensure_topics

NODE_ACTIONS = ("stop", "kill", "start", "restart", "pause", "resume")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="fetch the jars if needed, start Kafka, create the topics")
    up.add_argument(
        "--port",
        type=int,
        default=None,
        help="client port of one broker (default: free or previous)",
    )
    up.add_argument(
        "--nodes", type=int, default=None, help="a KRaft cluster of N nodes (env SVD_BROKER_NODES)"
    )
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops Kafka")
    sub.add_parser("down", help="stop the broker or the cluster")
    sub.add_parser(
        "status", help="print the bootstrap servers (a cluster's nodes on stderr); exit 1 if down"
    )
    sub.add_parser("topics", help="create the project's topics on the running broker or cluster")
    node = sub.add_parser("node", help="act on one node of the running cluster")
    node.add_argument("node_id", type=int)
    node.add_argument("action", choices=NODE_ACTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = BrokerSettings()
    given = {k: getattr(args, k, None) for k in ("port", "nodes")}
    if overrides := {k: v for k, v in given.items() if v}:
        settings = BrokerSettings.model_validate({**settings.model_dump(), **overrides})
    try:
        if args.command == "up":
            return _up(local_kafka(settings, TopicSettings()), foreground=args.foreground)
        if args.command == "down":
            stopped = [kafka.stop() for kafka in (LocalCluster(settings), LocalBroker(settings))]
            print("stopped" if any(stopped) else "nothing was running")
            return 0
        kafka = _running(settings)
        if kafka is None:
            print("not running", file=sys.stderr)
            return 1
        if args.command == "topics":
            print(asyncio.run(ensure_topics(_bootstrap(kafka), kafka.topics)))
            return 0
        if args.command == "node":
            if not isinstance(kafka, LocalCluster):
                print(
                    "svd-broker node: the running Kafka is one broker, not a cluster",
                    file=sys.stderr,
                )
                return 1
            _node(kafka.node(args.node_id), args.action)
            print(f"node {args.node_id}: {_node_status(kafka.node(args.node_id))}")
            return 0
        if isinstance(kafka, LocalCluster):
            for node_id in kafka.node_ids:
                node = kafka.node(node_id)
                print(f"node {node_id} at {node.settings.host}:{node.settings.port}: "
                      f"{_node_status(node)}", file=sys.stderr)  # fmt: skip
        print(_bootstrap(kafka))
        return 0
    except BrokerError as exc:
        print(f"svd-broker: {exc}", file=sys.stderr)
        return 2


def _running(settings: BrokerSettings) -> LocalBroker | LocalCluster | None:
    cluster = LocalCluster(settings)
    if cluster.status() is not None:
        return cluster
    broker = LocalBroker(settings)
    return broker if broker.status() is not None else None


def _bootstrap(kafka: LocalBroker | LocalCluster) -> str:
    if isinstance(kafka, LocalCluster):
        return kafka.bootstrap
    state = kafka.status()
    if state is None:
        raise BrokerError("the broker stopped")
    return state.bootstrap


def _node(node: LocalBroker, action: str) -> None:
    if action == "stop":
        node.stop()
    elif action == "kill":
        node.kill()
    elif action == "start":
        node.start()
    elif action == "restart":
        node.stop()
        node.start()
    elif action == "pause":
        node.pause()
    else:
        node.resume()


def _node_status(node: LocalBroker) -> str:
    state = node.status()
    if state is None:
        return "down"
    return f"pid {state.pid}, {'paused' if node.paused() else 'running'}"


def _up(kafka: LocalBroker | LocalCluster, *, foreground: bool) -> int:
    what = f"a {kafka.size}-node cluster" if isinstance(kafka, LocalCluster) else "Kafka"
    print(f"starting {what} ({kafka.settings.kafka_version}) in {kafka.workdir} ...", flush=True)
    state = kafka.start(die_with_parent=foreground)
    topics = asyncio.run(ensure_topics(state.bootstrap, kafka.topics))
    print(f"ready at {state.bootstrap}; topics {topics}", flush=True)
    if not foreground:
        print("stop it with `svd-broker down`")
        return 0
    wait_for_interrupt("Ctrl-C stops Kafka")
    kafka.stop()
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
