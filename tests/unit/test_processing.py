"""One record's pass in a worker (consumer/processing.py), run in this process, without a pool.

The record's value and headers go in as the worker finds them in shared memory; the answer comes
out encoded for the wire in the room the parent reserved, or as the error to answer with, or as
a request for more room. These tests read the answers with the same decoder the SDK uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from consumer import compute, processing
from consumer.jobs import Answered, NeedsRoom, Refused, WorkerContext
from consumer.truncated import seed_from
from schemas import SvdRequestMeta, codec
from schemas.errors import ErrorCode
from schemas.limits import DecodeLimits
from schemas.models import ErrorResult
from schemas.sparse import SparseMatrix
from tests.support.kafka_io import make_request
from tests.support.sparse import random_sparse

LIMITS = DecodeLimits()
CONTEXT = WorkerContext(LIMITS, instance_id="instance-7", host="worker-host")
JSON = codec.Encoding.JSON
BINARY = codec.Encoding.BINARY


def _room(message: codec.EncodedMessage, limits: DecodeLimits = LIMITS) -> int:
    decoded = codec.decode_request(message.value, message.headers, limits)
    return codec.result_room(decoded.meta, decoded.reply_encoding)


def _pass(
    message: codec.EncodedMessage,
    room: int | None = None,
    *,
    context: WorkerContext = CONTEXT,
    timestamp_ms: int | None = None,
    value: memoryview | None = None,
    before_compute: Callable[[], None] | None = None,
) -> tuple[Answered | Refused | NeedsRoom, memoryview]:
    """The worker's pass over ``message`` with ``room`` bytes reserved (default: what it needs)."""
    if room is None:
        room = _room(message, context.limits)
    out = memoryview(bytearray(room))
    outcome = processing.answer(
        memoryview(message.value) if value is None else value,
        list(message.headers),
        out,
        timestamp_ms=timestamp_ms,
        context=context,
        dispatched_at=time.time(),
        before_compute=before_compute,
    )
    return outcome, out


def _reply(outcome: Any, out: memoryview) -> codec.DecodedResult:
    assert isinstance(outcome, Answered), outcome
    reply = codec.decode_reply(bytes(out[: outcome.value_bytes]), list(outcome.headers))
    assert isinstance(reply, codec.DecodedResult)
    assert reply.meta.request_id == outcome.request_id
    return reply


def _reconstructs(a: Any, reply: codec.DecodedResult, atol: float = 1e-10) -> bool:
    assert reply.u is not None and reply.vt is not None
    return bool(np.allclose((reply.u * reply.s) @ reply.vt, a, atol=atol * max(a.shape)))


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of compute.svd, with its input and options, still computed for real."""
    calls: list[dict[str, Any]] = []
    real = compute.svd

    def spy(a: Any, **options: Any) -> compute.SvdFactors:
        calls.append({"a": a, **options})
        return real(a, **options)

    monkeypatch.setattr(compute, "svd", spy)
    return calls


def _failing_compute(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def fail(a: Any, **options: Any) -> compute.SvdFactors:
        raise exc

    monkeypatch.setattr(compute, "svd", fail)


# --- answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "result_encoding", "answered_in"),
    [
        (BINARY, None, BINARY),
        (JSON, None, JSON),
        (BINARY, "json", JSON),
        (JSON, "binary", BINARY),
    ],
)
def test_a_dense_request_is_answered_in_its_encoding(
    encoding: codec.Encoding, result_encoding: str | None, answered_in: codec.Encoding
) -> None:
    a = np.random.default_rng(0).standard_normal((30, 20))
    fields: dict[str, Any] = {"correlation_id": "corr-1", "reply_topic": "svd-results.web-1"}
    if result_encoding is not None:
        fields["result_encoding"] = result_encoding
    request_id, message = make_request(a, encoding=encoding, created_at_ms=1_000, **fields)
    outcome, out = _pass(message, timestamp_ms=5_000)
    reply = _reply(outcome, out)
    assert isinstance(outcome, Answered)
    assert reply.encoding is answered_in
    assert _reconstructs(a, reply)
    assert outcome.request_id == request_id and outcome.reply_topic == "svd-results.web-1"
    assert outcome.created_at_ms == 1_000  # the request's own time, not the record's
    meta = reply.meta
    assert meta.correlation_id == "corr-1"
    assert (meta.worker.instance_id, meta.worker.host, meta.worker.pid) == (
        "instance-7", "worker-host", os.getpid(),
    )  # fmt: skip
    assert (meta.algorithm, meta.driver) == ("dense", "gesdd")
    assert meta.timings.compute_ms == pytest.approx(outcome.compute_ms)
    assert meta.timings.queue_wait_ms == pytest.approx(outcome.queue_wait_ms)
    assert outcome.queue_wait_ms > 1e9  # since 1970 + 1 s, the request's created_at_ms
    if answered_in is BINARY:
        assert outcome.value_bytes == _room(message)  # a binary answer's size is exact


def test_the_records_timestamp_stands_in_for_a_missing_created_at() -> None:
    _, message = make_request(np.eye(3))
    now_ms = int(time.time() * 1000)
    outcome, _ = _pass(message, timestamp_ms=now_ms - 60_000)
    assert isinstance(outcome, Answered) and outcome.created_at_ms == now_ms - 60_000
    assert 59_000 < outcome.queue_wait_ms < 120_000


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"k": 3}, "dense-topk"),
        ({"full_matrices": True}, "dense"),
        ({"compute_uv": False}, "dense"),
        ({"dtype": "float32", "quality": True}, "dense"),
    ],
)
def test_the_options_reach_the_compute(options: dict[str, Any], expect: str) -> None:
    a = np.random.default_rng(1).standard_normal((12, 8))
    _, message = make_request(a, options=options)
    outcome, out = _pass(message)
    reply = _reply(outcome, out)
    assert reply.meta.algorithm == expect
    reference = np.linalg.svd(a, compute_uv=False)
    k = options.get("k", 8)
    np.testing.assert_allclose(reply.s, reference[:k], rtol=1e-5)
    assert reply.s.dtype == np.dtype(options.get("dtype", "float64"))
    if options.get("compute_uv") is False:
        assert reply.u is None and reply.vt is None
    elif options.get("full_matrices"):
        assert reply.u is not None and reply.vt is not None
        assert (reply.u.shape, reply.vt.shape) == ((12, 12), (8, 8))
    if options.get("quality"):
        assert reply.meta.quality is not None
        assert reply.meta.quality.orthogonality_error < 1e-5


@pytest.mark.parametrize("encoding", list(codec.Encoding))
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_a_sparse_request_is_answered(
    encoding: codec.Encoding, fmt: str, computed: list[dict[str, Any]]
) -> None:
    matrix = random_sparse(np.random.default_rng(2), (40, 30), fmt=fmt)
    meta = SvdRequestMeta(
        request_id="sparse-1", matrix=matrix.spec(), options={"k": 3, "algorithm": "lobpcg"}
    )
    message = codec.encode_request(meta, matrix, encoding)
    outcome, out = _pass(message)
    reply = _reply(outcome, out)
    expected = np.linalg.svd(matrix.toarray(), compute_uv=False)[:3]
    np.testing.assert_allclose(reply.s, expected, rtol=1e-7)
    assert (reply.meta.algorithm, reply.meta.driver) == ("lobpcg", "svds")
    (call,) = computed
    assert call["seed"] == seed_from("sparse-1")  # the same request, the same factors
    assert call["algorithm"] == "lobpcg" and call["k"] == 3
    assert call["a"].format == fmt and call["a"].shape == (40, 30)  # never densified


def test_a_binary_matrix_is_not_copied_before_compute(computed: list[dict[str, Any]]) -> None:
    a = np.random.default_rng(3).standard_normal((16, 12))
    _, message = make_request(a)
    # The value as the worker finds it: a buffer it did not allocate (shared memory there).
    received = np.frombuffer(bytearray(message.value), dtype=np.uint8)
    before = received.copy()
    outcome, out = _pass(message, value=memoryview(received))
    assert _reconstructs(a, _reply(outcome, out))
    (call,) = computed
    assert np.shares_memory(call["a"], received)  # a view of the value, no copy
    assert call["check_finite"] is False  # the decoder scanned it once already
    np.testing.assert_array_equal(received, before)  # and nothing wrote to it


def test_a_binary_matrix_is_cast_once_when_the_compute_dtype_differs(
    computed: list[dict[str, Any]],
) -> None:
    a = np.random.default_rng(4).standard_normal((16, 12))
    _, message = make_request(a, options={"dtype": "float32"})
    received = np.frombuffer(bytearray(message.value), dtype=np.uint8)
    outcome, out = _pass(message, value=memoryview(received))
    reply = _reply(outcome, out)
    assert reply.s.dtype == np.float32
    (call,) = computed
    assert call["a"].dtype == np.float32 and not np.shares_memory(call["a"], received)


# --- refused, or asked again --------------------------------------------------------------------


def test_too_little_room_asks_for_more_before_computing(computed: list[dict[str, Any]]) -> None:
    _, message = make_request(np.ones((20, 20)), encoding=JSON)
    needed = _room(message)
    called: list[bool] = []
    outcome, out = _pass(message, needed - 1, before_compute=lambda: called.append(True))
    assert outcome == NeedsRoom(needed)
    assert computed == [] and called == []
    assert bytes(out) == bytes(needed - 1)  # nothing written
    assert isinstance(_pass(message, needed)[0], Answered)


def test_a_request_past_its_deadline_is_refused_expired(computed: list[dict[str, Any]]) -> None:
    called: list[bool] = []
    request_id, message = make_request(
        np.ones((4, 4)), deadline_ms=1, created_at_ms=0, reply_topic="svd-results.web-1"
    )
    outcome, _ = _pass(message, before_compute=lambda: called.append(True))
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.EXPIRED
    assert outcome.retryable and not outcome.computed  # retryable: sent again, it may be in time
    assert (outcome.request_id, outcome.reply_topic) == (request_id, "svd-results.web-1")
    assert outcome.created_at_ms == 0
    assert computed == [] and called == []
    future = int(time.time() * 1000) + 60_000
    assert isinstance(_pass(make_request(np.ones((4, 4)), deadline_ms=future)[1])[0], Answered)


def test_factors_that_overflow_are_refused_result_overflow() -> None:
    request_id, message = make_request(np.full((4, 4), 1e308))
    outcome, _ = _pass(message)
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.RESULT_OVERFLOW
    assert not outcome.retryable and outcome.computed and not outcome.again
    assert outcome.request_id == request_id and "scale the matrix down" in outcome.message


@pytest.mark.parametrize(("value", "refused"), [(1e39, True), (3e38, False), (-1e39, True)])
@pytest.mark.parametrize("encoding", list(codec.Encoding))
def test_float64_input_beyond_float32_is_refused_when_computed_in_float32(
    value: float, refused: bool, encoding: codec.Encoding, computed: list[dict[str, Any]]
) -> None:
    matrix = np.ones((3, 3))
    matrix[1, 2] = value
    request_id, message = make_request(matrix, encoding=encoding, options={"dtype": "float32"})
    outcome, _ = _pass(message)
    if refused:
        assert isinstance(outcome, Refused) and outcome.code == ErrorCode.NON_FINITE
        assert outcome.request_id == request_id and not outcome.computed
        assert computed == []
    else:
        assert isinstance(outcome, Answered)


def test_a_sparse_float64_matrix_beyond_float32_is_refused_too() -> None:
    matrix = random_sparse(np.random.default_rng(5), (6, 5))
    matrix.data[0] = 1e39
    meta = SvdRequestMeta(
        request_id="sparse-big", matrix=matrix.spec(), options={"k": 2, "dtype": "float32"}
    )
    outcome, _ = _pass(codec.encode_request(meta, matrix, BINARY), 4096)
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.NON_FINITE


@pytest.mark.parametrize("encoding", list(codec.Encoding))
def test_a_json_result_that_may_not_fit_is_refused_before_compute(
    encoding: codec.Encoding, computed: list[dict[str, Any]]
) -> None:
    # 400 x 400: 320,400 float64 numbers, 2.6 MB in binary, up to 8 MB as JSON.
    limits = DecodeLimits(max_result_bytes=4 << 20)
    context = WorkerContext(limits, instance_id="i", host="h")
    request_id, message = make_request(np.ones((400, 400)), encoding=encoding)
    outcome, _ = _pass(message, 4 << 20, context=context)
    if encoding is JSON:
        assert isinstance(outcome, Refused) and outcome.code == ErrorCode.LIMIT_EXCEEDED
        assert "result_encoding binary" in outcome.message
        assert outcome.request_id == request_id and not outcome.computed
        assert computed == []
    else:
        assert isinstance(outcome, Answered)


JSON_CT = ("content-type", b"application/json")


def _raw(value: bytes, *headers: tuple[str, bytes]) -> codec.EncodedMessage:
    return codec.EncodedMessage(key=None, value=value, headers=list(headers))


@pytest.mark.parametrize(
    ("message", "code", "request_id", "reply_topic"),
    [
        (
            _raw(b'{"schema_version": 1, "request_id": "nan-1", "reply_topic": "svd-results.a", '
                 b'"matrix": {"shape": [1, 2], "dtype": "float64", "data": [1, NaN]}}'),
            ErrorCode.NON_FINITE, "nan-1", "svd-results.a",
        ),
        (
            _raw(b'{"request_id": "big-1", "reply_topic": "svd-results.b", "pad": "' + b"x" * 1000),
            ErrorCode.INVALID_ENCODING, "big-1", "svd-results.b",
        ),
        (
            _raw(b"\0" * 8, ("content-type", b"application/vnd.svd.binary"),
                 ("svd-meta", b'{"schema_version": 1, "request_id": "bin-1", "reply_topic": '
                              b'"svd-results.c", "matrix": {"shape": [2, 2], "dtype": "float64"}}')),
            ErrorCode.SHAPE_MISMATCH, "bin-1", "svd-results.c",
        ),
        (
            _raw(b"\0" * 8, ("content-type", b"application/vnd.svd.binary"),
                 ("svd-meta", b'{"request_id": "bin-2", "reply_topic": "svd-results.d", "matrix"')),
            ErrorCode.INVALID_ENCODING, "bin-2", "svd-results.d",
        ),
        (
            _raw(b'{"request_id": "bad-topic", "reply_topic": "no spaces allowed", "matrix": 1}'),
            ErrorCode.INVALID_SCHEMA, "bad-topic", None,
        ),
        (_raw(b"\xff\xfe garbage"), ErrorCode.INVALID_ENCODING, None, None),
        (_raw(b"{}", ("content-type", b"application/x-python-pickle")),
         ErrorCode.INVALID_ENCODING, None, None),
    ],
    ids=["non-finite", "truncated-json", "short-binary", "broken-meta", "bad-topic", "garbage",
         "content-type"],
)  # fmt: skip
def test_a_record_that_does_not_decode_is_refused_with_what_could_be_recovered(
    message: codec.EncodedMessage,
    code: ErrorCode,
    request_id: str | None,
    reply_topic: str | None,
    computed: list[dict[str, Any]],
) -> None:
    outcome, _ = _pass(message, 4096, timestamp_ms=123)
    assert isinstance(outcome, Refused)
    assert outcome.code == code, outcome.message
    assert (outcome.request_id, outcome.reply_topic) == (request_id, reply_topic)
    assert not outcome.computed and not outcome.again and outcome.created_at_ms is None
    assert computed == []
    if request_id is not None:  # the error result the parent builds from it is valid
        ErrorResult(request_id=request_id, code=code, message=outcome.message, retryable=False)


def _unchecked_request(options: dict[str, Any]) -> codec.EncodedMessage:
    """A binary 4 x 3 request whose options the SDK would not have let through."""
    meta = {"schema_version": 1, "request_id": "opts-1", "options": options,
            "matrix": {"shape": [4, 3], "dtype": "float64"}}  # fmt: skip
    headers = [("content-type", b"application/vnd.svd.binary"), ("svd-meta", orjson.dumps(meta))]
    return codec.EncodedMessage(key=None, value=np.ones((4, 3)).tobytes(), headers=headers)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"k": 5}, "exceeds"),
        ({"algorithm": "arpack"}, "needs k"),
        ({"k": 2, "algorithm": "jacobi"}, "algorithm"),
        ({"k": 2, "full_matrices": True}, "cannot be combined"),
        ({"quality": True, "compute_uv": False}, "needs compute_uv"),
        ({"k": 0}, "k"),
    ],
)
def test_options_the_matrix_cannot_satisfy_are_refused_before_compute(
    options: dict[str, Any], match: str, computed: list[dict[str, Any]]
) -> None:
    outcome, _ = _pass(_unchecked_request(options), 4096)
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.INVALID_SCHEMA, outcome
    assert match in outcome.message and outcome.request_id == "opts-1"
    assert not outcome.computed and computed == []


@pytest.mark.parametrize(
    ("exc", "code", "retryable", "again"),
    [
        (np.linalg.LinAlgError("SVD did not converge"), ErrorCode.SVD_FAILED, False, False),
        (compute.ComputeError("no convergence"), ErrorCode.SVD_FAILED, False, False),
        (ValueError("k too large"), ErrorCode.INVALID_SCHEMA, False, False),
        (MemoryError("no room"), ErrorCode.INTERNAL, True, True),
        (RuntimeError("a bug"), ErrorCode.INTERNAL, True, False),
    ],
)
def test_a_compute_failure_becomes_the_error_to_answer_with(
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
    code: ErrorCode,
    retryable: bool,
    again: bool,
) -> None:
    _failing_compute(monkeypatch, exc)
    request_id, message = make_request(np.ones((3, 3)), reply_topic="svd-results.web-1")
    outcome, _ = _pass(message)
    assert isinstance(outcome, Refused)
    assert (outcome.code, outcome.retryable, outcome.again) == (code, retryable, again)
    assert outcome.computed and str(exc) in outcome.message
    assert (outcome.request_id, outcome.reply_topic) == (request_id, "svd-results.web-1")


def test_before_compute_runs_once_just_before_the_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real = compute.svd

    def svd(a: Any, **options: Any) -> compute.SvdFactors:
        order.append("svd")
        return real(a, **options)

    monkeypatch.setattr(compute, "svd", svd)
    _, message = make_request(np.eye(2))
    outcome, _ = _pass(message, before_compute=lambda: order.append("fault"))
    assert isinstance(outcome, Answered) and order == ["fault", "svd"]


def test_a_fault_that_raises_before_compute_is_answered_internal() -> None:
    # The "raise" test fault: a bug in the worker, answered INTERNAL (a request sent again may
    # pass), never taken for a property of the request.
    def raising() -> None:
        raise RuntimeError("injected")

    request_id, message = make_request(np.eye(2))
    outcome, _ = _pass(message, before_compute=raising)
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.INTERNAL
    assert outcome.retryable and "injected" in outcome.message
    assert outcome.request_id == request_id


def test_a_sparse_request_is_answered_from_its_arrays_alone() -> None:
    # 3000 x 2000 with 60 entries: 48 MB dense, a few KB as it travels and as it is computed.
    matrix = random_sparse(np.random.default_rng(6), (3000, 2000), density=1e-5)
    assert isinstance(matrix, SparseMatrix)
    meta = SvdRequestMeta(request_id="thin", matrix=matrix.spec(), options={"k": 1})
    message = codec.encode_request(meta, matrix, BINARY)
    assert len(message.value) < 100_000
    outcome, out = _pass(message)
    reply = _reply(outcome, out)
    expected = np.abs(matrix.data).max()  # entries of distinct rows and columns, but a few
    assert reply.s[0] >= expected * (1 - 1e-9)
