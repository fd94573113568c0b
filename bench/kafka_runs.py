"""The service through a real broker: pre-filled topic, SDK round trip, latency at half load.

One consumer process per (size, variant), on topics of its own, runs the three scenarios in
turn, while a sampler records the memory of its whole process tree:

- pre-filled: N requests are produced before the consumer starts; the rate runs from the first
  dispatch to the pool (``created_at_ms + queue_wait_ms``, both in the answers) to the last
  answer's timestamp, so start-up and group join are not counted;
- SDK: ``AsyncSvdClient`` submits N requests (up to ``SUBMIT_CONCURRENCY`` submits at once),
  then awaits them all (timed from the first submit to the last answer, on the client);
- latency: open-loop arrivals at half the better of those two rates, one ``client.svd`` call
  each; end-to-end time on the client, and "added" = end-to-end minus the worker's compute_ms.

With payloads stored (``payloads="stored"``, issue #17) the consumer gets ``SVD_STORE_*`` for a
prefix of the benchmark's store, the pre-filled requests are stored there first and produced as
version 2 references (so the service reads every matrix from the store and writes every factor
set above its threshold to it, inside the measured window), and the SDK stores every matrix
(``store_above_bytes=0``) and fetches every stored answer. The pre-filled answers' factors are
deleted once the window is over: the ceiling is compute only, the service's own store I/O is
what the stored path adds, and fetching the factors is the client's part (the SDK run has it).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import report
from bench.procs import REPO, Children, CpuSplit, TreeMemory, python_module, spawn, stop
from bench.profiling import ConsumerProfiler
from bench.stored import StorePrefix, delete_objects, store_requests
from bench.workload import Shape, matrices, percentile
from localkafka import TopicSettings, ensure_topics
from producer_sdk import AsyncSvdClient
from schemas import codec
from schemas.headers import SVD_META
from schemas.models import SvdRequestMeta

MIB = 1 << 20
#: The low-load latency run only where the service does at least this many requests/s.
LOW_LOAD_MIN_RATE = 20.0
#: Requests the SDK run submits at once: a stored request's submit uploads its matrix first,
#: and a caller with many matrices overlaps those uploads (as ``svd_many`` does).
SUBMIT_CONCURRENCY = 8
#: How the matrices and factors travel: in the records, or through the object store.
PAYLOADS = ("inline", "stored")
#: A JSON answer at most this large is read for its timings (a stored result: no numbers).
_STORED_ANSWER_MAX_BYTES = 64 * 1024
_READY = re.compile(r"consumer\.service: assigned \[")


@dataclass
class Variant:
    """A consumer configuration to measure: extra ``SVD_*`` variables, maybe another tree.

    ``tree`` runs the consumer from another checkout (e.g. a copy of the code before a change),
    so before and after are measured side by side in one run, on the same broker.
    """

    name: str
    env: dict[str, str] = field(default_factory=dict)
    tree: Path | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``name``, ``name:SVD_A=1,SVD_B=2``, ``name@/path/to/tree[:SVD_A=1]``."""
        head, _, assignments = text.partition(":")
        name, _, tree = head.partition("@")
        env: dict[str, str] = {}
        for item in filter(None, assignments.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("SVD_"):
                raise ValueError(f"variant setting {item!r} is not SVD_NAME=VALUE")
            env[key] = value
        path = Path(tree).resolve() if tree else None
        if path is not None and not (path / "consumer" / "__main__.py").is_file():
            raise ValueError(f"{path} has no consumer package")
        return cls(name, env, path)


class ConsumerProcess:
    """``python -m consumer run`` on given topics, its log in a file, its memory sampled."""

    def __init__(
        self,
        bootstrap: str,
        topics: TopicSettings,
        log_path: Path,
        variant: Variant,
        children: Children,
        profiler: ConsumerProfiler | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.profiler = profiler
        self._cwd = variant.tree or REPO
        self._env = {
            **os.environ,
            "SVD_BOOTSTRAP_SERVERS": bootstrap,
            "SVD_REQUESTS_TOPIC": topics.requests,
            "SVD_RESULTS_TOPIC": topics.results,
            "SVD_DLQ_TOPIC": topics.dlq,
            "SVD_GROUP_ID": f"bench-{topics.requests}",
            "SVD_METRICS_PORT": "0",
            "SVD_LOG_LEVEL": "INFO",
            **(extra_env or {}),
            **variant.env,
        }
        self._children = children
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.memory: TreeMemory | None = None

    def start(self) -> None:
        # python -m puts the working directory first on sys.path: the variant's tree is imported.
        argv, env = python_module("consumer", "run"), self._env
        if self.profiler is not None:
            argv, env = self.profiler.command(argv, env)
        proc = spawn(argv, log_path=self.log_path, env=env, cwd=self._cwd)
        self._proc = proc
        self.pid = proc.pid
        self._children.add(self.stop)
        self.memory = TreeMemory(proc.pid).start()

    def check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            tail = "\n".join(self.log().splitlines()[-30:])
            raise RuntimeError(f"the consumer exited with {self._proc.returncode}:\n{tail}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self) -> bool:
        """The consumer has joined its group and has partitions."""
        return bool(_READY.search(self.log()))

    async def wait_ready(self, limit_s: float = 90.0) -> None:
        deadline = time.monotonic() + limit_s
        while not self.ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the consumer did not join its group within {limit_s}s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
        if self.memory is not None:
            self.memory.stop()
        if self._proc is not None:
            stop(self._proc, 60)


def _topics(label: str, variant: str) -> TopicSettings:
    suffix = f"{label}-{variant}-{uuid.uuid4().hex[:6]}"
    return TopicSettings(
        requests=f"bench-requests-{suffix}",
        results=f"bench-results-{suffix}",
        dlq=f"bench-dlq-{suffix}",
    )


def _request(matrix: np.ndarray[Any, Any], created_ms: int) -> tuple[str, codec.EncodedMessage]:
    request_id = uuid.uuid4().hex
    meta = SvdRequestMeta.model_validate(
        {
            "request_id": request_id,
            "created_at_ms": created_ms,
            "matrix": {"shape": list(matrix.shape), "dtype": matrix.dtype.name},
        }
    )
    return request_id, codec.encode_request(meta, matrix, codec.Encoding.BINARY)


async def _prefill(
    bootstrap: str,
    topic: str,
    inputs: list[Any],
    count: int,
    store: StorePrefix | None = None,
) -> dict[str, int]:
    """Produce ``count`` binary requests, or with ``store`` the version 2 requests referencing
    them once stored (a few at a time: a 4096x4096 request is 128 MiB); return
    {request_id: created_at_ms}."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=64 * MIB, linger_ms=5
    )
    await producer.start()
    created: dict[str, int] = {}
    chunk = 8 if store is not None else count
    try:
        acks = []
        for first in range(0, count, max(1, chunk)):
            messages = []
            for i in range(first, min(count, first + chunk)):
                now_ms = time.time_ns() // 1_000_000
                request_id, message = _request(inputs[i % len(inputs)], now_ms)
                created[request_id] = now_ms
                messages.append((request_id, message))
            outgoing = (
                [m for _, m in messages] if store is None else await store_requests(store, messages)
            )
            for message in outgoing:
                acks.append(
                    await producer.send(
                        topic, message.value, key=message.key, headers=message.headers
                    )
                )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return created


async def _answered(reader: AIOKafkaConsumer, tps: list[TopicPartition]) -> int:
    ends = await reader.end_offsets(tps)
    return int(sum(ends.values()))


def answer_meta(record: Any) -> dict[str, Any] | None:
    """An answer's metadata: the svd-meta header of a binary result, or a small JSON result
    whose factors are stored (it has ``factors_ref``); None for anything else (an error
    result, or a JSON result carrying its numbers, which the benchmark does not ask for)."""
    for key, value in record.headers:
        if key == SVD_META:
            meta: dict[str, Any] = orjson.loads(value)
            return meta
    value = record.value
    if value is None or len(value) > _STORED_ANSWER_MAX_BYTES:
        return None
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(body) is dict and body.get("status") == "ok" and "factors_ref" in body:
        return body
    return None


async def run_prefilled(
    bootstrap: str,
    consumer: ConsumerProcess,
    topics: TopicSettings,
    created: dict[str, int],
    broker_pid: int | None = None,
    cpus: int = 1,
    store_pid: int | None = None,
    store: StorePrefix | None = None,
    ceiling: float | None = None,
    split_at_ready: bool = False,
) -> dict[str, Any]:
    """Start the consumer on a full topic; wait for every answer, then read their timings.

    From the first answer to the last, the CPU time of the consumer's process, its workers,
    the broker and this process is recorded: the share the workers got is what a ratio to the
    ceiling (which gives them every CPU) can at most be. The consumer's profiler, if it has one,
    covers the same window. Stored factors are deleted after it (``store``).

    ``split_at_ready``: the window opens when the consumer has its partitions instead, for runs
    of a few requests of seconds each, whose answers come in rounds (from the first answer on,
    the window would hold the last round only, or nothing).
    """
    count = len(created)
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=64 * MIB,
        max_partition_fetch_bytes=64 * MIB,
    )
    await reader.start()
    try:
        partitions = [TopicPartition(topics.results, p) for p in range(topics.results_partitions)]
        started = time.monotonic()
        consumer.start()
        # Only offsets are polled while the service runs: reading 16 MB answers here would take
        # CPU from it. They are read once every answer is in.
        split: CpuSplit | None = None
        profiler = consumer.profiler
        profiled = False
        while (answered := await _answered(reader, partitions)) < count:
            consumer.check_alive()
            if split is None and (answered or (split_at_ready and consumer.ready())):
                split = CpuSplit(consumer.pid, broker_pid, cpus, store_pid)
                split.start()
                if profiler is not None:
                    profiler.start(consumer.pid)
                    profiled = True
            if time.monotonic() - started > 1800:
                raise TimeoutError("pre-filled run did not finish within 30 min")
            await asyncio.sleep(0.05)
        cpu = split.stop() if split is not None else None
        # After the split: stopping the profiler costs the consumer CPU the split should not see.
        profile: dict[str, Any] | None = None
        if profiler is not None and profiled:
            try:
                profile = profiler.stop().as_json()
            except Exception as exc:  # the run's figures are still worth having
                print(f"bench: the consumer's profile failed: {exc!r}", file=sys.stderr)
                profile = {"error": repr(exc)}
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        dispatched: list[float] = []
        answered_ms: list[int] = []
        compute_ms: list[float] = []
        stored_factors: list[str] = []
        workers: set[int] = set()
        errors = 0
        seen = 0
        while seen < count:
            batch = await reader.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    seen += 1
                    answered_ms.append(record.timestamp)
                    meta = answer_meta(record)
                    if meta is None:
                        errors += 1
                        continue
                    timings = meta["timings"]
                    dispatched.append(created[meta["request_id"]] + timings["queue_wait_ms"])
                    compute_ms.append(timings["compute_ms"])
                    workers.add(meta["worker"]["pid"])
                    if "factors_ref" in meta:
                        stored_factors.append(meta["factors_ref"]["url"])
    finally:
        await reader.stop()
    if store is not None and stored_factors:
        await delete_objects(store, stored_factors)
    first = min(dispatched) if dispatched else min(answered_ms)
    span_s = max(1e-3, (max(answered_ms) - first) / 1000)
    return {
        "rate": count / span_s,
        "done": count,
        "seconds": span_s,
        "errors": errors,
        "compute_ms_p50": percentile(compute_ms, 50),
        "compute_ms_mean": sum(compute_ms) / len(compute_ms) if compute_ms else None,
        "stored_answers": len(stored_factors),
        "workers_seen": len(workers),
        "time": report.time_split(compute_ms, span_s, count, ceiling, cpus),
        "cpu": cpu,
        "consumer_worker_cpu_pct": report.consumer_worker_pct(cpu),
        **({"profile": profile} if profile is not None else {}),
    }


def _client(
    bootstrap: str, topics: TopicSettings, max_pending: int, store: StorePrefix | None = None
) -> AsyncSvdClient:
    """The SDK as a user configures it; with ``store``, every matrix is stored (threshold 0)."""
    stored: dict[str, Any] = (
        {"store": store.client_settings(), "store_above_bytes": 0} if store is not None else {}
    )
    return AsyncSvdClient(
        bootstrap_servers=bootstrap,
        requests_topic=topics.requests,
        results_topic=topics.results,
        max_pending=max_pending,
        default_timeout_s=1800,
        **stored,
    )


def _check(matrix: np.ndarray[Any, Any], result: Any) -> None:
    """One answer per run is checked for real: the service must compute, not just answer."""
    recon = (result.u * result.s) @ result.vt
    error = np.linalg.norm(recon - matrix) / np.linalg.norm(matrix)
    if not error < 1e-8:
        raise AssertionError(f"wrong factors: relative reconstruction error {error:.3g}")


async def run_sdk(
    bootstrap: str,
    topics: TopicSettings,
    inputs: list[Any],
    count: int,
    warmup: int,
    store: StorePrefix | None = None,
) -> dict[str, Any]:
    async with _client(bootstrap, topics, count + warmup, store) as client:
        warm = [await client.submit(inputs[i % len(inputs)]) for i in range(warmup)]
        _check(inputs[0], (await asyncio.gather(*warm))[0])
        limit = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def submit(i: int) -> Any:
            async with limit:
                return await client.submit(inputs[i % len(inputs)])

        started = time.perf_counter()
        handles = await asyncio.gather(*(submit(i) for i in range(count)))
        submitted = time.perf_counter()
        results = await asyncio.gather(*handles)
        elapsed = time.perf_counter() - started
    assert len(results) == count
    return {
        "rate": count / elapsed,
        "done": count,
        "seconds": elapsed,
        "submit_seconds": submitted - started,
    }


async def run_latency(
    bootstrap: str,
    topics: TopicSettings,
    inputs: list[Any],
    rate: float,
    count: int,
    store: StorePrefix | None = None,
) -> dict[str, Any]:
    """Open loop: request i leaves at ``i / rate`` whatever happened to the earlier ones."""
    e2e: list[float] = []
    added: list[float] = []

    async def one(matrix: Any) -> None:
        sent = time.perf_counter()
        result = await client.svd(matrix)
        took_ms = (time.perf_counter() - sent) * 1000
        e2e.append(took_ms)
        added.append(took_ms - result.meta.timings.compute_ms)

    async with _client(bootstrap, topics, count + 16, store) as client:
        await client.svd(inputs[0])  # warm the path
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(inputs[i % len(inputs)])))
        await asyncio.gather(*tasks)
    return {
        "rate": rate,
        "done": count,
        "p50_ms": percentile(e2e, 50),
        "p99_ms": percentile(e2e, 99),
        "added_p50_ms": percentile(added, 50),
        "added_p99_ms": percentile(added, 99),
    }


async def run_variant(
    bootstrap: str,
    shape: Shape,
    variant: Variant,
    count: int,
    ceiling: float,
    latency_seconds: float,
    latency_max: int,
    warmup: int,
    workdir: Path,
    children: Children,
    broker_pid: int | None = None,
    cpus: int = 1,
    profiler: ConsumerProfiler | None = None,
    *,
    payloads: str = "inline",
    store: StorePrefix | None = None,
    store_pid: int | None = None,
    few: bool = False,
) -> dict[str, Any]:
    """The three scenarios for one consumer configuration. ``payloads="stored"`` needs ``store``
    (a prefix of its own). ``few``: a few requests of seconds each (2048 and up): no latency
    runs (one request's time is its compute, and ten of them at half load take minutes), and
    the pre-filled run's CPU window opens when the consumer is ready."""
    if payloads not in PAYLOADS:
        raise ValueError(f"payloads must be one of {PAYLOADS}, got {payloads!r}")
    if payloads == "stored" and store is None:
        raise ValueError("stored payloads need a store")
    via = store if payloads == "stored" else None
    inputs = matrices(shape)
    label = f"{variant.name}-{payloads}"
    topics = _topics(shape.label, label)
    await ensure_topics(bootstrap, topics)
    log_path = workdir / f"consumer-{shape.label}-{label}.log"
    consumer = ConsumerProcess(
        bootstrap, topics, log_path, variant, children, profiler,
        extra_env=via.service_env() if via is not None else None,
    )  # fmt: skip
    out: dict[str, Any] = {
        "env": variant.env,
        "tree": str(variant.tree or REPO),
        "payloads": payloads,
        **({"store_url": via.url} if via is not None else {}),
    }
    try:
        created = await _prefill(bootstrap, topics.requests, inputs, count, via)
        out["prefilled"] = await run_prefilled(
            bootstrap, consumer, topics, created, broker_pid, cpus,
            store_pid=store_pid if via is not None else None, store=via, ceiling=ceiling,
            split_at_ready=few,
        )  # fmt: skip
        await consumer.wait_ready()
        out["sdk"] = await run_sdk(bootstrap, topics, inputs, count, warmup, via)
        if not few:
            # Half the better measured rate, but never above half the ceiling: on a noisy
            # machine a lucky throughput figure would otherwise drive the latency run past full
            # load.
            best = min(max(out["sdk"]["rate"], out["prefilled"]["rate"]), ceiling)
            n = max(10, min(latency_max, round(best / 2 * latency_seconds)))
            out["latency"] = await run_latency(bootstrap, topics, inputs, best / 2, n, via)
            # And at a twentieth of the best rate, where little waits: what transport and the
            # consumer add when nothing queues. Only where requests are quick; for slow ones
            # compute is the latency.
            if best >= LOW_LOAD_MIN_RATE:
                low = best / 20
                n = max(10, min(60, round(low * 2 * latency_seconds)))
                out["latency_low"] = await run_latency(bootstrap, topics, inputs, low, n, via)
    finally:
        consumer.stop()
        if consumer.memory is not None:
            out["memory"] = {
                "peak_rss_bytes": consumer.memory.peak_rss_bytes,
                "peak_pss_bytes": consumer.memory.peak_pss_bytes,
                "processes": consumer.memory.peak_processes,
            }
        if via is not None:
            # What the service and the SDK left behind (requests are deleted once answered,
            # fetched factors by the SDK, the pre-filled answers' factors above): 0 expected.
            try:
                left = await asyncio.to_thread(via.objects)
                out["store_objects_left"] = len(left)
                if left:
                    await delete_objects(via, left)
            except Exception as exc:  # the figures are still worth having
                out["store_objects_left"] = None
                print(f"bench: counting objects under {via.url} failed: {exc!r}", file=sys.stderr)
    return out
