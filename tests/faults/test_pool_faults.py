"""Pool workers that die or hang mid-task: the service survives, retries, and answers every request.

Two ways to kill a worker: the test-only ``svd-test-fault`` header (``kill_once``,
``segfault_once``: the worker dies on the first attempt only; ``kill``, ``segfault``: on every
attempt), and a real SIGKILL sent from outside to the worker process found through /proc while
it computes a large SVD.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from consumer.admission import TEST_FAULT_HEADER
from localkafka import TopicSettings
from schemas import codec
from schemas.errors import ErrorCode
from tests.support import procs
from tests.support.kafka_io import make_request
from tests.support.service import ServiceProcess
from tests.support.tally import TallyReader, send_all

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

Report = Callable[[str, str], str]


def _with_fault(message: codec.EncodedMessage, fault: str) -> codec.EncodedMessage:
    return codec.EncodedMessage(
        key=message.key,
        value=message.value,
        headers=[*message.headers, (TEST_FAULT_HEADER, fault.encode())],
    )


def _good(rng: np.random.Generator, count: int, size: int = 24) -> dict[str, codec.EncodedMessage]:
    return dict(make_request(rng.standard_normal((size, size))) for _ in range(count))


async def test_killed_and_segfaulting_workers_are_retried_then_dead_lettered(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path, fault_report: Report
) -> None:
    rng = np.random.default_rng(20)
    max_attempts = 2
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log",
        pool_size=2, blas_threads=1, enable_test_faults="true", max_attempts=max_attempts,
        retry_backoff_s=0.05, task_timeout_s=120,
        # No idle segments kept for reuse, so any segment still there while the service runs
        # was left by a crashed task (a failed job's segment is never cached anyway: unit-tested
        # in tests/unit/test_shm.py).
        shm_cache_bytes=0,
    )  # fmt: skip
    faults = {"kill_once": 3, "segfault_once": 3, "kill": 1, "segfault": 1}
    injected: dict[str, str] = {}  # request id -> fault
    messages: list[codec.EncodedMessage] = []
    good = _good(rng, 40)
    for fault, count in faults.items():
        for request_id, message in _good(rng, count).items():
            injected[request_id] = fault
            messages.append(_with_fault(message, fault))
    messages.extend(good.values())
    random.Random(20).shuffle(messages)
    # The external kills: a 1500x1500 SVD takes 1-3 s here, time enough to find its worker.
    survivor_id, survivor = make_request(rng.standard_normal((1500, 1500)))
    doomed_id, doomed = make_request(rng.standard_normal((1500, 1500)))
    expected = {*injected, *good, survivor_id, doomed_id}
    killed: list[int] = []

    with service:
        service.wait_ready()
        first_workers = procs.wait_for_pool(service.pid, 2)
        async with TallyReader(kafka_bootstrap, topics) as reader:
            await send_all(kafka_bootstrap, topics.requests, messages)
            await reader.collect({*injected, *good}, timeout=120, dead_letters=2)

            # A worker killed from outside once: the retry on a fresh worker answers.
            await send_all(kafka_bootstrap, topics.requests, [survivor])
            killed.append(procs.busy_worker(service.pid))
            procs.sigkill(killed[-1])
            tally = await reader.collect({survivor_id}, timeout=120)

            # Killed on every attempt: past the retry limit, an error result and a dead letter.
            retries_before = service.log().count("retrying in")
            await send_all(kafka_bootstrap, topics.requests, [doomed])
            for attempt in range(1, max_attempts + 1):
                if attempt > 1:  # the retry is on another worker: wait until it is dispatched
                    service.wait_for_log("retrying in", count=retries_before + attempt - 1)
                killed.append(procs.busy_worker(service.pid))
                procs.sigkill(killed[-1])
            tally = await reader.collect({doomed_id}, timeout=120, dead_letters=3)

            # The pool is back to full size, without the killed workers, and still serves.
            workers = procs.wait_for_pool(service.pid, 2)
            after = _good(rng, 10)
            await send_all(kafka_bootstrap, topics.requests, after.values())
            tally = await reader.collect(set(after), timeout=60)
            tally = await reader.read_to_end()
        assert service.proc is not None and service.proc.poll() is None, "the service died"
        leftover_shm = procs.shm_segments(service.pid)
    leftover_shm += procs.shm_segments(service.pid)  # and none after the stop

    counts = tally.report(len(expected) + len(after), expected | set(after))
    line = fault_report(
        f"{faults} header faults among {len(good)} good requests, SIGKILL x{len(killed)} "
        f"from outside on workers {killed} (max_attempts {max_attempts})",
        counts,
    )
    assert expected | set(after) <= tally.answered(), line
    for request_id, fault in injected.items():
        if fault.endswith("_once"):
            assert tally.codes(request_id) == [None], (fault, tally.replies[request_id], line)
        else:
            assert tally.codes(request_id) == [ErrorCode.WORKER_CRASHED], (fault, line)
    assert tally.codes(survivor_id) == [None], line
    (survivor_reply,) = tally.replies[survivor_id]
    assert survivor_reply.worker_pid != killed[0]  # answered on another worker
    assert tally.codes(doomed_id) == [ErrorCode.WORKER_CRASHED], line
    assert tally.ok() >= set(good) | set(after)
    # Dead letters: exactly the requests past the retry limit, original bytes, every attempt.
    by_id = {d.meta.request_id: d for d in tally.dead_letters}
    crashed = {rid for rid, f in injected.items() if not f.endswith("_once")} | {doomed_id}
    assert set(by_id) == crashed and len(tally.dead_letters) == len(crashed), line
    assert by_id[doomed_id].value == doomed.value
    for dead in tally.dead_letters:
        assert dead.meta.code == ErrorCode.WORKER_CRASHED and dead.meta.attempts == max_attempts
    assert tally.duplicates() == 0, line
    assert set(workers).isdisjoint(killed) and all(not procs.alive(p) for p in killed)
    assert set(first_workers) - set(workers), "the header faults should have replaced workers"
    assert leftover_shm == [], f"shared memory left behind by crashed tasks: {leftover_shm}"


async def test_a_hung_task_is_killed_answered_timeout_and_the_pool_refills(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path, fault_report: Report
) -> None:
    rng = np.random.default_rng(30)
    task_timeout_s = 3.0
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log",
        pool_size=2, blas_threads=1, enable_test_faults="true", task_timeout_s=task_timeout_s,
    )  # fmt: skip
    hung = {}
    for request_id, message in _good(rng, 2).items():
        hung[request_id] = _with_fault(message, "hang")
    good = _good(rng, 20)

    with service:
        service.wait_ready()
        before = procs.wait_for_pool(service.pid, 2)
        async with TallyReader(kafka_bootstrap, topics) as reader:
            # Both workers hang at once: nothing else can run until the timeouts fire.
            await send_all(kafka_bootstrap, topics.requests, [*hung.values(), *good.values()])
            tally = await reader.collect({*hung, *good}, timeout=120, dead_letters=2)
            after = procs.wait_for_pool(service.pid, 2)
            server = procs.forkserver_of(service.pid)
            assert server is not None
            zombies = [p for p in procs.children(server) if not procs.alive(p)]
            # Full size means two tasks at once: two slow SVDs are answered by two workers.
            pair = dict(make_request(rng.standard_normal((1200, 1200))) for _ in range(2))
            await send_all(kafka_bootstrap, topics.requests, pair.values())
            tally = await reader.collect(set(pair), timeout=120)
            tally = await reader.read_to_end()
        assert service.proc is not None and service.proc.poll() is None, "the service died"

    expected = {*hung, *good, *pair}
    line = fault_report(
        f"'hang' x{len(hung)} (task timeout {task_timeout_s:g}s) ahead of {len(good)} good "
        f"requests on a pool of 2; workers {before} -> {after}",
        tally.report(len(expected), expected),
    )
    for request_id in hung:
        assert tally.codes(request_id) == [ErrorCode.TIMEOUT], line
    assert {d.meta.request_id for d in tally.dead_letters} == set(hung), line
    assert all(d.meta.code == ErrorCode.TIMEOUT for d in tally.dead_letters)
    assert tally.ok() >= {*good, *pair} and tally.duplicates() == 0, line
    assert set(before).isdisjoint(after), "both hung workers should have been replaced"
    assert not any(procs.alive(p) for p in before), "a hung worker is still running"
    assert not zombies, f"unreaped workers {zombies}"
    pair_pids = {r.worker_pid for rid in pair for r in tally.replies[rid]}
    assert pair_pids == set(after), f"the refilled pool {after} answered from {pair_pids}"
