"""What every SvdClient does, checked against both FakeSvdClient and the real client + service.

A behaviour that differs between the two is a bug in the fake (or in the client)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from producer_sdk import (
    ClientClosed,
    Encoding,
    ErrorCode,
    SvdError,
    SvdInvalidRequest,
    SvdResult,
    SvdTimeout,
)
from tests.sdk_contract.conftest import Variant
from tests.sdk_contract.waiting import wait_until

RNG = np.random.default_rng(7)


def matrix(m: int, n: int, dtype: Any = np.float64) -> np.ndarray[Any, Any]:
    return RNG.standard_normal((m, n)).astype(dtype)


def assert_svd_of(
    a: np.ndarray[Any, Any],
    result: SvdResult,
    *,
    k: int | None = None,
    compute_uv: bool = True,
    full_matrices: bool = False,
) -> None:
    m, n = a.shape
    r = k or min(m, n)
    tol = 1e-4 if a.dtype == np.float32 else 1e-10
    assert result.s.dtype == a.dtype
    assert result.s.shape == (r,)
    assert np.all(np.diff(result.s) <= 0), "singular values descend"
    expected = np.linalg.svd(a.astype(np.float64), compute_uv=False)[:r]
    np.testing.assert_allclose(result.s, expected, rtol=tol * 10, atol=tol * 10)
    if not compute_uv:
        assert result.u is None and result.vt is None
        return
    assert result.u is not None and result.vt is not None
    if full_matrices:
        assert result.u.shape == (m, m) and result.vt.shape == (n, n)
        rebuilt = result.u[:, :r] * result.s @ result.vt[:r]
    else:
        assert result.u.shape == (m, r) and result.vt.shape == (r, n)
        rebuilt = result.u * result.s @ result.vt
    if k is None:
        scale = np.linalg.norm(a)
        assert np.linalg.norm(rebuilt - a) / scale < tol * 100
    assert not result.u.flags.writeable and not result.s.flags.writeable


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("encoding", [Encoding.BINARY, Encoding.JSON], ids=["binary", "json"])
async def test_round_trip(variant: Variant, dtype: Any, encoding: Encoding) -> None:
    a = matrix(17, 9, dtype)
    async with variant.make(encoding=encoding) as client:
        result = await client.svd(a, timeout=60)
    assert result.encoding is encoding
    assert_svd_of(a, result)


async def test_options_values_only_top_k_and_full_matrices(variant: Variant) -> None:
    a = matrix(12, 7)
    async with variant.make() as client:
        values, top, full = await asyncio.gather(
            client.svd(a, compute_uv=False, timeout=60),
            client.svd(a, k=3, timeout=60),
            client.svd(a, full_matrices=True, timeout=60),
        )
    assert_svd_of(a, values, compute_uv=False)
    assert_svd_of(a, top, k=3)
    assert_svd_of(a, full, full_matrices=True)


async def test_lists_and_integers_are_accepted_as_float64(variant: Variant) -> None:
    async with variant.make() as client:
        result = await client.svd([[3, 0], [0, 4]], timeout=60)
    assert result.s.dtype == np.float64
    np.testing.assert_allclose(result.s, [4.0, 3.0])


async def test_submit_returns_a_handle_before_the_answer(variant: Variant) -> None:
    a = matrix(6, 4)
    async with variant.make() as client:
        handle = await client.submit(a, timeout=60, correlation_id="order-42")
        assert len(handle.request_id) >= 32
        result = await handle
        assert handle.done()
    assert result.request_id == handle.request_id
    assert result.meta.correlation_id == "order-42"
    assert_svd_of(a, result)


@pytest.mark.parametrize(
    ("bad", "options", "code"),
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, ErrorCode.NON_FINITE),
        (np.array([[1.0, np.inf]]), {}, ErrorCode.NON_FINITE),
        (np.ones((2, 2), dtype=np.complex128), {}, ErrorCode.UNSUPPORTED_DTYPE),
        (np.ones(3), {}, ErrorCode.INVALID_SHAPE),
        (np.ones((0, 3)), {}, ErrorCode.INVALID_SHAPE),
        ([[1.0, 2.0], [3.0]], {}, ErrorCode.INVALID_SHAPE),
        (np.ones((3, 2)), {"k": 3}, ErrorCode.INVALID_SCHEMA),
        (np.ones((3, 2)), {"k": 0}, ErrorCode.INVALID_SCHEMA),
        (np.ones((3, 2)), {"k": 1, "full_matrices": True}, ErrorCode.INVALID_SCHEMA),
    ],
    ids=["nan", "inf", "complex", "1-d", "empty", "ragged", "k>rank", "k=0", "k+full"],
)
async def test_invalid_input_is_rejected_before_sending(
    variant: Variant, bad: Any, options: dict[str, Any], code: ErrorCode
) -> None:
    async with variant.make() as client:
        with pytest.raises(SvdInvalidRequest) as caught:
            await client.submit(bad, timeout=60, **options)
        assert client.stats().pending == 0
    assert caught.value.code is code
    assert caught.value.retryable is False


async def test_the_service_limits_answer_with_their_code(variant: Variant) -> None:
    tall = np.ones((16_385, 1), dtype=np.float32)  # one row over the default max_rows
    async with variant.make() as client:
        handle = await client.submit(tall, timeout=60)  # valid by the contract: it is sent
        with pytest.raises(SvdInvalidRequest) as caught:
            await handle
    assert caught.value.code is ErrorCode.LIMIT_EXCEEDED
    assert caught.value.request_id == handle.request_id


async def test_a_request_larger_than_max_message_bytes_is_refused_locally(variant: Variant) -> None:
    async with variant.make(max_message_bytes=1024 * 1024) as client:
        with pytest.raises(SvdInvalidRequest) as caught:
            await client.submit(np.ones((400, 400)), timeout=60)  # 1.28 MB
    assert caught.value.code is ErrorCode.MESSAGE_TOO_LARGE


async def test_timeout_raises_and_leaves_nothing_pending(variant: Variant) -> None:
    async with variant.make_unserved() as client:
        handle = await client.submit(matrix(3, 3), timeout=0.3)
        with pytest.raises(SvdTimeout) as caught:
            await handle
        stats = client.stats()
    assert caught.value.code is ErrorCode.TIMEOUT and caught.value.retryable
    assert caught.value.request_id == handle.request_id
    assert stats.pending == 0 and stats.expired == 1


async def test_backpressure_waits_for_a_slot_within_the_timeout(variant: Variant) -> None:
    async with variant.make_unserved(max_pending=2) as client:
        first = await client.submit(matrix(2, 2), timeout=30)
        second = await client.submit(matrix(2, 2), timeout=30)
        assert client.stats().pending == 2
        with pytest.raises(SvdTimeout):
            await client.submit(matrix(2, 2), timeout=0.2)  # no slot frees up in time
        first.cancel()  # frees a slot
        third = await client.submit(matrix(2, 2), timeout=30)
        assert client.stats().pending == 2
        assert not second.done() and not third.done()


async def test_cancelling_the_caller_abandons_the_request(variant: Variant) -> None:
    async with variant.make_unserved() as client:
        task = asyncio.create_task(client.svd(matrix(3, 3), timeout=30))
        await wait_until(lambda: client.stats().pending == 1, 30, "the request is pending")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = client.stats()
    assert stats.pending == 0 and stats.abandoned == 1


async def test_close_fails_pending_requests_and_refuses_new_ones(variant: Variant) -> None:
    client = variant.make_unserved()
    with pytest.raises(ClientClosed):
        await client.svd(matrix(2, 2))  # not started
    await client.start()
    handle = await client.submit(matrix(2, 2), timeout=30)
    await client.close()
    with pytest.raises(ClientClosed) as caught:
        await handle
    assert caught.value.request_id == handle.request_id
    with pytest.raises(ClientClosed):
        await client.submit(matrix(2, 2))
    await client.close()  # idempotent
    assert client.closed


async def test_batch_keeps_order_and_can_return_errors_in_place(variant: Variant) -> None:
    mats = [matrix(5, 3) for _ in range(9)]
    async with variant.make() as client:
        results = await client.svd_many(mats, concurrency=3, timeout=60)
        mixed = await client.svd_many(
            [mats[0], np.array([[np.nan]]), mats[2]], return_exceptions=True, timeout=60
        )
        with pytest.raises(SvdInvalidRequest):
            await client.svd_many([mats[0], np.array([[np.nan]])], timeout=60)
        assert client.stats().pending == 0
    for a, result in zip(mats, results, strict=True):
        assert_svd_of(a, result)
    assert isinstance(mixed[0], SvdResult) and isinstance(mixed[2], SvdResult)
    assert isinstance(mixed[1], SvdError) and mixed[1].code is ErrorCode.NON_FINITE


async def test_two_clients_each_get_only_their_own_answers(variant: Variant) -> None:
    a_mats = [matrix(4, 4) for _ in range(20)]
    b_mats = [matrix(5, 3) for _ in range(20)]
    async with variant.make() as a, variant.make() as b:
        a_results, b_results = await asyncio.gather(
            a.svd_many(a_mats, timeout=60), b.svd_many(b_mats, timeout=60)
        )
        a_stats, b_stats = a.stats(), b.stats()
    for mats, results in ((a_mats, a_results), (b_mats, b_results)):
        for m, result in zip(mats, results, strict=True):
            assert_svd_of(m, result)
    assert a_stats.resolved == 20 and b_stats.resolved == 20
    assert a_stats.pending == 0 and b_stats.pending == 0
