"""FakeSvdClient's test controls, and the client behaviour they make testable without Kafka."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from producer_sdk import ClientClosed, ErrorCode, SvdComputeError, SvdExpired, SvdTimeout
from producer_sdk.testing import FakeSvdClient
from schemas.limits import DecodeLimits
from tests.sdk_contract.waiting import wait_until


async def test_every_request_carries_deadline_and_creation_time() -> None:
    async with FakeSvdClient() as fake:
        handle = await fake.submit(np.eye(2), timeout=2.5)
        await handle
    (meta,) = fake.requests
    assert meta.request_id == handle.request_id
    assert meta.created_at_ms is not None and meta.deadline_ms == handle.deadline_ms
    assert meta.deadline_ms - meta.created_at_ms == 2500


async def test_fail_next_answers_with_that_error() -> None:
    async with FakeSvdClient() as fake:
        fake.fail_next(ErrorCode.SVD_FAILED, "did not converge")
        with pytest.raises(SvdComputeError) as caught:
            await fake.svd(np.eye(2))
        assert caught.value.code is ErrorCode.SVD_FAILED and not caught.value.retryable
        assert (await fake.svd(np.eye(2))).s.tolist() == [1.0, 1.0]  # only the next one


async def test_duplicate_answers_resolve_once() -> None:
    async with FakeSvdClient(duplicate_answers=True) as fake:
        results = await asyncio.gather(*(fake.svd(np.eye(2)) for _ in range(5)))
        await wait_until(lambda: fake.stats().duplicates == 5, 10, "five duplicates counted")
        stats = fake.stats()
    assert len(results) == 5 and stats.resolved == 5 and stats.pending == 0


async def test_a_request_held_past_its_deadline_times_out_and_its_answer_is_late() -> None:
    async with FakeSvdClient() as fake:
        fake.pause()
        with pytest.raises(SvdTimeout):
            await fake.svd(np.eye(2), timeout=0.05)
        fake.resume()
        await wait_until(lambda: fake.stats().late == 1, 10, "the late answer counted")
        stats = fake.stats()
    assert stats.pending == 0 and stats.expired == 1 and stats.late == 1


async def test_the_service_side_skips_expired_work() -> None:
    # latency beyond the deadline as the service measures it, with a client timeout that is
    # longer than the service's view: the fake answers EXPIRED, as the service does.
    async with FakeSvdClient(latency=0.05) as fake:
        handle = await fake.submit(np.eye(2), timeout=0.03)
        with pytest.raises((SvdExpired, SvdTimeout)):
            await handle


async def test_limits_are_the_services_and_can_be_tightened() -> None:
    async with FakeSvdClient(limits=DecodeLimits(max_rows=4)) as fake:
        with pytest.raises(Exception) as caught:
            await fake.svd(np.ones((5, 2)))
    assert getattr(caught.value, "code", None) is ErrorCode.LIMIT_EXCEEDED


async def test_pending_answers_end_with_client_closed() -> None:
    fake = FakeSvdClient()
    await fake.start()
    fake.pause()
    handle = await fake.submit(np.eye(2))
    await fake.close()
    with pytest.raises(ClientClosed):
        await handle
