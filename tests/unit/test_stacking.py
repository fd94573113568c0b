"""Many small matrices of one shape in one stacked LAPACK call: the same answers as one by one."""

from __future__ import annotations

import time

import numpy as np
import pytest

from consumer import compute, processing
from consumer.jobs import Answered, WorkerContext
from schemas import codec
from schemas.limits import DecodeLimits
from tests.support.kafka_io import make_request

CONTEXT = WorkerContext(DecodeLimits(), "test", "host")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("full_matrices", "compute_uv"), [(False, True), (True, True), (False, False)]
)
def test_a_stack_decomposes_each_matrix_as_svd_does(
    dtype: str, full_matrices: bool, compute_uv: bool
) -> None:
    rng = np.random.default_rng(7)
    stack = rng.standard_normal((5, 9, 6)).astype(dtype)
    stacked = compute.svd_stack(stack, full_matrices=full_matrices, compute_uv=compute_uv)
    tolerance = compute.relative_tolerance(dtype, 9 * 6)
    for a, got in zip(stack, stacked, strict=True):
        alone = compute.svd(a, full_matrices=full_matrices, compute_uv=compute_uv)
        np.testing.assert_allclose(got.s, alone.s, rtol=tolerance, atol=tolerance)
        assert got.s.dtype == a.dtype
        if compute_uv:
            assert got.u is not None and got.vt is not None
            assert got.u.shape == alone.u.shape and got.vt.shape == alone.vt.shape  # type: ignore[union-attr]
            r = got.s.shape[0]
            rebuilt = (got.u[:, :r] * got.s) @ got.vt[:r, :]
            np.testing.assert_allclose(rebuilt, a, atol=10 * tolerance * np.abs(a).max())
        else:
            assert got.u is None and got.vt is None


def test_a_stack_refuses_what_is_not_a_float_stack() -> None:
    with pytest.raises(ValueError, match="stack"):
        compute.svd_stack(np.ones((3, 3)))
    with pytest.raises(ValueError, match="stack"):
        compute.svd_stack(np.ones((2, 3, 3), dtype=np.int64))


def _items(matrices: list[np.ndarray], **fields: object) -> list[processing.Item]:
    items = []
    for matrix in matrices:
        _, message = make_request(matrix, **fields)
        out = memoryview(bytearray(1 << 20))
        items.append(processing.Item(memoryview(message.value), message.headers, out))
    return items


def _decoded(item: processing.Item, outcome: object) -> codec.DecodedResult:
    assert isinstance(outcome, Answered), outcome
    reply = codec.decode_reply(bytes(item.out[: outcome.value_bytes]), list(outcome.headers))
    assert isinstance(reply, codec.DecodedResult)
    return reply


def test_a_job_of_same_shape_requests_is_answered_from_one_stacked_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, ...]] = []
    real = compute.svd_stack

    def counting(stack: np.ndarray, **kwargs: bool) -> list[compute.SvdFactors]:
        calls.append(stack.shape)
        return real(stack, **kwargs)

    monkeypatch.setattr(compute, "svd_stack", counting)
    rng = np.random.default_rng(3)
    matrices = [rng.standard_normal((8, 5)) for _ in range(4)] + [rng.standard_normal((5, 5))]
    items = _items(matrices)
    outcomes = processing.answer_all(items, context=CONTEXT, dispatched_at=time.time())
    assert calls == [(4, 8, 5)]  # the lone 5x5 is computed on its own
    for matrix, item, outcome in zip(matrices, items, outcomes, strict=True):
        reply = _decoded(item, outcome)
        assert reply.u is not None and reply.vt is not None
        np.testing.assert_allclose((reply.u * reply.s) @ reply.vt, matrix, atol=1e-12)
        assert reply.meta.driver == compute.DRIVER_GESDD


def test_requests_with_other_options_are_not_stacked_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, ...]] = []
    real = compute.svd_stack
    monkeypatch.setattr(
        compute, "svd_stack", lambda stack, **kw: calls.append(stack.shape) or real(stack, **kw)
    )
    matrix = np.arange(12.0).reshape(4, 3) + np.eye(4, 3)
    items = _items([matrix]) + _items([matrix], options={"compute_uv": False})
    items += _items([matrix], options={"k": 2}) + _items([matrix * 1e300])
    outcomes = processing.answer_all(items, context=CONTEXT, dispatched_at=time.time())
    assert calls == []
    expected = np.linalg.svd(matrix, compute_uv=False)
    for item, outcome in zip(items[:2], outcomes[:2], strict=True):
        np.testing.assert_allclose(_decoded(item, outcome).s, expected, rtol=1e-12)
    assert _decoded(items[2], outcomes[2]).s.shape == (2,)
    np.testing.assert_allclose(_decoded(items[3], outcomes[3]).s, expected * 1e300, rtol=1e-12)
