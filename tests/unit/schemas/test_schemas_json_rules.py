"""JSON-level rules of the contract: no key twice in an object, no NaN or Infinity in any
spelling, integers written as any integral number, and what schema_version may be."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    ContractError,
    DecodedResult,
    Encoding,
    ErrorCode,
    ErrorResult,
    SvdRequestMeta,
    SvdResultMeta,
    Timings,
    WorkerInfo,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)
from schemas._validation import load_json_object
from tests.unit.schemas.builders import JSON, binary_request, json_request

BINARY = [("content-type", b"application/vnd.svd.binary")]


def rejection(value: bytes, headers: list[tuple[str, bytes]] = JSON) -> ContractError:
    with pytest.raises(ContractError) as info:
        decode_request(value, headers)
    return info.value


# --- duplicate keys --------------------------------------------------------------------------

# Characters that stress the scanner: braces, colons and quotes inside strings, escapes, non-ASCII.
_TRICKY = st.text(alphabet='ab{}[]:,"\\/ é\u2028\x01\n', max_size=4)
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\n": "\\n"}


def _json_string(draw: st.DrawFn, text: str) -> str:
    # Every character as itself (where JSON allows it), as a \u escape, or as a short escape.
    out = []
    for char in text:
        escapes = [f"\\u{ord(char):04x}"]
        if char in _SHORT_ESCAPES:
            escapes.append(_SHORT_ESCAPES[char])
        if char not in '"\\' and char >= " ":
            escapes.append(char)
        out.append(draw(st.sampled_from(escapes)))
    return '"' + "".join(out) + '"'


@st.composite
def documents(draw: st.DrawFn, depth: int = 0) -> tuple[str, bool]:
    """JSON text (objects may repeat a key), and whether some object does."""
    space = draw(st.sampled_from(["", " ", "\n  "]))
    kind = draw(st.sampled_from(["object", "array", "scalar"] if depth < 3 else ["scalar"]))
    if kind == "scalar":
        # orjson reads integers beyond 64 bits as floats; json as ints: stay within.
        integers = st.integers(-(2**63), 2**63 - 1)
        value = draw(st.one_of(integers, st.floats(allow_nan=False, allow_infinity=False)))
        return draw(st.sampled_from([json.dumps(value), _json_string(draw, draw(_TRICKY))])), False
    children = draw(st.lists(documents(depth + 1), max_size=4))
    repeated = any(dup for _, dup in children)
    if kind == "array":
        return "[" + f",{space}".join(text for text, _ in children) + "]", repeated
    keys = draw(
        st.lists(
            st.sampled_from(["a", "b", "{", ":", '"', "\\", "é"]),
            min_size=len(children),
            max_size=len(children),
        )
    )
    members = [
        f"{_json_string(draw, k)}{space}:{space}{text}"
        for k, (text, _) in zip(keys, children, strict=True)
    ]
    return "{" + space + f",{space}".join(members) + "}", repeated or len(set(keys)) < len(keys)


@settings(max_examples=400, deadline=None)
@given(documents())
def test_a_key_twice_in_any_object_is_rejected_and_nothing_else(doc: tuple[str, bool]) -> None:
    text, repeated = doc
    data = ("{" + f'"x":{text}' + "}").encode()
    if repeated:
        with pytest.raises(ContractError) as info:
            load_json_object(data, "value")
        assert info.value.code is ErrorCode.INVALID_ENCODING
    else:
        assert load_json_object(data, "value") == {"x": json.loads(text)}


def test_the_message_names_the_repeated_key() -> None:
    value = json_request()[0].replace(b'"request_id"', b'"request_id":"a","request_id"')
    error = rejection(value)
    assert error.code is ErrorCode.INVALID_ENCODING
    assert error.message == "value: key 'request_id' appears twice in one object"
    meta = orjson.dumps({"schema_version": 1}).replace(b"}", b',"schema_version":1}')
    error = rejection(b"", [*BINARY, ("svd-meta", meta)])
    assert error.message == "svd-meta: key 'schema_version' appears twice in one object"


def test_the_same_key_in_different_objects_is_fine() -> None:
    value = json_request(correlation_id="c")[0].replace(
        b'"options":{}', b'"options":{"dtype":"float32"}'
    )
    assert decode_request(value, JSON).meta.options.dtype == "float32"


def test_replies_with_a_key_twice_are_rejected() -> None:
    error = encode_error(ContractError(ErrorCode.INTERNAL, "m", request_id="r"))
    value = error.value.replace(b'"code"', b'"code":"TIMEOUT","code"')
    with pytest.raises(ContractError) as info:
        decode_reply(value, error.headers)
    assert info.value.code is ErrorCode.INVALID_ENCODING


# --- NaN and Infinity, however spelt ---------------------------------------------------------


@pytest.mark.parametrize(
    "literal",
    ["NaN", "nan", "-nan", "+NaN", "NAN", "Infinity", "-Infinity", "+Infinity", "infinity",
     "inf", "-inf", "+inf", "INF", "-Inf", "nan(0x7ff)", "1.#INF", "-1.#IND", "1.#QNAN", "1e999",
     "-1e400"],
)  # fmt: skip
@pytest.mark.parametrize("where", ["data", "k"])
def test_non_finite_literals_are_non_finite(literal: str, where: str) -> None:
    value = json_request()[0]
    if where == "data":
        value = value.replace(b"6.5", literal.encode())
    else:
        value = value.replace(b'"options":{}', b'"options":{"k": ' + literal.encode() + b"}")
    error = rejection(value)
    assert error.code is ErrorCode.NON_FINITE, error.message


@pytest.mark.parametrize(
    "broken",
    [
        b'"data":[1,2,3,4,5,info]',  # a word, not a number
        b'"data":[1,2,3,4,5,nul]',
        b'"data":[1,2,3,4,5 NaN]',  # a missing comma, and the NaN is only what follows it
        b'"data":[1,2,3,4,5,- inf]',
        b'"data":[1,2,3,4,5,NaNa]',
        b'"data":[1,2,3,4,5,6.5],NaN:1',  # an unquoted key
        b'"data" NaN',  # a missing colon
    ],
)
def test_syntax_errors_near_nan_stay_syntax_errors(broken: bytes) -> None:
    value = json_request()[0].replace(b'"data":[1,2,3,4,5,6.5]', broken)
    assert rejection(value).code is ErrorCode.INVALID_ENCODING


def test_a_nan_in_a_string_does_not_excuse_a_syntax_error() -> None:
    value = json_request(correlation_id="NaN")[0].replace(b'"NaN"', b'"NaN" oops')
    assert rejection(value).code is ErrorCode.INVALID_ENCODING


def test_the_non_finite_message_says_what_and_where() -> None:
    value = json_request()[0].replace(b"6.5", b"-Infinity")
    message = rejection(value).message
    assert "-Infinity" in message and "line 1 column" in message


# --- integers: any JSON number with an integral value ------------------------------------------


def test_integral_floats_are_integers_in_a_json_request() -> None:
    value = orjson.dumps(
        {
            "schema_version": 1.0,
            "request_id": "r",
            "options": {"k": 2e0},
            "created_at_ms": 1.7e12,
            "deadline_ms": 1.8e12,
            "matrix": {"shape": [2.0, 3.0], "dtype": "float64", "data": [1, 2, 3, 4, 5, 6]},
        }
    )
    meta = decode_request(value, JSON).meta
    assert (meta.schema_version, meta.options.k, meta.matrix.shape) == (1, 2, [2, 3])
    assert (meta.created_at_ms, meta.deadline_ms) == (1_700_000_000_000, 1_800_000_000_000)
    assert all(type(n) is int for n in (meta.options.k, *meta.matrix.shape, meta.created_at_ms))


def test_integral_floats_are_integers_in_svd_meta() -> None:
    value, headers = binary_request(schema_version=1.0, options={"k": 1.0})
    meta = orjson.loads(dict(headers)["svd-meta"])
    meta["matrix"]["shape"] = [2.0, 3e0]
    headers = [*BINARY, ("svd-meta", orjson.dumps(meta))]
    decoded = decode_request(value, headers)
    assert decoded.meta.matrix.shape == [2, 3] and decoded.matrix.shape == (2, 3)


def test_integral_floats_are_integers_in_results() -> None:
    meta = SvdResultMeta(
        request_id="r",
        timings=Timings(queue_wait_ms=0, compute_ms=0, total_ms=0),
        worker=WorkerInfo(instance_id="i", host="h", pid=7),
    )
    for encoding in Encoding:
        message = encode_result(meta, np.eye(2), np.ones(2), np.eye(2), encoding)
        headers = dict(message.headers)
        where = "svd-meta" if encoding is Encoding.BINARY else None
        body = orjson.loads(headers[where] if where else message.value)
        body["schema_version"] = 1.0
        body["worker"]["pid"] = 7.0
        for array in body["factors"].values():
            array["shape"] = [float(n) for n in array["shape"]]
            if "offset" in array:
                array["offset"], array["nbytes"] = float(array["offset"]), float(array["nbytes"])
        if where:
            headers[where] = orjson.dumps(body)
            value = message.value
        else:
            value = orjson.dumps(body)
        reply = decode_reply(value, list(headers.items()))
        assert isinstance(reply, DecodedResult) and reply.meta.worker.pid == 7
        assert reply.u is not None and reply.u.shape == (2, 2)


@pytest.mark.parametrize(
    ("field", "number", "code"),
    [
        ("k", 2.5, ErrorCode.INVALID_SCHEMA),
        ("k", "2", ErrorCode.INVALID_SCHEMA),
        ("k", True, ErrorCode.INVALID_SCHEMA),
        ("k", 1e300, ErrorCode.INVALID_SCHEMA),  # more than min(rows, cols)
        ("shape", [1e300, 2], ErrorCode.LIMIT_EXCEEDED),
        ("shape", [2.5, 2], ErrorCode.INVALID_SHAPE),
        ("shape", [True, 2], ErrorCode.INVALID_SHAPE),
        ("deadline_ms", -1.0, ErrorCode.INVALID_SCHEMA),
        ("deadline_ms", 0.5, ErrorCode.INVALID_SCHEMA),
    ],
)
def test_other_numbers_stay_rejected(field: str, number: Any, code: ErrorCode) -> None:
    if field == "shape":  # binary, with no value: the shape is judged before the value is read
        value, headers = binary_request(value=b"", matrix={"shape": number, "dtype": "float64"})
    elif field == "k":
        value, headers = json_request(options={"k": number})
    else:
        value, headers = json_request(**{field: number})
    assert rejection(value, headers).code is code


# --- schema_version ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "code", "message"),
    [
        ("1", ErrorCode.INVALID_SCHEMA, "value: schema_version must be an integer, got a string"),
        (True, ErrorCode.INVALID_SCHEMA, "value: schema_version must be an integer, got a boolean"),
        (None, ErrorCode.INVALID_SCHEMA, "value: schema_version must be an integer, got null"),
        ([1], ErrorCode.INVALID_SCHEMA, "value: schema_version must be an integer, got an array"),
        (
            3.0,
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
            "value: schema_version 3.0 is not supported; supported: [1, 2]",
        ),
    ],
)
def test_schema_version_messages(version: Any, code: ErrorCode, message: str) -> None:
    error = rejection(json_request(schema_version=version)[0])
    assert (error.code, error.message) == (code, message)


@pytest.mark.parametrize("header", [b"1", b"1.0", b" 1 ", b"1e0"])
def test_the_version_header_accepts_one_in_any_integral_spelling(header: bytes) -> None:
    value, headers = json_request()
    assert decode_request(value, [*headers, ("svd-schema-version", header)]).meta.request_id


def test_a_version_header_that_is_no_number_is_invalid() -> None:
    value, headers = json_request()
    error = rejection(value, [*headers, ("svd-schema-version", b"one")])
    assert error.code is ErrorCode.INVALID_SCHEMA
    assert error.message == "svd-schema-version header must be an integer, got 'one'"


def test_error_results_accept_an_integral_schema_version() -> None:
    error = encode_error(ContractError(ErrorCode.INTERNAL, "m", request_id="r"))
    reply = decode_reply(error.value.replace(b'"schema_version":1', b'"schema_version":1.0'), [])
    assert isinstance(reply, ErrorResult) and reply.schema_version == 1


_SAMPLE = json_request(options={"k": 1}, correlation_id="a:b{c}")[0]


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, len(_SAMPLE)),
    st.integers(0, 8),
    st.sampled_from(
        [b"", b"NaN", b"-inf", b"nan(", b"1.#", b"{", b"}", b'"', b":", b"\\", b"\xff"]
    ),
)
def test_damaged_json_fails_only_with_a_contract_error(at: int, cut: int, insert: bytes) -> None:
    data = _SAMPLE[:at] + insert + _SAMPLE[at + cut :]
    try:
        load_json_object(data, "value")
    except ContractError as exc:
        assert exc.code in {
            ErrorCode.INVALID_ENCODING,
            ErrorCode.NON_FINITE,
            ErrorCode.INVALID_SCHEMA,
        }


# --- bounded work per record ------------------------------------------------------------------

_HEAD = b'{"schema_version": 1, "request_id": "many", "pad": '


@pytest.mark.parametrize(
    ("body", "copies"),
    [
        (b"{}", 4000),  # objects
        (b"[]", 4000),  # arrays
        (b'{"a": 1}', 6000),  # keyed objects: the duplicate-key scan pays per key
    ],
)
@pytest.mark.parametrize("scale", [1, 200], ids=["exact-count", "refused-before-parsing"])
def test_messages_of_many_containers_or_keys_are_refused(
    body: bytes, copies: int, scale: int
) -> None:
    # scale 1: under 1 MiB, counted exactly after parsing; scale 200: several MiB, refused by
    # the byte scan before orjson builds millions of objects.
    value = _HEAD + b"[" + b",".join([body] * copies * scale) + b"]}"
    with pytest.raises(ContractError) as info:
        decode_request(value, [("content-type", b"application/json")])
    assert info.value.code == ErrorCode.INVALID_SCHEMA
    assert "a message needs a few dozen" in info.value.message


def test_one_object_with_too_many_keys_is_refused() -> None:
    keys = b",".join(b'"k%d": 1' % i for i in range(5000))
    with pytest.raises(ContractError) as info:
        decode_request(_HEAD + b"{" + keys + b"}}", [("content-type", b"application/json")])
    assert info.value.code == ErrorCode.INVALID_SCHEMA


def test_a_large_valid_json_request_passes_the_byte_scan() -> None:
    matrix = np.random.default_rng(3).standard_normal((400, 400))
    meta = SvdRequestMeta.model_validate(
        {"request_id": "big-ok", "matrix": {"shape": [400, 400], "dtype": "float64"}}
    )
    message = encode_request(meta, matrix, Encoding.JSON)
    assert len(message.value) > 1 << 20
    decoded = decode_request(message.value, message.headers)
    assert np.array_equal(decoded.matrix, matrix)
