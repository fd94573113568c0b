"""Every input the contract rejects, with the error code it must produce."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from schemas import (
    ContractError,
    DecodeLimits,
    Encoding,
    ErrorCode,
    SvdResultMeta,
    Timings,
    WorkerInfo,
    decode_reply,
    decode_request,
    encode_result,
)
from tests.unit.schemas.builders import JSON, binary_request, json_request, nested, request_obj

Message = tuple[bytes, list[tuple[str, bytes]]]


def rejected(message: Message, limits: DecodeLimits | None = None) -> ContractError:
    value, headers = message
    with pytest.raises(ContractError) as info:
        decode_request(value, headers, limits)
    return info.value


def with_bytes_replaced(message: Message, old: bytes, new: bytes) -> Message:
    """The message with old replaced by new, in its value or else in its svd-meta header."""
    value, headers = message
    if old in value:
        return value.replace(old, new, 1), headers
    return value, [(n, v.replace(old, new, 1) if n == "svd-meta" else v) for n, v in headers]


def matrix(shape: Any, data: Any = None, dtype: Any = "float64") -> dict[str, Any]:
    if data is None:
        data = [1.0] * int(np.prod(shape))
    return {"shape": shape, "dtype": dtype, "data": data}


CASES: dict[str, tuple[Message, ErrorCode]] = {
    # --- not decodable
    "bad utf-8": ((b'{"request_id": "\xff\xfe"}', JSON), ErrorCode.INVALID_ENCODING),
    "not json": ((b"hello", JSON), ErrorCode.INVALID_ENCODING),
    "truncated json": ((json_request()[0][:40], JSON), ErrorCode.INVALID_ENCODING),
    "random bytes": ((bytes(range(256)), JSON), ErrorCode.INVALID_ENCODING),
    "unknown content-type": (
        (json_request()[0], [("content-type", b"application/x-npy")]),
        ErrorCode.INVALID_ENCODING,
    ),
    "non-ascii content-type": (
        (json_request()[0], [("content-type", b"\xffjson")]),
        ErrorCode.INVALID_ENCODING,
    ),
    "repeated content-type": (
        (json_request()[0], [*JSON, ("content-type", b"application/vnd.svd.binary")]),
        ErrorCode.INVALID_ENCODING,
    ),
    # --- missing or wrong fields
    "top level not an object": ((b"[1, 2]", JSON), ErrorCode.INVALID_SCHEMA),
    "missing request_id": (
        (orjson.dumps({k: v for k, v in request_obj().items() if k != "request_id"}), JSON),
        ErrorCode.INVALID_SCHEMA,
    ),
    "missing matrix": (
        (orjson.dumps({k: v for k, v in request_obj().items() if k != "matrix"}), JSON),
        ErrorCode.INVALID_SCHEMA,
    ),
    "missing matrix.data": (
        json_request(matrix={"shape": [1, 1], "dtype": "float64"}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "binary without svd-meta": (
        (b"\x00" * 8, [("content-type", b"application/vnd.svd.binary")]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "request_id not a string": (json_request(request_id=7), ErrorCode.INVALID_SCHEMA),
    "request_id with a space": (json_request(request_id="a b"), ErrorCode.INVALID_SCHEMA),
    "request_id too long": (json_request(request_id="x" * 129), ErrorCode.INVALID_SCHEMA),
    "unknown top-level field": (json_request(priority=1), ErrorCode.INVALID_SCHEMA),
    "option of the wrong type": (
        json_request(options={"full_matrices": "yes"}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "k not integral": (json_request(options={"k": 1.5}), ErrorCode.INVALID_SCHEMA),
    "k as a string": (json_request(options={"k": "1"}), ErrorCode.INVALID_SCHEMA),
    "k true": (json_request(options={"k": True}), ErrorCode.INVALID_SCHEMA),
    "k of 1e300": (json_request(options={"k": 1e300}), ErrorCode.INVALID_SCHEMA),
    "k is zero": (json_request(options={"k": 0}), ErrorCode.INVALID_SCHEMA),
    "k above min(rows, cols)": (json_request(options={"k": 3}), ErrorCode.INVALID_SCHEMA),
    "k with full_matrices": (
        json_request(options={"k": 1, "full_matrices": True}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "quality without compute_uv": (
        json_request(options={"quality": True, "compute_uv": False}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "bad reply_topic": (json_request(reply_topic="no spaces allowed"), ErrorCode.INVALID_SCHEMA),
    "bad traceparent": (json_request(traceparent="00-abc"), ErrorCode.INVALID_SCHEMA),
    "negative deadline": (json_request(deadline_ms=-1), ErrorCode.INVALID_SCHEMA),
    "data not an array": (json_request(matrix=matrix([1, 1], data=3.0)), ErrorCode.INVALID_SCHEMA),
    "data with a string": (
        json_request(matrix=matrix([1, 2], data=[1.0, "2"])),
        ErrorCode.INVALID_SCHEMA,
    ),
    "data with a boolean": (
        json_request(matrix=matrix([1, 2], data=[1.0, True])),
        ErrorCode.INVALID_SCHEMA,
    ),
    "data with null": (
        json_request(matrix=matrix([1, 2], data=[1.0, None])),
        ErrorCode.INVALID_SCHEMA,
    ),
    "data nested by rows": (
        json_request(matrix=matrix([2, 2], data=[[1.0, 2.0], [3.0, 4.0]])),
        ErrorCode.INVALID_SCHEMA,
    ),
    "data nested, right length": (
        json_request(matrix=matrix([1, 2], data=[[1.0], [2.0]])),
        ErrorCode.INVALID_SCHEMA,
    ),
    "data in the binary meta": (
        binary_request(matrix={"shape": [2, 3], "dtype": "float64", "data": [0] * 6}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "object with more fields than the limit": (
        json_request(options={f"opt{i}": 0 for i in range(65)}),
        ErrorCode.INVALID_SCHEMA,
    ),
    # --- unknown options
    "unknown option": (json_request(options={"tolerance": 1e-9}), ErrorCode.UNKNOWN_OPTION),
    "unknown option in binary meta": (
        binary_request(options={"method": "jacobi"}),
        ErrorCode.UNKNOWN_OPTION,
    ),
    # --- data length vs shape
    "json data too short": (
        json_request(matrix=matrix([2, 2], data=[1.0, 2.0, 3.0])),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "json data too long": (
        json_request(matrix=matrix([1, 2], data=[1.0, 2.0, 3.0])),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "binary value too short": (
        binary_request(value=bytes(47)),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "binary value too long": (binary_request(value=bytes(49)), ErrorCode.SHAPE_MISMATCH),
    "binary float32 meta with float64 bytes": (
        binary_request(value=bytes(48), matrix={"shape": [2, 3], "dtype": "float32"}),
        ErrorCode.SHAPE_MISMATCH,
    ),
    # --- not 2-D, or empty
    "1-D shape": (json_request(matrix=matrix([4])), ErrorCode.INVALID_SHAPE),
    "3-D shape": (json_request(matrix=matrix([2, 2, 2])), ErrorCode.INVALID_SHAPE),
    "scalar shape": (json_request(matrix=matrix([], data=[1.0])), ErrorCode.INVALID_SHAPE),
    "zero rows": (json_request(matrix=matrix([0, 3], data=[])), ErrorCode.INVALID_SHAPE),
    "zero cols in binary": (
        binary_request(value=b"", matrix={"shape": [3, 0], "dtype": "float64"}),
        ErrorCode.INVALID_SHAPE,
    ),
    "negative dimension": (json_request(matrix=matrix([-1, 2], data=[])), ErrorCode.INVALID_SHAPE),
    "shape not integers": (
        json_request(matrix=matrix([1.5, 2], data=[1.0, 2.0])),
        ErrorCode.INVALID_SHAPE,
    ),
    "shape of strings": (
        json_request(matrix=matrix(["1", "2"], data=[1.0, 2.0])),
        ErrorCode.INVALID_SHAPE,
    ),
    # --- a key twice in one object (orjson would keep the last one silently)
    "duplicate top-level key": (
        with_bytes_replaced(json_request(), b'"request_id"', b'"request_id":"other","request_id"'),
        ErrorCode.INVALID_ENCODING,
    ),
    "duplicate key in options": (
        with_bytes_replaced(json_request(), b'"options":{}', b'"options":{"k":1,"k":2}'),
        ErrorCode.INVALID_ENCODING,
    ),
    "duplicate matrix": (
        with_bytes_replaced(
            json_request(),
            b'"matrix"',
            b'"matrix":{"shape":[1,1],"dtype":"float64","data":[1]},"matrix"',
        ),
        ErrorCode.INVALID_ENCODING,
    ),
    "duplicate key spelt with an escape": (
        with_bytes_replaced(
            json_request(), b'"request_id"', b'"request_\\u0069d":"x","request_id"'
        ),
        ErrorCode.INVALID_ENCODING,
    ),
    "duplicate key in svd-meta": (
        with_bytes_replaced(binary_request(), b'"dtype"', b'"dtype":"float32","dtype"'),
        ErrorCode.INVALID_ENCODING,
    ),
    # --- NaN or Inf in any spelling
    "json nan token": (
        with_bytes_replaced(json_request(), b"6.5", b"nan"),
        ErrorCode.NON_FINITE,
    ),
    "json -inf token": (
        with_bytes_replaced(json_request(), b"6.5", b"-inf"),
        ErrorCode.NON_FINITE,
    ),
    "json NaN for k": (
        with_bytes_replaced(json_request(), b'"options":{}', b'"options":{"k":NaN}'),
        ErrorCode.NON_FINITE,
    ),
    "json word that is no number": (
        with_bytes_replaced(json_request(), b"6.5", b"info"),
        ErrorCode.INVALID_ENCODING,
    ),
    "json NaN after a missing comma": (
        with_bytes_replaced(json_request(), b"5,6.5", b"5 NaN"),
        ErrorCode.INVALID_ENCODING,
    ),
    "binary NaN": (
        binary_request(np.array([[1.0, np.nan]])),
        ErrorCode.NON_FINITE,
    ),
    "binary -inf float32": (
        binary_request(np.array([[1.0], [-np.inf]], dtype=np.float32)),
        ErrorCode.NON_FINITE,
    ),
    "json NaN token": (
        (
            b'{"schema_version":1,"request_id":"r","matrix":{"shape":[1,2],"dtype":"float64",'
            b'"data":[1.0,NaN]}}',
            JSON,
        ),
        ErrorCode.NON_FINITE,
    ),
    "json Infinity token": (
        (
            b'{"schema_version":1,"request_id":"r","matrix":{"shape":[1,1],"dtype":"float64",'
            b'"data":[-Infinity]}}',
            JSON,
        ),
        ErrorCode.NON_FINITE,
    ),
    "json number overflowing float64": (
        (
            b'{"schema_version":1,"request_id":"r","matrix":{"shape":[1,1],"dtype":"float64",'
            b'"data":[1e999]}}',
            JSON,
        ),
        ErrorCode.NON_FINITE,
    ),
    "json number overflowing float32": (
        json_request(matrix=matrix([1, 2], data=[1.0, 1e39], dtype="float32")),
        ErrorCode.NON_FINITE,
    ),
    # --- unsupported dtype
    "matrix dtype int32": (
        json_request(matrix=matrix([1, 1], dtype="int32")),
        ErrorCode.UNSUPPORTED_DTYPE,
    ),
    "matrix dtype float16 in binary": (
        binary_request(value=bytes(4), matrix={"shape": [1, 2], "dtype": "float16"}),
        ErrorCode.UNSUPPORTED_DTYPE,
    ),
    "numpy-style dtype": (
        json_request(matrix=matrix([1, 1], dtype="<f8")),
        ErrorCode.UNSUPPORTED_DTYPE,
    ),
    "options dtype complex128": (
        json_request(options={"dtype": "complex128"}),
        ErrorCode.UNSUPPORTED_DTYPE,
    ),
    # --- schema version
    "schema_version 3": (json_request(schema_version=3), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
    "schema_version 0": (json_request(schema_version=0), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
    "schema_version 3.0": (json_request(schema_version=3.0), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
    "schema_version 1.5": (json_request(schema_version=1.5), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
    "schema_version 1e300": (
        json_request(schema_version=1e300),
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
    ),
    "schema_version as a string": (json_request(schema_version="1"), ErrorCode.INVALID_SCHEMA),
    "schema_version true": (json_request(schema_version=True), ErrorCode.INVALID_SCHEMA),
    "schema_version null": (json_request(schema_version=None), ErrorCode.INVALID_SCHEMA),
    "schema_version in an array": (json_request(schema_version=[1]), ErrorCode.INVALID_SCHEMA),
    "schema_version missing": (
        (orjson.dumps({k: v for k, v in request_obj().items() if k != "schema_version"}), JSON),
        ErrorCode.INVALID_SCHEMA,
    ),
    "schema-version header 3": (
        (json_request()[0], [*JSON, ("svd-schema-version", b"3")]),
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
    ),
    "schema-version header of 5000 digits": (
        (json_request()[0], [*JSON, ("svd-schema-version", b"1" * 5000)]),
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
    ),
    "schema-version header 3.0": (
        (json_request()[0], [*JSON, ("svd-schema-version", b"3.0")]),
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
    ),
    "schema-version header not a number": (
        (json_request()[0], [*JSON, ("svd-schema-version", b"v1")]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "schema-version header empty": (
        (json_request()[0], [*JSON, ("svd-schema-version", b"")]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "binary meta schema_version 3": (
        binary_request(schema_version=3),
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
    ),
    # --- JSON too deep
    "json nested past the limit": (
        json_request(correlation_id=nested(16)),
        ErrorCode.JSON_TOO_DEEP,
    ),
    "json nested past the parser's own limit": (
        (b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}", JSON),
        ErrorCode.JSON_TOO_DEEP,
    ),
    "json nested inside data": (
        json_request(matrix=matrix([1, 1], data=[nested(30)])),
        ErrorCode.INVALID_SCHEMA,
    ),
    "svd-meta nested past the limit": (
        binary_request(tracestate={"a": nested(20)}),
        ErrorCode.JSON_TOO_DEEP,
    ),
}


@pytest.mark.parametrize(("message", "code"), list(CASES.values()), ids=list(CASES))
def test_rejected_with_code(message: Message, code: ErrorCode) -> None:
    error = rejected(message)
    assert error.code is code, error.message
    assert error.retryable is False
    assert error.message


def test_depth_counts_from_the_top_level_object() -> None:
    # {"correlation_id": <depth d>} is d + 1 deep; 16 is allowed, 17 is not.
    assert rejected(json_request(correlation_id=nested(15))).code is ErrorCode.INVALID_SCHEMA
    assert rejected(json_request(correlation_id=nested(16))).code is ErrorCode.JSON_TOO_DEEP


def test_errors_after_the_meta_was_read_carry_the_request_id() -> None:
    error = rejected(binary_request(np.array([[np.inf]]), request_id="known-1"))
    assert (error.code, error.request_id) == (ErrorCode.NON_FINITE, "known-1")
    error = rejected(json_request(request_id="known-2", options={"nope": 1}))
    assert (error.code, error.request_id) == (ErrorCode.UNKNOWN_OPTION, "known-2")


def test_messages_name_the_field() -> None:
    assert "options.tolerance" in rejected(json_request(options={"tolerance": 1})).message
    assert "matrix.shape" in rejected(json_request(matrix=matrix([4]))).message
    assert "[0, 1]" in rejected(binary_request(np.array([[1.0, np.nan]]))).message


# --- limits, checked before anything is allocated


def huge_binary(shape: list[int], dtype: str = "float64", **options: Any) -> Message:
    # The value is empty: if the decoder looked at it before the limits it would report
    # SHAPE_MISMATCH (or try to allocate), not LIMIT_EXCEEDED.
    return binary_request(value=b"", matrix={"shape": shape, "dtype": dtype}, options=options)


LIMIT_CASES: dict[str, tuple[Message, DecodeLimits]] = {
    "rows": (huge_binary([16_385, 1]), DecodeLimits()),
    "cols": (huge_binary([1, 16_385]), DecodeLimits()),
    "elements": (huge_binary([4097, 4096]), DecodeLimits()),
    "matrix bytes": (huge_binary([100, 100]), DecodeLimits(max_matrix_bytes=79_999)),
    "result bytes (full_matrices U is m x m)": (
        huge_binary([16_384, 2], full_matrices=True),
        DecodeLimits(),
    ),
    "absurd shape": (huge_binary([2**62, 2**62]), DecodeLimits()),
    "json shape beyond limits": (
        json_request(matrix=matrix([20_000, 1], data=[1.0])),
        DecodeLimits(),
    ),
}


@pytest.mark.parametrize(("message", "limits"), list(LIMIT_CASES.values()), ids=list(LIMIT_CASES))
def test_limit_exceeded_before_the_value_is_read(message: Message, limits: DecodeLimits) -> None:
    assert rejected(message, limits).code is ErrorCode.LIMIT_EXCEEDED


def test_limits_allow_what_they_name() -> None:
    value, headers = binary_request(np.ones((100, 100)))
    decode_request(value, headers, DecodeLimits(max_matrix_bytes=80_000, max_rows=100))


def test_message_too_large() -> None:
    value, headers = json_request()
    limits = DecodeLimits(max_message_bytes=len(value) - 1)
    assert rejected((value, headers), limits).code is ErrorCode.MESSAGE_TOO_LARGE
    decode_request(value, headers, DecodeLimits(max_message_bytes=len(value)))


def test_meta_header_too_large() -> None:
    value, headers = binary_request()
    meta_size = len(dict(headers)["svd-meta"])
    limits = DecodeLimits(max_header_bytes=meta_size - 1)
    assert rejected((value, headers), limits).code is ErrorCode.MESSAGE_TOO_LARGE


def test_decode_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        DecodeLimits(max_rows=0)


# --- replies are untrusted input to the SDK too


def _binary_reply(drop: str | None = None, **factor_overrides: Any) -> Message:
    meta = SvdResultMeta(
        request_id="r",
        timings=Timings(queue_wait_ms=0, compute_ms=0, total_ms=0),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )
    message = encode_result(meta, np.eye(2), np.ones(2), np.eye(2), Encoding.BINARY)
    headers = dict(message.headers)
    body = orjson.loads(headers["svd-meta"])
    for name, changes in factor_overrides.items():
        body["factors"][name].update(changes)
    value = message.value
    if drop is not None:
        value = value[: body["factors"].pop(drop)["offset"]]
    headers["svd-meta"] = orjson.dumps(body)
    return value, list(headers.items())


REPLY_CASES: dict[str, tuple[Message, ErrorCode]] = {
    "array past the end": (_binary_reply(vt={"offset": 64}), ErrorCode.SHAPE_MISMATCH),
    "overlapping arrays": (_binary_reply(s={"offset": 16}), ErrorCode.SHAPE_MISMATCH),
    "nbytes not matching shape": (_binary_reply(s={"nbytes": 8}), ErrorCode.SHAPE_MISMATCH),
    "u without vt": (_binary_reply(drop="vt"), ErrorCode.INVALID_SHAPE),
    "s given as 2-D": (_binary_reply(s={"shape": [1, 2]}), ErrorCode.INVALID_SHAPE),
    "unknown status": (
        (b'{"schema_version":1,"request_id":"r","status":"maybe"}', JSON),
        ErrorCode.INVALID_SCHEMA,
    ),
    "error with an unknown code": (
        (
            b'{"schema_version":1,"request_id":"r","status":"error","code":"OOPS","message":"m",'
            b'"retryable":false}',
            JSON,
        ),
        ErrorCode.INVALID_SCHEMA,
    ),
    "json result missing data": (
        (
            b'{"schema_version":1,"request_id":"r","status":"ok","timings":{"queue_wait_ms":0,'
            b'"compute_ms":0,"total_ms":0},"worker":{"instance_id":"i","host":"h","pid":1},'
            b'"factors":{"s":{"shape":[1],"dtype":"float64"}}}',
            JSON,
        ),
        ErrorCode.INVALID_SCHEMA,
    ),
    "reply of version 3": (
        (b'{"schema_version":3,"request_id":"r","status":"ok"}', JSON),
        ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
    ),
}


@pytest.mark.parametrize(("message", "code"), list(REPLY_CASES.values()), ids=list(REPLY_CASES))
def test_reply_rejected_with_code(message: Message, code: ErrorCode) -> None:
    value, headers = message
    with pytest.raises(ContractError) as info:
        decode_reply(value, headers)
    assert info.value.code is code, info.value.message
