"""Produce requests and collect every answer (results, errors, dead letters) from real topics."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from localkafka import TopicSettings
from schemas import codec
from schemas.deadletter import read_dead_letter
from schemas.models import ErrorResult, SvdRequestMeta

MIB = 1 << 20


def make_request(
    matrix: np.ndarray[Any, Any],
    *,
    encoding: codec.Encoding = codec.Encoding.BINARY,
    request_id: str | None = None,
    **fields: Any,
) -> tuple[str, codec.EncodedMessage]:
    request_id = request_id or uuid.uuid4().hex
    meta = SvdRequestMeta.model_validate(
        {
            "request_id": request_id,
            "matrix": {"shape": list(matrix.shape), "dtype": matrix.dtype.name},
            **fields,
        }
    )
    return request_id, codec.encode_request(meta, matrix, encoding)


async def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[codec.EncodedMessage | tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
) -> int:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        max_request_size=64 * MIB,
        linger_ms=5,
    )
    await producer.start()
    sent = 0
    try:
        futures = []
        for message in messages:
            if isinstance(message, codec.EncodedMessage):
                key, value, headers = message.key, message.value, message.headers
            else:
                key, value, headers = message
            futures.append(await producer.send(topic, value, key=key, headers=headers))
            sent += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


@dataclass
class Answers:
    results: dict[str, list[codec.DecodedResult]] = field(default_factory=dict)
    errors: dict[str, list[ErrorResult]] = field(default_factory=dict)
    dead_letters: list[Any] = field(default_factory=list)
    undecodable: int = 0

    def answered(self) -> set[str]:
        return set(self.results) | set(self.errors)

    def duplicates(self) -> int:
        counts = Counter({k: len(v) for k, v in self.results.items()})
        counts.update({k: len(v) for k, v in self.errors.items()})
        return sum(n - 1 for n in counts.values() if n > 1)

    def report(self, sent: int, expected: set[str]) -> str:
        lost = expected - self.answered()
        return (
            f"sent {sent}, answered {len(self.answered() & expected)}, duplicates {self.duplicates()}, "
            f"dead-lettered {len(self.dead_letters)}, lost {len(lost)}"
        )


class AnswerReader:
    """Reads the results and DLQ topics from the beginning; ``collect`` waits for ids with a deadline."""

    def __init__(
        self, bootstrap: str, topics: TopicSettings, *, isolation_level: str = "read_uncommitted"
    ) -> None:
        self._consumer = AIOKafkaConsumer(
            topics.results,
            topics.dlq,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=64 * MIB,
            max_partition_fetch_bytes=64 * MIB,
            isolation_level=isolation_level,
        )
        self._dlq = topics.dlq
        self.answers = Answers()

    async def __aenter__(self) -> AnswerReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> None:
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        for records in batch.values():
            for record in records:
                self._take(record)

    def _take(self, record: Any) -> None:
        if record.topic == self._dlq:
            self.answers.dead_letters.append(read_dead_letter(record.value, list(record.headers)))
            return
        try:
            reply = codec.decode_reply(record.value, list(record.headers))
        except codec.ContractError:
            self.answers.undecodable += 1
            return
        if isinstance(reply, ErrorResult):
            self.answers.errors.setdefault(reply.request_id or "", []).append(reply)
        else:
            self.answers.results.setdefault(reply.meta.request_id, []).append(reply)

    async def collect(
        self, ids: set[str], timeout: float = 120.0, *, dead_letters: int = 0
    ) -> Answers:
        """Poll until every id in ``ids`` is answered and ``dead_letters`` arrived, or fail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (
            ids <= self.answers.answered() and len(self.answers.dead_letters) >= dead_letters
        ):
            if loop.time() > deadline:
                missing = ids - self.answers.answered()
                raise AssertionError(
                    f"{len(missing)} of {len(ids)} requests unanswered after {timeout}s "
                    f"(dead letters {len(self.answers.dead_letters)}/{dead_letters}); e.g. {sorted(missing)[:5]}"
                )
            await self.poll()
        return self.answers

    async def read_to_end(self, timeout: float = 60.0) -> Answers:
        """Read every record written so far (up to the end offsets taken now), to count duplicates."""
        assignment = self._consumer.assignment()
        ends = await self._consumer.end_offsets(list(assignment))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            positions = {tp: await self._consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return self.answers
            if loop.time() > deadline:
                raise AssertionError(
                    f"read {positions}, short of the end offsets {ends}, in {timeout}s"
                )
            await self.poll()


def assert_factorization(matrix: np.ndarray[Any, Any], result: codec.DecodedResult) -> None:
    u, s, vt = result.u, result.s, result.vt
    assert u is not None and vt is not None
    tol = 1e-4 if matrix.dtype == np.float32 else 1e-10
    recon = (u * s) @ vt
    scale = max(1.0, float(np.linalg.norm(matrix)))
    assert np.linalg.norm(recon - matrix) / scale < tol * max(matrix.shape)
    k = s.shape[0]
    assert np.allclose(u.T @ u, np.eye(k), atol=tol * 10 * max(matrix.shape))
    assert np.allclose(vt @ vt.T, np.eye(k), atol=tol * 10 * max(matrix.shape))
    assert np.all(np.diff(s) <= tol * max(1.0, float(s[0])))
