"""The demo workload: mixed-size matrices through the SDK, plus bad requests from a raw producer.

Every answer is verified: a result must reconstruct its matrix with orthonormal factors, and
every bad request must come back with the error code it deserves and a dead letter.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from demo.progress import Progress
from producer_sdk import AsyncSvdClient, Encoding, SvdError, SvdResult
from schemas import codec
from schemas.deadletter import read_dead_letter
from schemas.errors import ErrorCode
from schemas.headers import CONTENT_TYPE, CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, SVD_META
from schemas.models import ErrorResult

SIZES = [(8, 8), (32, 32), (64, 48), (128, 128), (200, 120), (256, 256), (512, 64), (384, 384)]


@dataclass
class Report:
    sent: int = 0
    verified: int = 0
    wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    bad_sent: int = 0
    bad_answered: dict[str, str] = field(default_factory=dict)  # request id -> code
    bad_expected: dict[str, str] = field(default_factory=dict)
    dead_letters: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.wrong
            and not self.failed
            and self.verified == self.sent
            and self.bad_answered == self.bad_expected
            and self.dead_letters >= self.bad_sent
        )


def _matrices(count: int, seed: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        m, n = SIZES[int(rng.integers(len(SIZES)))]
        dtype = np.float32 if i % 4 == 0 else np.float64
        out.append(rng.standard_normal((m, n)).astype(dtype))
    return out


def _reconstructs(matrix: np.ndarray[Any, Any], result: SvdResult) -> bool:
    assert result.u is not None and result.vt is not None
    tol = 1e-3 if matrix.dtype == np.float32 else 1e-9
    recon_error = np.linalg.norm((result.u * result.s) @ result.vt - matrix) / np.linalg.norm(
        matrix
    )
    k = result.s.shape[0]
    orthonormal = np.allclose(result.u.T @ result.u, np.eye(k), atol=tol * 10) and np.allclose(
        result.vt @ result.vt.T, np.eye(k), atol=tol * 10
    )
    return bool(recon_error < tol and orthonormal)


def bad_requests() -> list[tuple[str, bytes, list[tuple[str, bytes]], str]]:
    """(request id, value, headers, expected error code) for input the service must reject."""

    def json_request(request_id: str, **changes: Any) -> bytes:
        doc: dict[str, Any] = {
            "schema_version": 1,
            "request_id": request_id,
            "matrix": {"shape": [2, 2], "dtype": "float64", "data": [1.0, 2.0, 3.0, 4.0]},
        }
        doc.update(changes)
        return orjson.dumps(doc)

    json_headers = [(CONTENT_TYPE, CONTENT_TYPE_JSON.encode())]
    out = []
    cases: dict[str, dict[str, Any]] = {
        ErrorCode.UNKNOWN_OPTION: {"options": {"colour": "blue"}},
        ErrorCode.SHAPE_MISMATCH: {"matrix": {"shape": [3, 3], "dtype": "float64", "data": [1.0]}},
        ErrorCode.UNSUPPORTED_DTYPE: {"matrix": {"shape": [1, 1], "dtype": "int8", "data": [1]}},
        ErrorCode.LIMIT_EXCEEDED: {
            "matrix": {"shape": [100000, 10000], "dtype": "float64", "data": [1.0]}
        },
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION: {"schema_version": 99},
        ErrorCode.INVALID_SHAPE: {"matrix": {"shape": [4], "dtype": "float64", "data": [1.0] * 4}},
    }
    for code, changes in cases.items():
        request_id = f"demo-bad-{code.lower()}-{uuid.uuid4().hex[:6]}"
        out.append((request_id, json_request(request_id, **changes), json_headers, str(code)))
    # NaN cannot be written in JSON; send it in a binary request instead.
    nan_id = f"demo-bad-nan-{uuid.uuid4().hex[:6]}"
    meta = {
        "schema_version": 1,
        "request_id": nan_id,
        "matrix": {"shape": [2, 2], "dtype": "float64"},
    }
    out.append(
        (
            nan_id,
            np.array([1.0, np.nan, 3.0, 4.0], dtype="<f8").tobytes(),
            [(CONTENT_TYPE, CONTENT_TYPE_BINARY.encode()), (SVD_META, orjson.dumps(meta))],
            str(ErrorCode.NON_FINITE),
        )
    )
    return out


async def run_workload(
    bootstrap: str, topics: dict[str, str], *, count: int, seed: int = 7
) -> Report:
    report = Report()
    bad = bad_requests()
    report.bad_expected = {request_id: code for request_id, _, _, code in bad}
    watcher = AIOKafkaConsumer(
        topics["results"],
        topics["dlq"],
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        enable_auto_commit=False,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=64 << 20,
    )
    await watcher.start()
    # Pin the watcher's start before anything is sent, so no answer can slip past it.
    await watcher.seek_to_end()
    for tp in watcher.assignment():
        await watcher.position(tp)
    started = time.monotonic()
    try:
        await _send_bad(bootstrap, topics["requests"], bad)
        report.bad_sent = len(bad)
        await _run_good(bootstrap, topics, count, seed, report)
        await _watch_bad(watcher, topics["dlq"], report)
    finally:
        await watcher.stop()
    report.seconds = time.monotonic() - started
    return report


async def _send_bad(
    bootstrap: str, topic: str, bad: list[tuple[str, bytes, list[tuple[str, bytes]], str]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for request_id, value, headers, _ in bad:
            await producer.send_and_wait(topic, value, key=request_id.encode(), headers=headers)
    finally:
        await producer.stop()


async def _run_good(
    bootstrap: str, topics: dict[str, str], count: int, seed: int, report: Report
) -> None:
    matrices = _matrices(count, seed)
    progress = Progress(count, "SVDs")
    async with AsyncSvdClient(
        bootstrap_servers=bootstrap,
        requests_topic=topics["requests"],
        results_topic=topics["results"],
        default_timeout_s=120,
    ) as client:

        async def one(index: int, matrix: np.ndarray[Any, Any]) -> None:
            encoding = Encoding.JSON if index % 5 == 0 else Encoding.BINARY
            sent = time.monotonic()
            try:
                result = await client.svd(matrix, encoding=encoding)
            except SvdError as exc:
                report.failed.append(f"{exc.code}: {exc.message}")
                progress.advance(ok=False)
                return
            report.latencies_ms.append((time.monotonic() - sent) * 1000)
            if _reconstructs(matrix, result):
                report.verified += 1
            else:
                report.wrong.append(result.request_id)
            progress.advance(ok=True)

        report.sent = count
        gate = asyncio.Semaphore(32)

        async def bounded(index: int, matrix: np.ndarray[Any, Any]) -> None:
            async with gate:
                await one(index, matrix)

        await asyncio.gather(*(bounded(i, m) for i, m in enumerate(matrices)))


async def _watch_bad(
    watcher: AIOKafkaConsumer, dlq_topic: str, report: Report, within_s: float = 60.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline and (
        len(report.bad_answered) < len(report.bad_expected) or report.dead_letters < report.bad_sent
    ):
        batch = await watcher.getmany(timeout_ms=200)
        for records in batch.values():
            for record in records:
                if record.topic == dlq_topic:
                    dead = read_dead_letter(record.value, list(record.headers))
                    if dead.meta.request_id in report.bad_expected:
                        report.dead_letters += 1
                    continue
                if not (record.key or b"").startswith(b"demo-bad-"):
                    continue
                reply = codec.decode_reply(record.value, list(record.headers))
                if isinstance(reply, ErrorResult) and reply.request_id:
                    report.bad_answered[reply.request_id] = str(reply.code)
