"""The in-flight budget admits up to its limits and resumes only below the low watermark."""

from __future__ import annotations

import asyncio

import pytest

from consumer.flow import Budget, InFlight


def test_count_and_byte_limits() -> None:
    flow = InFlight(Budget(max_requests=3, max_bytes=100, resume_ratio=0.5))
    assert flow.fits(60)
    flow.admit(60)
    assert not flow.fits(50)  # bytes would pass the budget
    assert flow.fits(40)
    flow.admit(40)
    flow.admit(0)
    assert not flow.fits(0)  # three requests: the count limit
    flow.release(60)
    assert not flow.below_low_watermark()  # 2 requests > int(3 * 0.5) = 1
    flow.release(40)
    assert flow.below_low_watermark()
    assert (flow.peak_requests, flow.peak_bytes) == (3, 100)


def test_a_request_bigger_than_the_budget_runs_alone() -> None:
    flow = InFlight(Budget(max_requests=4, max_bytes=10))
    assert flow.fits(1000)
    flow.admit(1000)
    assert not flow.fits(1)


def test_invalid_budget() -> None:
    with pytest.raises(ValueError):
        Budget(max_requests=0, max_bytes=1)
    with pytest.raises(ValueError):
        Budget(max_requests=1, max_bytes=1, resume_ratio=1.0)


async def test_wait_for_release_wakes_on_release() -> None:
    flow = InFlight(Budget(max_requests=1, max_bytes=10))
    flow.admit(5)
    waiter = asyncio.create_task(flow.wait_for_release(seconds=30))
    await asyncio.sleep(0)
    flow.release(5)
    await asyncio.wait_for(waiter, 5)
