"""The object store fails under stored payloads: down and back, the consumer or a worker killed
while requests are being read from and written to it. Every request is answered, exactly once
among committed answers in exactly_once, and no object is left behind that nobody will read.

Each test has its own prefix of the session's store (tests/support/stored.py) and counts its
objects at the end: request objects are deleted once their answers are committed; result
objects stay (no SDK reads them here: the plain reader below only decodes the records), one per
request whatever was computed twice, because a record's result always has the same key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from consumer.admission import TEST_FAULT_HEADER
from localkafka import TopicSettings
from schemas import codec
from tests.conftest import ObjectStoreEndpoint
from tests.support import procs
from tests.support.service import ServiceProcess
from tests.support.stored import StorePrefix
from tests.support.tally import TallyReader, counts_line, send_all

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

# Large enough that the worker spends a while in the store and in LAPACK; small enough for CI.
N = 700


@pytest.fixture
def prefix(object_store: ObjectStoreEndpoint) -> Iterator[StorePrefix]:
    yield StorePrefix.new(object_store)


def _settings(prefix: StorePrefix, **more: object) -> dict[str, object]:
    return {
        "pool_size": 2, "blas_threads": 1, "task_timeout_s": 300, "metrics_port": -1,
        "store_outage_s": 120, "retry_backoff_s": 0.2, **more,
    }  # fmt: skip


def _requests(prefix: StorePrefix, count: int, seed: int) -> dict[str, codec.EncodedMessage]:
    rng = np.random.default_rng(seed)
    return dict(prefix.stored_request(rng.standard_normal((N, N))) for _ in range(count))


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_the_store_down_and_back_delays_stored_requests_and_loses_none(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    object_store: ObjectStoreEndpoint,
    prefix: StorePrefix,
    fault_report: Callable[[str, str], str],
    guarantee: str,
) -> None:
    local = object_store.local
    assert local is not None, "this test kills the store: it needs the project's local store"
    requests = _requests(prefix, 8, seed=1)  # stored while the store is up
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log", extra_env=prefix.service_env,
        **_settings(prefix, processing_guarantee=guarantee),
    )  # fmt: skip
    async with TallyReader(kafka_bootstrap, topics, isolation_level=isolation) as reader:
        with service:
            service.wait_ready()
            local.kill()
            try:
                await send_all(kafka_bootstrap, topics.requests, requests.values())
                # Every worker is now failing to read: the service waits, it does not answer.
                service.wait_for_log(r"the object store failed .*retrying in", timeout=60)
                await reader.poll(timeout_ms=500)
                assert not (reader.tally.answered() & set(requests)), "answered while down"
            finally:
                local.start()
            tally = await reader.collect(set(requests), timeout=240)
            tally = await reader.read_to_end()
            warnings = service.log().count("the object store failed")
    report = fault_report(
        f"store SIGKILLed under 8 stored {N}x{N} requests ({guarantee}), back after the first "
        "failed read",
        counts_line(
            sent=len(requests), answered=len(tally.answered() & set(requests)),
            duplicates=tally.duplicates(set(requests)), dead_lettered=len(tally.dead_letters),
            lost=len(set(requests) - tally.answered()),
        ) + f" | store-failure warnings {warnings}",
    )  # fmt: skip
    assert tally.ok() >= set(requests), report
    assert not tally.dead_letters, report
    if guarantee == "exactly_once":
        assert tally.duplicates(set(requests)) == 0, report
    # Logged once per request and outage and every tenth retry, not at every retry.
    assert warnings <= 3 * len(requests), report
    prefix.wait_count(0, "requests/")
    assert prefix.count("results/") == len(requests), prefix.keys("results/")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_the_consumer_killed_while_reading_and_writing_the_store_loses_nothing(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    prefix: StorePrefix,
    fault_report: Callable[[str, str], str],
    guarantee: str,
) -> None:
    requests = _requests(prefix, 12, seed=2)
    settings = _settings(prefix, group_id=f"g-{topics.requests}", processing_guarantee=guarantee)
    first = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "first.log", extra_env=prefix.service_env, **settings
    )
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    async with TallyReader(kafka_bootstrap, topics, isolation_level=isolation) as reader:
        with first:
            first.wait_ready()
            await send_all(kafka_bootstrap, topics.requests, requests.values())
            await reader.wait_answered(2, set(requests), timeout=120)
            procs.busy_worker(first.pid)  # mid-request: reading, computing or writing
            answered_before = len(reader.tally.answered() & set(requests))
            tree = procs.descendants(first.pid)
            first.kill()
            procs.wait_for(lambda: not any(map(procs.alive, tree)), 30, "the pool to die")
        second = ServiceProcess(
            kafka_bootstrap, topics, tmp_path / "second.log", extra_env=prefix.service_env,
            **settings,
        )  # fmt: skip
        with second:
            tally = await reader.collect(set(requests), timeout=240)
            tally = await reader.read_to_end()
            prefix.wait_count(0, "requests/")
    report = fault_report(
        f"consumer SIGKILLed with a worker busy on a stored {N}x{N} request ({guarantee}; "
        f"{answered_before} of {len(requests)} answered before)",
        counts_line(
            sent=len(requests), answered=len(tally.answered() & set(requests)),
            duplicates=tally.duplicates(set(requests)), dead_lettered=len(tally.dead_letters),
            lost=len(set(requests) - tally.answered()),
        ),
    )  # fmt: skip
    assert tally.ok() >= set(requests), report
    assert not tally.dead_letters, report
    if guarantee == "exactly_once":
        assert tally.duplicates(set(requests)) == 0, report
    # Redone requests wrote their results again under the same keys: one object each.
    assert prefix.count("results/") == len(requests), prefix.keys("results/")


async def test_a_worker_killed_on_a_stored_request_is_retried_and_its_objects_cleaned(
    kafka_bootstrap: str,
    topics: TopicSettings,
    tmp_path: Path,
    prefix: StorePrefix,
    fault_report: Callable[[str, str], str],
) -> None:
    requests = _requests(prefix, 3, seed=3)
    # kill_once: the worker dies after reading the object, before computing; the retry passes.
    faulty = {
        request_id: codec.EncodedMessage(
            message.key, message.value, [*message.headers, (TEST_FAULT_HEADER, b"kill_once")]
        )
        for request_id, message in requests.items()
    }
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log", extra_env=prefix.service_env,
        enable_test_faults="true", **_settings(prefix),
    )  # fmt: skip
    async with TallyReader(kafka_bootstrap, topics) as reader:
        with service:
            service.wait_ready()
            await send_all(kafka_bootstrap, topics.requests, faulty.values())
            tally = await reader.collect(set(requests), timeout=180)
            prefix.wait_count(0, "requests/")
    report = fault_report(
        "a pool worker SIGKILLed on its first attempt at each of 3 stored requests",
        counts_line(
            sent=3, answered=len(tally.answered() & set(requests)),
            duplicates=tally.duplicates(set(requests)), dead_lettered=len(tally.dead_letters),
            lost=len(set(requests) - tally.answered()),
        ),
    )  # fmt: skip
    assert tally.ok() >= set(requests), report
    assert prefix.count("results/") == len(requests)
