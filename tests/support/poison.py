"""Poison records: inputs a producer should never send, each with the answer the service owes it.

Built by hand (orjson, raw bytes), not with the codec, so a bad record is exactly as bad as it
says. A record is keyed ``poison-<name>`` unless it is meant to have no request id at all: a key
that is a valid request id names the record when nothing in it can be read (wire format, "Who
gets an answer"), so those records go without a key. tests/adversarial/ has the full corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from schemas.errors import ErrorCode

JSON = ("content-type", b"application/json")
BINARY = ("content-type", b"application/vnd.svd.binary")


@dataclass(frozen=True)
class Poison:
    name: str
    value: bytes | None
    headers: list[tuple[str, bytes]]
    code: ErrorCode  # the error code it must be answered with
    request_id: str | None  # the id the error result must carry; None: dead letter only
    keyed: bool = True  # False: no key, so that only the record itself can name it
    truncated: bool = False  # its dead letter is cut down (larger than the service's limit)

    @property
    def key(self) -> bytes | None:
        return f"poison-{self.name}".encode() if self.keyed else None

    def record(self) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        return self.key, self.value, self.headers


def _request(request_id: str, **overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema_version": 1,
        "request_id": request_id,
        "matrix": {"shape": [2, 3], "dtype": "float64", "data": [1, 2, 3, 4, 5, 6.5]},
    }
    obj.update(overrides)
    return obj


def _json(request_id: str, **overrides: Any) -> bytes:
    return orjson.dumps(_request(request_id, **overrides))


def _binary_headers(
    request_id: str, shape: list[int], dtype: str = "float64"
) -> list[tuple[str, bytes]]:
    meta = {
        "schema_version": 1,
        "request_id": request_id,
        "matrix": {"shape": shape, "dtype": dtype},
    }
    return [BINARY, ("svd-meta", orjson.dumps(meta))]


def _nested(depth: int) -> bytes:
    return b"[" * (depth - 1) + b"[]" + b"]" * (depth - 1)


def poison_records(rng: np.random.Generator, *, oversize_bytes: int) -> list[Poison]:
    """One of each kind of bad input; ``oversize_bytes`` is above the service's message limit."""
    good_json = _json("truncated-json", matrix={"shape": [8, 8], "dtype": "float64",
                                                "data": rng.standard_normal(64).tolist()})  # fmt: skip
    square = rng.standard_normal((4, 4))
    nan_binary = square.copy()
    nan_binary[1, 2] = np.nan
    inf_binary = square.copy()
    inf_binary[3, 0] = -np.inf
    E = ErrorCode
    return [
        # Truncated and random bytes.
        Poison("truncated-json", good_json[: len(good_json) // 2], [JSON], E.INVALID_ENCODING,
               "truncated-json"),
        Poison("truncated-binary", square.astype("<f8").tobytes()[:100],
               _binary_headers("truncated-binary", [4, 4]), E.SHAPE_MISMATCH, "truncated-binary"),
        Poison("random-bytes-json", rng.bytes(4096), [JSON], E.INVALID_ENCODING, None, keyed=False),
        Poison("random-bytes-json-keyed", rng.bytes(4096), [JSON], E.INVALID_ENCODING,
               "poison-random-bytes-json-keyed"),  # nothing readable but the key
        Poison("random-bytes-binary", rng.bytes(4096), [BINARY], E.INVALID_SCHEMA, None,
               keyed=False),
        Poison("random-bytes-no-headers", rng.bytes(512), [], E.INVALID_ENCODING, None,
               keyed=False),
        Poison("empty-value", b"", [JSON], E.INVALID_ENCODING, "poison-empty-value"),
        # A tombstone has a key: Kafka clients refuse a record with neither key nor value.
        Poison("tombstone", None, [], E.INVALID_ENCODING, "poison-tombstone"),
        Poison("not-utf8", b'{"schema_version": 1, "request_id": "not-utf8", "x": "\xff\xfe"}',
               [JSON], E.INVALID_ENCODING, "not-utf8"),
        # Valid JSON, wrong schema.
        Poison("wrong-schema", _json("wrong-schema", matrix="a matrix, honestly"), [JSON],
               E.INVALID_SCHEMA, "wrong-schema"),
        Poison("unknown-field", _json("unknown-field", colour="red"), [JSON], E.INVALID_SCHEMA,
               "unknown-field"),
        Poison("json-array", b"[1, 2, 3]", [JSON], E.INVALID_SCHEMA, "poison-json-array"),
        Poison("no-request-id", orjson.dumps({"schema_version": 1, "hello": "world"}), [JSON],
               E.INVALID_SCHEMA, None, keyed=False),
        Poison("binary-without-meta", square.astype("<f8").tobytes(), [BINARY], E.INVALID_SCHEMA,
               "poison-binary-without-meta"),
        Poison("duplicate-content-type", _json("duplicate-content-type"), [JSON, BINARY],
               E.INVALID_ENCODING, "duplicate-content-type"),
        Poison("unknown-content-type", _json("unknown-content-type"),
               [("content-type", b"text/csv")], E.INVALID_ENCODING, "unknown-content-type"),
        # NaN and Inf, in both encodings.
        Poison("nan-literal-json",
               b'{"schema_version": 1, "request_id": "nan-literal-json", "matrix": {"shape": [1, 2],'
               b' "dtype": "float64", "data": [1.0, NaN]}}', [JSON], E.NON_FINITE, "nan-literal-json"),
        Poison("overflow-json", _json("overflow-json", matrix={"shape": [1, 2], "dtype": "float32",
                                                               "data": [1.0, 1e39]}),
               [JSON], E.NON_FINITE, "overflow-json"),
        Poison("nan-binary", nan_binary.astype("<f8").tobytes(), _binary_headers("nan-binary", [4, 4]),
               E.NON_FINITE, "nan-binary"),
        Poison("inf-binary", inf_binary.astype("<f8").tobytes(), _binary_headers("inf-binary", [4, 4]),
               E.NON_FINITE, "inf-binary"),
        # Shape and data that disagree.
        Poison("short-data-json", _json("short-data-json", matrix={"shape": [2, 3], "dtype": "float64",
                                                                   "data": [1, 2, 3, 4, 5]}),
               [JSON], E.SHAPE_MISMATCH, "short-data-json"),
        Poison("long-value-binary", square.astype("<f8").tobytes() + b"\0" * 8,
               _binary_headers("long-value-binary", [4, 4]), E.SHAPE_MISMATCH, "long-value-binary"),
        # A billion elements declared, a few bytes sent: refused before anything is allocated.
        Poison("billion-json", _json("billion-json", matrix={"shape": [100_000, 10_000],
                                                             "dtype": "float64", "data": [1.0]}),
               [JSON], E.LIMIT_EXCEEDED, "billion-json"),
        Poison("billion-binary", b"\0" * 8, _binary_headers("billion-binary", [31_623, 31_623]),
               E.LIMIT_EXCEEDED, "billion-binary"),
        Poison("billion-square-cap", b"\0" * 8, _binary_headers("billion-square-cap", [10_000, 10_000]),
               E.LIMIT_EXCEEDED, "billion-square-cap"),
        # Larger than the service's message limit (the broker takes it: its own limit is higher).
        # Its dead letter is cut down: the service assumes the DLQ takes only its own limit.
        Poison("oversize-binary", rng.bytes(oversize_bytes),
               _binary_headers("oversize-binary", [1, oversize_bytes // 8]), E.MESSAGE_TOO_LARGE,
               "oversize-binary", truncated=True),
        # Too large to parse, but its id is in the first 64 KiB of the header.
        Poison("oversize-svd-meta", b"\0" * 8,
               [BINARY, ("svd-meta", b'{"request_id": "oversize-svd-meta", "pad": "'
                         + b"x" * (100 * 1024) + b'"}')], E.MESSAGE_TOO_LARGE, "oversize-svd-meta",
               keyed=False),
        # Nesting: above the service's limit, and far above the parser's own.
        Poison("deep-json", _json("deep-json", options={"deep": orjson.loads(_nested(40))}), [JSON],
               E.JSON_TOO_DEEP, "deep-json"),
        Poison("very-deep-json",
               b'{"request_id": "very-deep-json", "schema_version": 1, "x": ' + _nested(200_000) + b"}",
               [JSON], E.JSON_TOO_DEEP, "very-deep-json"),
        # Versions and dtypes the service does not support.
        Poison("schema-version-99", _json("schema-version-99", schema_version=99), [JSON],
               E.UNSUPPORTED_SCHEMA_VERSION, "schema-version-99"),
        Poison("schema-version-header", _json("schema-version-header"),
               [JSON, ("svd-schema-version", b"7")], E.UNSUPPORTED_SCHEMA_VERSION,
               "schema-version-header"),
        Poison("dtype-int64", _json("dtype-int64", matrix={"shape": [2, 2], "dtype": "int64",
                                                           "data": [1, 2, 3, 4]}),
               [JSON], E.UNSUPPORTED_DTYPE, "dtype-int64"),
        Poison("dtype-complex", _json("dtype-complex", matrix={"shape": [1, 1], "dtype": "complex128",
                                                               "data": [1]}),
               [JSON], E.UNSUPPORTED_DTYPE, "dtype-complex"),
        Poison("dtype-float16-binary", b"\0" * 8, _binary_headers("dtype-float16-binary", [2, 2], "float16"),
               E.UNSUPPORTED_DTYPE, "dtype-float16-binary"),
        Poison("option-dtype-int", _json("option-dtype-int", options={"dtype": "int8"}), [JSON],
               E.UNSUPPORTED_DTYPE, "option-dtype-int"),
    ]  # fmt: skip
