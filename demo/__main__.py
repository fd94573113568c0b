"""``python -m demo``: start the local broker and the project's topics; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

from localkafka import BrokerError, LocalBroker, ensure_topics


def main() -> int:
    broker = LocalBroker()
    try:
        print(
            "starting the local Kafka broker (first run fetches the jars with Maven) ...",
            flush=True,
        )
        state = broker.start(die_with_parent=True)
        topics = asyncio.run(ensure_topics(state.bootstrap, broker.topics))
    except BrokerError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        broker.stop()
        return 2
    print(f"broker ready at {state.bootstrap}; topics {topics}")
    print("not built yet: the consumer service and the SDK-driven demo workload.")
    print("Ctrl-C stops the broker.", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    broker.stop()
    print("broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
