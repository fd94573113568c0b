"""Poison inputs in a stream of good requests: each bad one is answered and dead-lettered, byte for
byte; every good one is answered; the consumer stays up and commits past all of them."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from localkafka import TopicSettings
from tests.support.kafka_io import make_request
from tests.support.poison import Poison, poison_records
from tests.support.service import ServiceProcess
from tests.support.tally import Outgoing, TallyReader, send_all, wait_committed_to_end

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

MIB = 1 << 20


async def test_poison_inputs_are_answered_dead_lettered_and_committed_past(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    fault_report: Callable[[str, str], str],
) -> None:
    rng = np.random.default_rng(40)
    # The service's message limit is set below the topic's (64 MiB), so an oversize record
    # reaches the service at all: the broker would refuse anything above its own limit.
    message_limit = 2 * MIB
    poison = poison_records(rng, oversize_bytes=3 * MIB)
    good = dict(make_request(rng.standard_normal((24, 24))) for _ in range(120))
    items: list[tuple[Poison | None, Outgoing]] = [
        *((None, m) for m in good.values()),
        *((p, p.record()) for p in poison),
    ]
    random.Random(40).shuffle(items)
    group = f"g-{topics.requests}"
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log", group_id=group,
        pool_size=2, max_message_bytes=message_limit,
    )  # fmt: skip
    with_id = {p.request_id: p for p in poison if p.request_id is not None}

    with service:
        async with TallyReader(kafka_bootstrap, topics) as reader:
            sent = await send_all(kafka_bootstrap, topics.requests, (m for _, m in items))
            tally = await reader.collect({*good, *with_id}, timeout=120, dead_letters=len(poison))
            committed = await wait_committed_to_end(kafka_bootstrap, group, topics.requests)
            tally = await reader.read_to_end()
        alive = service.proc is not None and service.proc.poll() is None
        log = service.log()

    expected = {*good, *with_id}
    where = {
        p.name: (meta.partition, meta.offset) for (p, _), meta in zip(items, sent, strict=True) if p
    }
    line = fault_report(
        f"{len(poison)} poison records ({', '.join(p.name for p in poison)}) shuffled into "
        f"{len(good)} good requests",
        tally.report(len(items), expected),
    )
    assert alive, f"the consumer died: {line}"
    assert "Traceback" not in log, line
    assert tally.ok() == set(good), line  # every good one, and no bad one, got factors
    for request_id, p in with_id.items():
        assert tally.codes(request_id) == [p.code], (p.name, tally.replies[request_id], line)
    assert tally.duplicates() == 0 and tally.undecodable == 0, line
    # One dead letter per poison record (found by its source offset), holding its original bytes
    # and headers, or a prefix of them when it is larger than the service's limit.
    by_source = {(d.meta.source_partition, d.meta.source_offset): d for d in tally.dead_letters}
    assert len(tally.dead_letters) == len(poison) == len(by_source), line
    for p in poison:
        dead = by_source.get(where[p.name])
        assert dead is not None, f"no dead letter of {p.name}: {line}"
        original = p.value or b""
        assert dead.meta.value_bytes == len(original), (p.name, dead.meta)
        assert dead.meta.truncated is p.truncated, (p.name, dead.meta)
        if p.truncated:
            assert len(dead.value) < len(original) and original.startswith(dead.value), p.name
        else:
            assert (dead.value, dead.original_headers) == (original, p.headers), p.name
        assert dead.meta.code == p.code, (p.name, dead.meta)
        assert dead.meta.request_id == p.request_id, (p.name, dead.meta)
        assert dead.meta.source_topic == topics.requests
        assert dead.meta.attempts == 0, f"{p.name} was rejected before compute: {dead.meta}"
    print(f"committed {committed}")
