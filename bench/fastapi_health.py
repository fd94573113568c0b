"""``python -m bench.fastapi_health``: /health p99 of examples/fastapi_app.py while 100 SVDs are
in flight, with the SVD computed inline (numpy on the event loop: the seed problem) and through
producer_sdk (computed by the consumer service). A benchmark, not a test: it prints figures.

Kafka: KAFKA_BOOTSTRAP_SERVERS, else a local broker is started for the run. Each app runs in its
own uvicorn process; /health is polled from a separate thread of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from localkafka import LocalBroker, TopicSettings, ensure_topics
from producer_sdk import AsyncSvdClient

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_app(mode: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "SVD_EXAMPLE_MODE": mode},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def _poll_health(url: str, stop: threading.Event, out: list[float], interval: float) -> None:
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            started = time.perf_counter()
            http.get(url).raise_for_status()
            out.append(time.perf_counter() - started)
            stop.wait(interval)


async def _load(base: str, bodies: list[bytes]) -> float:
    limits = httpx.Limits(max_connections=len(bodies) + 10)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(
                http.post("/svd", content=b, headers={"content-type": "application/json"})
                for b in bodies
            )
        )
        elapsed = time.perf_counter() - started
    bad = [r.status_code for r in responses if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} SVD requests failed: {bad[:5]}")
    return elapsed


def _measure(mode: str, env: dict[str, str], bodies: list[bytes], logdir: Path) -> dict[str, float]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_app(mode, env, port, logdir / f"app-{mode}.log")
    try:
        _wait_http(f"{base}/health", proc)
        asyncio.run(_load(base, bodies[:4]))  # warm-up: imports, connections, BLAS
        latencies: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(
            target=_poll_health, args=(f"{base}/health", stop, latencies, 0.01), daemon=True
        )
        poller.start()
        elapsed = asyncio.run(_load(base, bodies))
        stop.set()
        poller.join(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    ms = np.array(latencies) * 1000
    return {
        "health_samples": float(len(ms)),
        "health_p50_ms": float(np.percentile(ms, 50)),
        "health_p99_ms": float(np.percentile(ms, 99)),
        "health_max_ms": float(ms.max()),
        "svd_wall_s": elapsed,
    }


async def _wait_service(
    bootstrap: str, topics: TopicSettings, proc: subprocess.Popen[bytes]
) -> None:
    async with AsyncSvdClient(
        bootstrap_servers=bootstrap, requests_topic=topics.requests, results_topic=topics.results
    ) as client:
        probe = asyncio.create_task(client.svd(np.eye(2), timeout=120))
        while not probe.done():
            if proc.poll() is not None:
                probe.cancel()
                raise RuntimeError(f"svd-consumer exited with {proc.returncode}")
            await asyncio.wait({probe}, timeout=0.2)
        probe.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastapi_health", description=__doc__)
    parser.add_argument("--requests", type=int, default=100, help="SVDs in flight (100)")
    parser.add_argument("--size", type=int, default=300, help="n of the n x n matrices (300)")
    parser.add_argument("--pool-size", type=int, default=None, help="consumer worker processes")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    import orjson

    bodies = [
        orjson.dumps({"matrix": rng.standard_normal((args.size, args.size)), "timeout": 600},
                     option=orjson.OPT_SERIALIZE_NUMPY)
        for _ in range(args.requests)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="svd-bench-") as tmp:
        logdir = Path(tmp)
        broker = None
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = LocalBroker(workdir=logdir / "kafka")
            bootstrap = broker.start(die_with_parent=True).bootstrap
        service: subprocess.Popen[bytes] | None = None
        try:
            suffix = uuid.uuid4().hex[:8]
            topics = TopicSettings(
                requests=f"bench-requests-{suffix}", results=f"bench-results-{suffix}",
                dlq=f"bench-dlq-{suffix}",
            )  # fmt: skip
            asyncio.run(ensure_topics(bootstrap, topics))
            env = {
                **os.environ,
                "SVD_BOOTSTRAP_SERVERS": bootstrap, "SVD_REQUESTS_TOPIC": topics.requests,
                "SVD_RESULTS_TOPIC": topics.results, "SVD_DLQ_TOPIC": topics.dlq,
                "SVD_GROUP_ID": f"bench-{suffix}", "SVD_METRICS_PORT": "0",
                "SVD_CLIENT_BOOTSTRAP_SERVERS": bootstrap,
                "SVD_CLIENT_REQUESTS_TOPIC": topics.requests,
                "SVD_CLIENT_RESULTS_TOPIC": topics.results,
            }  # fmt: skip
            if args.pool_size:
                env["SVD_POOL_SIZE"] = str(args.pool_size)
            with (logdir / "svd-consumer.log").open("ab") as log:
                service = subprocess.Popen(
                    [sys.executable, "-m", "consumer", "run"], cwd=REPO, env=env,
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            asyncio.run(_wait_service(bootstrap, topics, service))
            figures = {mode: _measure(mode, env, bodies, logdir) for mode in ("inline", "sdk")}
        finally:
            if service is not None and service.poll() is None:
                service.send_signal(signal.SIGTERM)
                service.wait(60)
            if broker is not None:
                broker.destroy()

    print(
        f"/health latency while {args.requests} SVDs of {args.size}x{args.size} float64 are in flight"
    )
    print(f"(machine: {os.cpu_count()} CPUs; /health polled every 10 ms from another thread)\n")
    print(f"{'mode':<8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'samples':>9}{'SVDs wall s':>13}")
    for mode, f in figures.items():
        print(
            f"{mode:<8}{f['health_p50_ms']:>10.1f}{f['health_p99_ms']:>10.1f}"
            f"{f['health_max_ms']:>10.1f}{int(f['health_samples']):>9}{f['svd_wall_s']:>13.2f}"
        )
    print(
        f"\n/health p99: inline {figures['inline']['health_p99_ms']:.1f} ms, "
        f"through producer_sdk {figures['sdk']['health_p99_ms']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
