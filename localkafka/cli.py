"""``svd-broker up|down|status|topics``: the local Kafka broker of the project."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading

from localkafka.broker import LocalBroker
from localkafka.errors import BrokerError
from localkafka.settings import BrokerSettings, TopicSettings
from localkafka.topics import ensure_topics


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="fetch the jars if needed, start the broker, create the topics")
    up.add_argument(
        "--port", type=int, default=None, help="client port (default: free or previous)"
    )
    up.add_argument(
        "--foreground", action="store_true", help="stay attached; Ctrl-C stops the broker"
    )
    sub.add_parser("down", help="stop the broker")
    sub.add_parser("status", help="print the bootstrap address, exit 1 if not running")
    sub.add_parser("topics", help="create the project's topics on the running broker")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"port": args.port} if getattr(args, "port", None) else {}
    broker = LocalBroker(BrokerSettings(**overrides), TopicSettings())
    try:
        if args.command == "up":
            return _up(broker, foreground=args.foreground)
        if args.command == "down":
            print("broker stopped" if broker.stop() else "no broker was running")
            return 0
        if args.command == "topics":
            state = broker.status()
            if state is None:
                print("no broker is running: start it with `svd-broker up`", file=sys.stderr)
                return 1
            print(asyncio.run(ensure_topics(state.bootstrap, broker.topics)))
            return 0
        state = broker.status()
        if state is None:
            print("not running")
            return 1
        print(state.bootstrap)
        return 0
    except BrokerError as exc:
        print(f"svd-broker: {exc}", file=sys.stderr)
        return 2


def _up(broker: LocalBroker, *, foreground: bool) -> int:
    print(f"starting Kafka {broker.settings.kafka_version} in {broker.workdir} ...", flush=True)
    state = broker.start(die_with_parent=foreground)
    topics = asyncio.run(ensure_topics(state.bootstrap, broker.topics))
    print(f"broker ready at {state.bootstrap} (pid {state.pid}); topics {topics}", flush=True)
    if not foreground:
        print("stop it with `svd-broker down`")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("Ctrl-C stops the broker", flush=True)
    stop.wait()
    broker.stop()
    print("broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
