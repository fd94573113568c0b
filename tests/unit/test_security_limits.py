"""Size limits apply before allocation: what a message declares costs nothing until checked.

tests/unit/schemas/test_schemas_rejections.py shows the error codes (LIMIT_EXCEEDED is reported
for an empty value, so the value was not read first). Here tracemalloc shows the memory side: a
request declaring billions of elements, a JSON body past the size limit, a reply declaring huge
factors are all refused with a peak of a few kilobytes, on the consumer's and the SDK's paths.
numpy reports its buffers to tracemalloc, so an allocation of the declared size would show.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer import processing
from consumer.admission import price
from consumer.dispatch import limits_from
from consumer.jobs import Refused, WorkerContext
from consumer.settings import ConsumerSettings
from producer_sdk import _wire
from producer_sdk.errors import SvdError
from schemas import codec
from schemas.errors import ContractError, ErrorCode
from schemas.limits import DecodeLimits

BINARY = "application/vnd.svd.binary"
PEAK_LIMIT = 64 * 1024  # bytes: decoding bookkeeping is ~5 KB; any declared size here is GBs
BILLION_SQUARE = [31_623, 31_623]  # 10^9 float64 elements: 8 GB if anything allocated them


def peak_bytes(action: Callable[[], Any]) -> tuple[Any, int]:
    action()  # warm-up: first-call caches (pydantic, orjson) are not what is measured
    tracemalloc.start()
    try:
        outcome = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, peak


def binary_request(
    shape: list[int], value: bytes = b"\0" * 16
) -> tuple[bytes, list[tuple[str, bytes]]]:
    meta = {
        "schema_version": 1,
        "request_id": "req-1",
        "matrix": {"shape": shape, "dtype": "float64"},
    }
    return value, [("content-type", BINARY.encode()), ("svd-meta", orjson.dumps(meta))]


def json_request(shape: list[int], data: list[float]) -> tuple[bytes, list[tuple[str, bytes]]]:
    body = {"schema_version": 1, "request_id": "req-1",
            "matrix": {"shape": shape, "dtype": "float64", "data": data}}  # fmt: skip
    return orjson.dumps(body), [("content-type", b"application/json")]


def rejection(value: bytes, headers: list[tuple[str, bytes]], limits: DecodeLimits) -> ErrorCode:
    try:
        codec.decode_request(value, headers, limits)
    except ContractError as err:
        return err.code
    raise AssertionError("accepted")


# Limits wide enough that the declared shape passes them: then only the check of the value's
# length against the shape stands between the declaration and an allocation.
NO_SHAPE_LIMITS = DecodeLimits(
    max_rows=10**6, max_cols=10**6, max_elements=10**12, max_matrix_bytes=10**13,
    max_result_bytes=10**14,
)  # fmt: skip


@pytest.mark.parametrize(
    ("message", "limits", "code"),
    [
        (binary_request(BILLION_SQUARE), DecodeLimits(), ErrorCode.LIMIT_EXCEEDED),
        (binary_request(BILLION_SQUARE), NO_SHAPE_LIMITS, ErrorCode.SHAPE_MISMATCH),
        (json_request(BILLION_SQUARE, [1.0, 2.0]), DecodeLimits(), ErrorCode.LIMIT_EXCEEDED),
        (json_request(BILLION_SQUARE, [1.0, 2.0]), NO_SHAPE_LIMITS, ErrorCode.SHAPE_MISMATCH),
        (binary_request([2**40, 2**40]), NO_SHAPE_LIMITS, ErrorCode.LIMIT_EXCEEDED),
    ],
    ids=["binary", "binary-past-limits", "json", "json-past-limits", "absurd"],
)
def test_a_declared_huge_matrix_is_refused_without_allocating(
    message: tuple[bytes, list[tuple[str, bytes]]], limits: DecodeLimits, code: ErrorCode
) -> None:
    outcome, peak = peak_bytes(lambda: rejection(*message, limits))
    assert outcome is code
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"


def test_an_oversized_value_is_refused_before_it_is_parsed() -> None:
    # 4 MB of valid JSON: parsing it would allocate a list of 500k floats (tens of MB).
    value, headers = json_request([1000, 500], [1.5] * 500_000)
    limits = DecodeLimits(max_message_bytes=1024 * 1024)
    outcome, peak = peak_bytes(lambda: rejection(value, headers, limits))
    assert outcome is ErrorCode.MESSAGE_TOO_LARGE
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"


def _consumer_record(
    value: bytes, headers: list[tuple[str, bytes]]
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="svd-requests", partition=0, offset=0, timestamp=0, timestamp_type=0, key=None,
        value=value, checksum=None, serialized_key_size=0, serialized_value_size=len(value),
        headers=tuple(headers),
    )  # fmt: skip


def test_the_consumer_prices_a_huge_declaration_without_allocating() -> None:
    # The consumer's own entry point, with its default limits: pricing reads the declaration
    # but allocates nothing for it.
    value, headers = binary_request(BILLION_SQUARE)
    limits = limits_from(ConsumerSettings())
    ticket, peak = peak_bytes(lambda: price(_consumer_record(value, headers), limits))
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"
    # The worker will refuse it before computing (LIMIT_EXCEEDED): the budget and the shared
    # memory it reserves are the record's and an error's, not the declaration's 16 GB of
    # factors, nor the whole result limit.
    assert ticket.cost <= 2 * len(value) + 2 * 4096, ticket.cost


def test_the_worker_refuses_a_huge_declaration_without_allocating() -> None:
    value, headers = binary_request(BILLION_SQUARE)
    limits = limits_from(ConsumerSettings())
    context = WorkerContext(limits, instance_id="i", host="h")
    out = memoryview(bytearray(4096))

    def worker_pass() -> object:
        return processing.answer(
            memoryview(value), list(headers), out,
            timestamp_ms=None, context=context, dispatched_at=time.time(),
        )  # fmt: skip

    outcome, peak = peak_bytes(worker_pass)
    assert isinstance(outcome, Refused) and outcome.code == ErrorCode.LIMIT_EXCEEDED
    assert outcome.request_id == "req-1"
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"


def test_the_sdk_refuses_a_reply_declaring_huge_factors_without_allocating() -> None:
    # A reply is untrusted input to the SDK too: a binary result declaring 10^9-element factors.
    meta = {
        "schema_version": 1, "request_id": "req-1", "status": "ok",
        "timings": {"queue_wait_ms": 0, "compute_ms": 0, "total_ms": 0},
        "worker": {"instance_id": "i", "host": "h", "pid": 1},
        "factors": {
            "s": {"shape": [31_623], "dtype": "float64", "offset": 0, "nbytes": 252_984},
            "u": {"shape": BILLION_SQUARE, "dtype": "float64", "offset": 0, "nbytes": 8 * 31_623**2},
            "vt": {"shape": BILLION_SQUARE, "dtype": "float64", "offset": 0, "nbytes": 8 * 31_623**2},
        },
    }  # fmt: skip
    headers = [("content-type", BINARY.encode()), ("svd-meta", orjson.dumps(meta))]
    outcome, peak = peak_bytes(lambda: _wire.decode_answer(b"\0" * 64, headers, "req-1"))
    assert isinstance(outcome, SvdError)
    assert peak < PEAK_LIMIT, f"peak {peak} bytes"
