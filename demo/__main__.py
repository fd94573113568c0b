"""``python -m demo`` (``make run``): the local broker and object store, the consumer service
and a verified workload.

Starts a real Kafka broker (jars from Maven Central, cached), creates the topics, starts a real
S3-compatible object store (S3Proxy, also from Maven Central) for payloads too large for Kafka,
starts the consumer service as its own process, drives a few hundred SVDs of mixed sizes plus
bad requests through the SDK, and prints a verified summary. Ctrl-C at any point stops
everything: the service drains, the store and the broker stop, no JVM or worker is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from demo.large import run_large
from demo.workload import Report, run_workload
from localkafka import BrokerError, ensure_topics, local_kafka
from localstore import CLIENT_PREFIX, SERVICE_PREFIX, LocalStore, LocalStoreError

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--count", type=int, default=300, help="matrices to send (default 300)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--large",
        type=int,
        metavar="N",
        help="instead of the workload, one N x N float64 full SVD through the object store, "
        "verified (e.g. 8192: 512 MiB in, 1 GiB out)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the service up after the summary, until Ctrl-C",
    )
    return parser


def _start_service(
    bootstrap: str, store_env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **store_env,  # SVD_STORE_*: the store's endpoint, bucket and credentials
        "SVD_BOOTSTRAP_SERVERS": bootstrap,
        "SVD_GROUP_ID": "svd-demo",
        "SVD_METRICS_PORT": os.environ.get("SVD_METRICS_PORT", "9400"),
    }
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", "run"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the service in order
        )


def _stop_service(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _summary(report: Report) -> str:
    lat = np.array(report.latencies_ms) if report.latencies_ms else np.zeros(1)
    lines = [
        "",
        "summary",
        f"  SVDs sent {report.sent}, verified {report.verified} "
        f"(U diag(S) Vt reconstructs A; U, V orthonormal), wrong {len(report.wrong)}, "
        f"failed {len(report.failed)}",
        f"  round trip p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms; "
        f"{report.sent / max(report.seconds, 1e-9):.0f} SVDs/s over {report.seconds:.1f} s",
        f"  bad requests sent {report.bad_sent}: answered with the expected code "
        f"{sum(report.bad_answered.get(k) == v for k, v in report.bad_expected.items())}, "
        f"dead letters {report.dead_letters}",
    ]
    for request_id, code in sorted(report.bad_expected.items()):
        got = report.bad_answered.get(request_id, "no answer")
        lines.append(f"    {code:<28} -> {got}{'' if got == code else '  (MISMATCH)'}")
    for failure in report.failed[:5]:
        lines.append(f"  failed: {failure}")
    lines.append("RESULT: " + ("all verified" if report.ok else "VERIFICATION FAILED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    broker = local_kafka()  # SVD_BROKER_NODES=3: a replicated cluster
    store = LocalStore()
    # A store already up (`svd-store up`) is used and left running; one started here is stopped.
    own_store = store.status() is None
    service: subprocess.Popen[bytes] | None = None
    # SIGTERM takes the same orderly path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        print(
            "starting the local Kafka (the first run fetches its jars with Maven) ...",
            flush=True,
        )
        state = broker.start(die_with_parent=True)
        topics = asyncio.run(ensure_topics(state.bootstrap, broker.topics))
        print(f"Kafka ready at {state.bootstrap}; topics {topics}", flush=True)
        print("starting the local object store (S3Proxy; the first run fetches it) ...", flush=True)
        store_state = store.start(die_with_parent=True)
        print(
            f"object store ready at {store_state.endpoint}, bucket {store.settings.bucket}; "
            f"its log: {store.log_file}",
            flush=True,
        )
        # The SDK client the workload makes reads its store settings from SVD_CLIENT_STORE_*.
        os.environ.update(store.env(CLIENT_PREFIX))
        log_path = broker.workdir / "consumer.log"
        service = _start_service(state.bootstrap, store.env(SERVICE_PREFIX), log_path)
        print(f"consumer service started (pid {service.pid}); its log: {log_path}", flush=True)
        names = {
            "requests": broker.topics.requests,
            "results": broker.topics.results,
            "dlq": broker.topics.dlq,
        }
        if args.large:
            print(f"sending one {args.large} x {args.large} full SVD through the store ...")
            large = asyncio.run(run_large(state.bootstrap, names, args.large, seed=args.seed))
            print(large.describe(), flush=True)
            print("RESULT: " + ("verified" if large.ok else "VERIFICATION FAILED"), flush=True)
            return 0 if large.ok else 1
        report = asyncio.run(run_workload(state.bootstrap, names, count=args.count, seed=args.seed))
        print(_summary(report), flush=True)
        if args.keep_running:
            print(
                "the service keeps running; Ctrl-C stops it, the store and the broker", flush=True
            )
            while service.poll() is None:
                time.sleep(0.5)
        return 0 if report.ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the service, the store and the broker", flush=True)
        return 130
    except (BrokerError, LocalStoreError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    finally:
        if service is not None:
            _stop_service(service)
            print("consumer service stopped", flush=True)
        if own_store:
            if store.stop():
                print("object store stopped", flush=True)
        elif store.status() is not None:
            print(f"object store left running at {store.endpoint} (`svd-store down` stops it)")
        broker.stop()
        print("broker stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
