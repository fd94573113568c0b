"""Round trips through both encodings, and the zero-copy guarantee of the binary decoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import (
    ContractError,
    DecodedResult,
    Encoding,
    ErrorCode,
    ErrorResult,
    MatrixSpec,
    SvdOptions,
    SvdRequestMeta,
    SvdResultMeta,
    SvdServiceError,
    Timings,
    WorkerInfo,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)
from tests.unit.schemas.builders import binary_request

DTYPES = [np.dtype("float32"), np.dtype("float64")]


def finite_arrays(shape: st.SearchStrategy[tuple[int, ...]]) -> st.SearchStrategy[Any]:
    return st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(
            dt,
            shape,
            elements=st.floats(allow_nan=False, allow_infinity=False, width=dt.itemsize * 8),
        )
    )


matrices = finite_arrays(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40))


@st.composite
def requests(draw: st.DrawFn) -> tuple[SvdRequestMeta, Any]:
    matrix = draw(matrices)
    compute_uv = draw(st.booleans())
    k = draw(st.none() | st.integers(1, min(matrix.shape)))
    options = SvdOptions(
        compute_uv=compute_uv,
        k=k,
        full_matrices=k is None and draw(st.booleans()),
        dtype=draw(st.sampled_from([None, "float32", "float64"])),
        quality=compute_uv and draw(st.booleans()),
    )
    meta = SvdRequestMeta(
        request_id=draw(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)
        ),
        options=options,
        matrix=MatrixSpec.of(matrix),
        deadline_ms=draw(st.none() | st.integers(0, 2**53)),
        reply_topic=draw(st.sampled_from([None, "my.replies_1-a"])),
        result_encoding=draw(st.sampled_from([None, "json", "binary"])),
        correlation_id=draw(st.none() | st.just("corr 42")),
    )
    return meta, matrix


@settings(max_examples=150, deadline=None)
@given(request=requests(), encoding=st.sampled_from(Encoding))
def test_request_round_trip(request: tuple[SvdRequestMeta, Any], encoding: Encoding) -> None:
    meta, matrix = request
    message = encode_request(meta, matrix, encoding)
    decoded = decode_request(message.value, message.headers)
    assert message.key == meta.request_id.encode()
    assert decoded.meta == meta
    assert decoded.encoding is encoding
    assert decoded.nbytes == len(message.value)
    assert decoded.matrix.dtype == matrix.dtype
    # Bit for bit, including -0.0 and subnormals, in both encodings.
    assert decoded.matrix.tobytes() == matrix.astype(matrix.dtype.newbyteorder("<")).tobytes()
    assert decoded.reply_encoding == (meta.result_encoding or encoding)


def _result_meta(**overrides: Any) -> SvdResultMeta:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "timings": Timings(queue_wait_ms=1.5, compute_ms=20, total_ms=22.25),
        "worker": WorkerInfo(instance_id="svd-0", host="node-a", pid=4242),
    }
    return SvdResultMeta(**(fields | overrides))


@st.composite
def factors(draw: st.DrawFn) -> tuple[Any, Any, Any]:
    m, n = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    r = draw(st.integers(1, min(m, n)))
    dt = draw(st.sampled_from(DTYPES))
    elements = st.floats(allow_nan=False, allow_infinity=False, width=dt.itemsize * 8)
    return tuple(draw(hnp.arrays(dt, shape, elements=elements)) for shape in [(m, r), (r,), (r, n)])


@settings(max_examples=100, deadline=None)
@given(usv=factors(), compute_uv=st.booleans(), encoding=st.sampled_from(Encoding))
def test_result_round_trip(usv: tuple[Any, Any, Any], compute_uv: bool, encoding: Encoding) -> None:
    u, s, vt = usv
    if not compute_uv:
        u = vt = None
    meta = _result_meta(algorithm="gesdd")
    message = encode_result(meta, u, s, vt, encoding)
    decoded = decode_reply(message.value, message.headers)
    assert isinstance(decoded, DecodedResult)
    assert decoded.meta == meta
    assert decoded.encoding is encoding
    for got, sent in ((decoded.u, u), (decoded.s, s), (decoded.vt, vt)):
        if sent is None:
            assert got is None
        else:
            assert got is not None
            assert got.shape == sent.shape and got.dtype == sent.dtype
            assert got.tobytes() == sent.tobytes()


@pytest.mark.parametrize("encoding", list(Encoding))
def test_error_round_trip_is_json_for_both_encodings(encoding: Encoding) -> None:
    error = SvdServiceError(ErrorCode.EXPIRED, "deadline passed", request_id="req-9")
    message = encode_error(error, encoding)
    assert dict(message.headers)["content-type"] == b"application/json"
    assert message.key == b"req-9"
    decoded = decode_reply(message.value, message.headers)
    assert decoded == ErrorResult(
        request_id="req-9", code=ErrorCode.EXPIRED, message="deadline passed", retryable=True
    )


def test_error_without_request_id_has_empty_key_and_null_id() -> None:
    message = encode_error(
        ErrorResult(request_id=None, code=ErrorCode.INVALID_ENCODING, message="x", retryable=False)
    )
    assert message.key == b""
    assert b'"request_id":null' in message.value


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_binary_decode_of_1024x1024_float64_shares_memory_with_the_buffer(wrap: Any) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1024, 1024))
    raw, headers = binary_request(matrix, request_id="big")
    received = wrap(raw)
    decoded = decode_request(received, headers)
    assert np.shares_memory(decoded.matrix, np.frombuffer(received, dtype=np.uint8))
    assert decoded.matrix.shape == (1024, 1024) and decoded.matrix.dtype == np.float64
    assert np.array_equal(decoded.matrix, matrix)
    # Even over a writable buffer the view is read-only: the consumer must not mutate input.
    assert not decoded.matrix.flags.writeable


def test_binary_reply_decode_shares_memory_with_the_buffer() -> None:
    u, s, vt = np.eye(3), np.ones(3), np.eye(3)
    message = encode_result(_result_meta(), u, s, vt, Encoding.BINARY)
    decoded = decode_reply(message.value, message.headers)
    assert isinstance(decoded, DecodedResult) and decoded.u is not None
    whole = np.frombuffer(message.value, dtype=np.uint8)
    assert all(np.shares_memory(a, whole) for a in (decoded.u, decoded.s, decoded.vt))


def test_big_endian_and_non_contiguous_inputs_are_encoded_as_little_endian_c_order() -> None:
    matrix = np.arange(12, dtype=">f8").reshape(3, 4).T  # big-endian, Fortran order
    meta = SvdRequestMeta(request_id="r", matrix=MatrixSpec(shape=[4, 3], dtype="float64"))
    message = encode_request(meta, matrix, Encoding.BINARY)
    assert message.value == np.ascontiguousarray(matrix, dtype="<f8").tobytes()
    assert np.array_equal(decode_request(message.value, message.headers).matrix, matrix)


def test_missing_content_type_means_json() -> None:
    meta = SvdRequestMeta(request_id="r", matrix=MatrixSpec(shape=[1, 1], dtype="float32"))
    message = encode_request(meta, np.ones((1, 1), np.float32), Encoding.JSON)
    decoded = decode_request(message.value, [])
    assert decoded.encoding is Encoding.JSON and decoded.matrix.dtype == np.float32


def test_content_type_parameters_and_case_are_accepted() -> None:
    meta = SvdRequestMeta(request_id="r", matrix=MatrixSpec(shape=[1, 1], dtype="float64"))
    message = encode_request(meta, np.ones((1, 1)), Encoding.JSON)
    headers = [("Content-Type", b"Application/JSON; charset=utf-8")]
    assert decode_request(message.value, headers).encoding is Encoding.JSON


def test_encode_request_refuses_meta_that_does_not_describe_the_matrix() -> None:
    meta = SvdRequestMeta(request_id="r", matrix=MatrixSpec(shape=[2, 2], dtype="float64"))
    with pytest.raises(ValueError, match="does not describe"):
        encode_request(meta, np.ones((2, 3)), Encoding.JSON)


@pytest.mark.parametrize(
    ("matrix", "code"),
    [
        (np.array([[1.0, np.nan]]), ErrorCode.NON_FINITE),
        (np.array([[1, 2]]), ErrorCode.UNSUPPORTED_DTYPE),
        (np.ones(3), ErrorCode.INVALID_SHAPE),
        (np.ones((0, 3)), ErrorCode.INVALID_SHAPE),
    ],
)
def test_encode_request_refuses_what_the_service_would_reject(matrix: Any, code: ErrorCode) -> None:
    # The SDK learns about a bad matrix before sending it; JSON could not even carry a NaN.
    meta = SvdRequestMeta(request_id="r", matrix=MatrixSpec(shape=[1, 2], dtype="float64"))
    with pytest.raises(ContractError) as info:
        encode_request(meta, matrix, Encoding.JSON)
    assert info.value.code is code


def test_reply_topic_and_encoding_defaults() -> None:
    # No reply topic is the service's own results topic, whatever it is configured to be: the
    # decoded request says none rather than a constant that may not be the configured one.
    meta = SvdRequestMeta(request_id="r", matrix=MatrixSpec(shape=[1, 1], dtype="float64"))
    message = encode_request(meta, np.ones((1, 1)), Encoding.BINARY)
    decoded = decode_request(message.value, message.headers)
    assert decoded.meta.reply_topic is None
    assert decoded.reply_encoding is Encoding.BINARY
