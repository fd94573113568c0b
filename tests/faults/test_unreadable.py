"""Records the service cannot read: a batch in a codec it lacks, a batch corrupted on disk.

Each used to stop the service for good (it exited on every restart). Now each unreadable offset
gets a dead letter (UNREADABLE_RECORD), every readable request around it is answered once, and
the group commits to the end of the topic.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from localkafka import TopicSettings
from schemas.errors import ErrorCode
from tests.conftest import KafkaEndpoint, missing
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all, wait_committed_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

MIB = 1 << 20


async def _send_batch(bootstrap: str, topic: str, codec: str, count: int, seed: int) -> list[int]:
    """``count`` requests to partition 0 in one compressed batch; returns their offsets."""
    rng = np.random.default_rng(seed)
    kafka = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type=codec, linger_ms=200, acks="all"
    )
    await kafka.start()
    try:
        pending = []
        for _ in range(count):
            _, message = make_request(rng.standard_normal((8, 8)))
            pending.append(
                await kafka.send(
                    topic, message.value, key=message.key, headers=message.headers, partition=0
                )
            )
        return [(await ack).offset for ack in pending]
    finally:
        await kafka.stop()


def _good(seed: int, count: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return dict(make_request(rng.standard_normal((12, 12))) for _ in range(count))


async def _run(
    kafka_bootstrap: str,
    topics: TopicSettings,
    service: ServiceProcess,
    good: dict[str, object],
    unreadable: list[int],
) -> tuple[set[int], str]:
    group = f"svd-{topics.requests}"  # ServiceProcess's default group
    with service:
        async with TallyReader(kafka_bootstrap, topics) as reader:
            tally = await reader.collect(set(good), timeout=120, dead_letters=len(unreadable))
            await wait_committed_to_end(kafka_bootstrap, group, topics.requests, timeout=60)
            tally = await reader.read_to_end()
        alive = service.proc is not None and service.proc.poll() is None
        log = service.log()
    assert alive, f"the consumer died:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    assert tally.ok() == set(good) and tally.duplicates() == 0
    assert set(tally.answered()) == set(good), "an unreadable record cannot have been answered"
    for dead in tally.dead_letters:
        assert dead.meta.code == ErrorCode.UNREADABLE_RECORD, dead.meta
        assert dead.meta.truncated and dead.value == b"" and dead.meta.request_id is None
        assert dead.meta.source_topic == topics.requests and dead.meta.source_partition == 0
    offsets = {d.meta.source_offset for d in tally.dead_letters}
    assert len(tally.dead_letters) == len(offsets), "one dead letter per offset"
    return offsets, log


async def test_a_codec_the_service_lacks_is_dead_lettered_offset_by_offset(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    # A build without the codec libraries, as the service was before they became a dependency:
    # aiokafka imports cramjam and, failing, cannot decode snappy, lz4 or zstd.
    shim = tmp_path / "no-codecs" / "cramjam"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("no compression codecs in this build")\n')
    # A backlog on every partition and a budget of 4: reading past the bad batch fills the
    # budget, and what it read must be held, never dropped.
    good_before, good_after, spread = _good(1, 10), _good(2, 10), _good(3, 160)
    # The bad batch first: the service's first fetch fails on it, reading past it overfills the
    # budget at once, and every other partition waits with a backlog.
    zstd = await _send_batch(kafka_bootstrap, topics.requests, "zstd", 6, seed=4)
    await send_all(kafka_bootstrap, topics.requests, good_before.values(), partition=0)
    await send_all(kafka_bootstrap, topics.requests, good_after.values(), partition=0)
    await send_all(kafka_bootstrap, topics.requests, spread.values())  # every partition
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log", pool_size=1, max_inflight=4,
        extra_env={"PYTHONPATH": str(shim.parent)},
    )  # fmt: skip
    good = {**good_before, **good_after, **spread}
    offsets, log = await _run(kafka_bootstrap, topics, service, good, zstd)
    fault_report(
        f"a zstd batch of {len(zstd)} requests to a service without codecs, among {len(good)}",
        f"answered {len(good)}/{len(good)}, unreadable offsets dead-lettered {sorted(offsets)}",
    )
    assert offsets == set(zstd)
    assert "cannot be read" in log


async def test_a_batch_corrupted_on_disk_is_dead_lettered_and_the_partition_moves_on(
    kafka: KafkaEndpoint,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    if kafka.local is None:  # the segment files of another broker are out of reach
        message = "needs the project's own broker to corrupt a segment file"
        missing(message)
    good_before, good_after = _good(5, 8), _good(6, 8)
    await send_all(kafka.bootstrap, topics.requests, good_before.values(), partition=0)
    gzip = await _send_batch(kafka.bootstrap, topics.requests, "gzip", 5, seed=7)
    await send_all(kafka.bootstrap, topics.requests, good_after.values(), partition=0)
    segment = kafka.local.data_dir / f"{topics.requests}-0" / f"{0:020d}.log"
    corrupted = _corrupt_batches(segment, set(gzip))
    assert corrupted, f"no batch holding offsets {gzip} in {segment}"
    service = ServiceProcess(kafka.bootstrap, topics, tmp_path / "svc.log", pool_size=1)
    good = {**good_before, **good_after}
    offsets, _ = await _run(kafka.bootstrap, topics, service, good, gzip)
    fault_report(
        f"{corrupted} gzip batch(es) of offsets {gzip} corrupted on disk, among {len(good)}",
        f"answered {len(good)}/{len(good)}, unreadable offsets dead-lettered {sorted(offsets)}",
    )
    assert offsets == set(gzip)


async def test_a_header_name_that_is_not_utf8_is_dead_lettered(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    kcat = shutil.which("kcat")
    if kcat is None:  # make test installs it (Makefile TEST_PACKAGES)
        message = "kcat missing: apt-get install kcat"
        missing(message)
    good_before, good_after = _good(8, 6), _good(9, 6)
    await send_all(kafka_bootstrap, topics.requests, good_before.values(), partition=0)
    # Any Kafka client but aiokafka can send it; aiokafka's consumer then raises on every fetch.
    kcat_run = await asyncio.create_subprocess_exec(
        kcat, "-P", "-b", kafka_bootstrap, "-t", topics.requests, "-p", "0", "-k", "k-bad",
        "-H", "bad\udcffname=1", stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.wait_for(kcat_run.communicate(b"{}"), 30)
    assert kcat_run.returncode == 0
    await send_all(kafka_bootstrap, topics.requests, good_after.values(), partition=0)
    bad_offset = len(good_before)
    service = ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", pool_size=1)
    good = {**good_before, **good_after}
    offsets, _ = await _run(kafka_bootstrap, topics, service, good, [bad_offset])
    fault_report(
        f"a kcat record whose header name is not UTF-8, among {len(good)}",
        f"answered {len(good)}/{len(good)}, unreadable offsets dead-lettered {sorted(offsets)}",
    )
    assert offsets == {bad_offset}


def _corrupt_batches(segment: Path, offsets: set[int]) -> int:
    """Flip the last byte of every record batch holding one of ``offsets`` (its checksum then
    fails); the broker serves the page cache, so fetches see the change at once."""
    data = segment.read_bytes()
    hit = 0
    position = 0
    with segment.open("r+b") as file:
        # v2 batch header: baseOffset int64, batchLength int32, partitionLeaderEpoch int32,
        # magic int8, crc uint32, attributes int16, lastOffsetDelta int32, ...
        while position + 27 <= len(data):
            base, length = struct.unpack_from(">qi", data, position)
            if length <= 0:
                break
            (last_delta,) = struct.unpack_from(">i", data, position + 23)
            end = position + 12 + length
            if any(base <= offset <= base + last_delta for offset in offsets):
                file.seek(end - 1)
                file.write(bytes([data[end - 1] ^ 0xFF]))
                hit += 1
            position = end
    return hit
