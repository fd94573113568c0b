"""Requests built by the SDK, and replies read by it, through the schemas codec."""

from __future__ import annotations

import numpy as np
import pytest

from producer_sdk import _wire
from producer_sdk.errors import InvalidReply, SvdComputeError, SvdInvalidRequest
from producer_sdk.result import SvdResult
from schemas import codec
from schemas.errors import ErrorCode
from schemas.models import ErrorResult, SvdResultMeta, Timings, WorkerInfo


def build(matrix: object, **overrides: object) -> codec.EncodedMessage:
    kwargs: dict[str, object] = {
        "request_id": "req-1",
        "k": None,
        "full_matrices": False,
        "compute_uv": True,
        "created_at_ms": 1_000,
        "deadline_ms": 31_000,
        "encoding": codec.Encoding.BINARY,
        **overrides,
    }
    return _wire.build_request(matrix, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", list(codec.Encoding))
def test_a_request_carries_id_deadline_options_and_reply_topic(encoding: codec.Encoding) -> None:
    message = build(
        np.ones((3, 2), np.float32),
        encoding=encoding,
        k=np.int64(1),
        reply_topic="my-replies",
        correlation_id="c-1",
    )
    assert message.key == b"req-1"
    decoded = codec.decode_request(message.value, message.headers)
    meta = decoded.meta
    assert decoded.encoding is encoding
    assert (meta.created_at_ms, meta.deadline_ms) == (1_000, 31_000)
    assert meta.options.k == 1 and meta.reply_topic == "my-replies"
    assert meta.correlation_id == "c-1"
    assert decoded.matrix.dtype == np.float32


def test_integers_become_float64() -> None:
    decoded = codec.decode_request(*_value_headers(build([[1, 2], [3, 4]])))
    assert decoded.matrix.dtype == np.float64


@pytest.mark.parametrize(
    ("matrix", "overrides", "code"),
    [
        (np.array([[np.nan]]), {}, ErrorCode.NON_FINITE),
        (np.ones((2, 2), np.float16), {}, ErrorCode.UNSUPPORTED_DTYPE),
        (np.array([[True]]), {}, ErrorCode.UNSUPPORTED_DTYPE),
        (np.ones((2, 2, 2)), {}, ErrorCode.INVALID_SHAPE),
        ("text", {}, ErrorCode.UNSUPPORTED_DTYPE),  # the contract ranks dtype before shape
        (np.ones((2, 2)), {"k": 1.5}, ErrorCode.INVALID_SCHEMA),
        (np.ones((2, 2)), {"k": True}, ErrorCode.INVALID_SCHEMA),
        (np.ones((2, 2)), {"reply_topic": "bad topic!"}, ErrorCode.INVALID_SCHEMA),
    ],
)
def test_bad_calls_raise_the_code_the_service_would_answer(
    matrix: object, overrides: dict[str, object], code: ErrorCode
) -> None:
    with pytest.raises(SvdInvalidRequest) as caught:
        build(matrix, **overrides)
    assert caught.value.code is code and caught.value.request_id == "req-1"


def result_message(request_id: str, encoding: codec.Encoding) -> codec.EncodedMessage:
    meta = SvdResultMeta(
        request_id=request_id,
        timings=Timings(queue_wait_ms=1, compute_ms=2, total_ms=3),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )
    u, s, vt = np.linalg.svd(np.arange(6.0).reshape(3, 2), full_matrices=False)
    return codec.encode_result(meta, u, s, vt, encoding)


def _value_headers(m: codec.EncodedMessage) -> tuple[bytes, list[tuple[str, bytes]]]:
    return m.value, m.headers


@pytest.mark.parametrize("encoding", list(codec.Encoding))
def test_a_result_decodes_to_read_only_arrays(encoding: codec.Encoding) -> None:
    outcome = _wire.decode_answer(*_value_headers(result_message("r", encoding)), "r")
    assert isinstance(outcome, SvdResult)
    assert outcome.encoding is encoding and outcome.meta.timings.compute_ms == 2
    assert outcome.u is not None and outcome.vt is not None
    for array in (outcome.u, outcome.s, outcome.vt):
        assert not array.flags.writeable


def test_an_error_result_becomes_its_typed_error() -> None:
    error = ErrorResult(request_id="r", code=ErrorCode.SVD_FAILED, message="no", retryable=False)
    outcome = _wire.decode_answer(*_value_headers(codec.encode_error(error)), "r")
    assert isinstance(outcome, SvdComputeError) and outcome.code is ErrorCode.SVD_FAILED


def test_a_reply_whose_body_names_another_request_is_invalid() -> None:
    outcome = _wire.decode_answer(
        *_value_headers(result_message("other", codec.Encoding.BINARY)), "r"
    )
    assert isinstance(outcome, InvalidReply) and outcome.request_id == "r"


def test_a_malformed_reply_is_invalid_not_an_exception() -> None:
    outcome = _wire.decode_answer(b"\x80 not json", [("content-type", b"application/json")], "r")
    assert isinstance(outcome, InvalidReply) and not outcome.retryable


def test_request_ids_are_unique_uuid4_hex() -> None:
    ids = {_wire.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)
