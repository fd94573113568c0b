"""The pending table and the memory of finished ids: bounded, and every path frees its slot."""

from __future__ import annotations

import asyncio

import pytest

from producer_sdk.errors import SvdTimeout
from producer_sdk.pending import Disposition, Finished, PendingTable, SeenIds
from tests.sdk_contract.waiting import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_seen_ids_are_bounded_by_count_oldest_first() -> None:
    seen = SeenIds(max_size=3, ttl_s=100)
    for i in range(5):
        seen.add(f"r{i}", Finished.ANSWERED)
    assert len(seen) == 3
    assert "r0" not in seen and "r1" not in seen
    assert all(f"r{i}" in seen for i in (2, 3, 4))


def test_seen_ids_expire_by_age() -> None:
    clock = Clock()
    seen = SeenIds(max_size=100, ttl_s=10, clock=clock)
    seen.add("old", Finished.EXPIRED)
    clock.now = 5
    seen.add("new", Finished.ANSWERED)
    clock.now = 10.5
    assert seen.get("old") is None and seen.get("new") is Finished.ANSWERED
    assert len(seen) == 1  # the old entry is gone, not just hidden


def test_seen_ids_reject_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        SeenIds(max_size=0, ttl_s=1)
    with pytest.raises(ValueError):
        SeenIds(max_size=1, ttl_s=0)


def table(max_pending: int = 4) -> PendingTable[str]:
    return PendingTable(max_pending, SeenIds(100, 60))


def deadline(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_an_answer_resolves_once_then_is_a_duplicate() -> None:
    pending = table()
    future = await pending.open("a", deadline(10))
    assert pending.resolve("a", "result") is Disposition.RESOLVED
    assert await future == "result"
    assert pending.resolve("a", "again") is Disposition.DUPLICATE
    assert len(pending) == 0
    assert pending.stats.resolved == 1 and pending.stats.duplicates == 1


async def test_an_exception_outcome_is_raised_to_the_caller() -> None:
    pending = table()
    future = await pending.open("a", deadline(10))
    pending.resolve("a", ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        await future


async def test_unknown_ids_are_counted_and_ignored() -> None:
    pending = table()
    assert pending.resolve("someone-else", "x") is Disposition.UNKNOWN
    assert pending.classify("") is Disposition.UNKNOWN
    assert pending.stats.unknown == 2


async def test_the_deadline_expires_the_request_and_a_later_answer_is_late() -> None:
    pending = table()
    future = await pending.open("a", deadline(0.01))
    with pytest.raises(SvdTimeout) as caught:
        await future
    assert caught.value.request_id == "a"
    assert len(pending) == 0
    assert pending.resolve("a", "too late") is Disposition.LATE
    assert pending.stats.expired == 1 and pending.stats.late == 1


async def test_slots_bound_the_table_and_an_await_waits_for_one() -> None:
    pending = table(max_pending=2)
    first = await pending.open("a", deadline(10))
    await pending.open("b", deadline(10))
    third = asyncio.create_task(pending.open("c", deadline(10)))
    await asyncio.sleep(0)
    assert not third.done() and len(pending) == 2
    pending.resolve("a", "done")
    await first
    await asyncio.wait_for(third, 5)
    assert len(pending) == 2 and "c" in pending


async def test_no_slot_before_the_deadline_raises_timeout_and_takes_nothing() -> None:
    pending = table(max_pending=1)
    await pending.open("a", deadline(10))
    with pytest.raises(SvdTimeout, match="no free slot"):
        await pending.open("b", deadline(0.01))
    assert len(pending) == 1 and "b" not in pending


async def test_cancelling_the_future_abandons_and_frees_the_slot() -> None:
    pending = table(max_pending=1)
    future = await pending.open("a", deadline(10))
    future.cancel()
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert len(pending) == 0
    assert pending.stats.abandoned == 1
    assert pending.resolve("a", "x") is Disposition.LATE
    await asyncio.wait_for(pending.open("b", deadline(10)), 1)  # the slot is back


async def test_fail_and_fail_all_end_requests_with_their_error() -> None:
    pending = table()
    a = await pending.open("a", deadline(10))
    b = await pending.open("b", deadline(10))
    c = await pending.open("c", deadline(10))
    pending.fail("a", RuntimeError("not sent"))
    pending.fail_all(lambda rid: RuntimeError(f"closed {rid}"))
    for future, message in ((a, "not sent"), (b, "closed b"), (c, "closed c")):
        with pytest.raises(RuntimeError, match=message):
            await future
    await asyncio.sleep(0)
    assert len(pending) == 0
    assert pending.stats.failed == 1 and pending.stats.abandoned == 2


async def test_a_request_id_cannot_be_pending_twice() -> None:
    pending = table()
    await pending.open("a", deadline(10))
    with pytest.raises(ValueError):
        await pending.open("a", deadline(10))


async def test_unawaited_failures_are_not_logged_as_never_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pending = table()
    await pending.open("a", deadline(0.01))
    await wait_until(lambda: len(pending) == 0, 10, "the request expired")
    await asyncio.sleep(0)  # its done-callback runs on the next loop turn

    import gc

    gc.collect()
    assert "never retrieved" not in caplog.text
