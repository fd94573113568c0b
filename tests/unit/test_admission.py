"""Admission (consumer/admission.py): a record priced in O(1), never decoded on the event loop.

A binary request's answer room is exact, read from its svd-meta header; a JSON request's is
estimated from its size (the worker asks for more when it finds it needs it: test_processing.py);
whatever the headers hold, pricing never raises; an unreadable record costs nothing; and a
request charged again for more room moves the in-flight budget by the difference.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import UnsupportedCodecError
from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from consumer import processing
from consumer.admission import TEST_FAULT_HEADER, Ticket, price
from consumer.flow import Budget, InFlight
from consumer.jobs import Answered, NeedsRoom, WorkerContext
from consumer.unreadable import unreadable_record
from schemas import codec
from schemas.limits import DecodeLimits
from tests.support.kafka_io import make_request

LIMITS = DecodeLimits()
CONTEXT = WorkerContext(LIMITS, instance_id="test", host="here")
TP = TopicPartition("svd-requests", 3)
BINARY = b"application/vnd.svd.binary"
SMALLEST_ROOM = 4096  # what an answer whose size the header does not tell is given


def _record(
    value: bytes, headers: list[tuple[str, bytes | None]], offset: int = 0
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=TP.topic, partition=TP.partition, offset=offset, timestamp=0, timestamp_type=0,
        key=None, value=value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(value), headers=tuple(headers),
    )  # fmt: skip


def _message_record(message: codec.EncodedMessage) -> ConsumerRecord[bytes, bytes]:
    return _record(message.value, list(message.headers))


def _worker_pass(record: ConsumerRecord[bytes, bytes], room: int) -> Any:
    """The worker's pass over ``record`` with ``room`` bytes for the answer."""
    out = memoryview(bytearray(room))
    return processing.answer(
        memoryview(record.value), list(record.headers), out,
        timestamp_ms=None, context=CONTEXT, dispatched_at=time.time(),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "dtype", "fields"),
    [
        ((80, 60), np.float64, {}),
        ((60, 80), np.float32, {}),
        ((80, 60), np.float64, {"options": {"k": 5}}),
        ((40, 30), np.float64, {"options": {"full_matrices": True}}),
        ((80, 60), np.float64, {"options": {"dtype": "float32"}}),
        ((80, 60), np.float32, {"options": {"dtype": "float64"}}),
        ((80, 60), np.float64, {"options": {"compute_uv": False}}),  # small: the smallest room
        ((40, 30), np.float64, {"result_encoding": "json"}),  # JSON's worst case
    ],
    ids=["tall", "wide-f32", "k", "full", "as-f32", "as-f64", "values-only", "json-answer"],
)
def test_a_binary_request_is_priced_exactly_from_its_header(
    shape: tuple[int, int], dtype: Any, fields: dict[str, Any]
) -> None:
    matrix = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    request_id, message = make_request(matrix, **fields)
    record = _message_record(message)
    ticket = price(record, LIMITS)
    decoded = codec.decode_request(message.value, message.headers, LIMITS)
    room = codec.result_room(decoded.meta, decoded.reply_encoding)
    assert ticket.answer_bytes == max(room, SMALLEST_ROOM)
    assert ticket.cost == 2 * len(message.value) + 2 * ticket.answer_bytes
    assert ticket.request_id == request_id  # for the logs, before any worker read it
    assert ticket.unreadable is None and ticket.fault is None
    # The worker never asks a binary request for more room; a binary answer fills it exactly.
    outcome = _worker_pass(record, ticket.answer_bytes)
    assert isinstance(outcome, Answered)
    if decoded.reply_encoding is codec.Encoding.BINARY:
        assert outcome.value_bytes == room
    else:
        assert outcome.value_bytes <= room


def test_a_json_request_is_estimated_from_its_size() -> None:
    matrix = np.random.default_rng(1).standard_normal((32, 32))
    _, message = make_request(matrix, encoding=codec.Encoding.JSON)
    record = _message_record(message)
    ticket = price(record, LIMITS)
    assert ticket.answer_bytes == 3 * len(message.value)
    assert ticket.cost == 2 * len(message.value) + 2 * ticket.answer_bytes
    assert ticket.request_id is None  # the value is not parsed on the event loop
    # What the SDK sends (a square matrix of full-precision numbers) fits its estimate.
    outcome = _worker_pass(record, ticket.answer_bytes)
    assert isinstance(outcome, Answered)
    # Short or tiny values get the smallest room; huge ones no more than the result limit.
    assert price(_record(b"{}", []), LIMITS).answer_bytes == SMALLEST_ROOM
    limits = DecodeLimits(max_result_bytes=10_000)
    assert price(_record(b" " * 5_000, []), limits).answer_bytes == 10_000


@pytest.mark.parametrize("value", [b"", b"{", b"\xff\xfe", b"x" * 100_000])
def test_an_undecodable_record_is_priced_from_its_size(value: bytes) -> None:
    ticket = price(_record(value, []), LIMITS)
    assert ticket.answer_bytes == max(3 * len(value), SMALLEST_ROOM)
    assert ticket.cost == 2 * len(value) + 2 * ticket.answer_bytes


def _meta(obj: Any) -> list[tuple[str, bytes | None]]:
    raw = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return [("content-type", BINARY), ("svd-meta", raw)]


def _square(**matrix: Any) -> dict[str, Any]:
    return {"schema_version": 1, "request_id": "r-1",
            "matrix": {"shape": [50, 50], "dtype": "float64", **matrix}}  # fmt: skip


GARBAGE_HEADERS: list[list[tuple[str, bytes | None]]] = [
    [("content-type", BINARY)],  # no svd-meta
    [("content-type", BINARY), ("svd-meta", None)],
    [("content-type", BINARY), ("svd-meta", b"")],
    [("content-type", BINARY), ("svd-meta", b"{not json")],
    [("content-type", BINARY), ("svd-meta", b"[" * 5000)],  # nested past orjson's limit
    [("content-type", BINARY), ("svd-meta", b"x" * (LIMITS.max_header_bytes + 1))],
    [("content-type", BINARY), ("svd-meta", b"{}"), ("SVD-META", b"{}")],  # repeated
    [("content-type", b"\xff\xfe"), ("svd-meta", orjson.dumps(_square()))],  # not ASCII
    [("content-type", b"text/plain"), ("svd-meta", orjson.dumps(_square()))],
    [("content-type", None), ("svd-meta", orjson.dumps(_square()))],
    [("content-type", BINARY), ("content-type", BINARY)],
    _meta([1, 2]),
    _meta("a string"),
    _meta(None),
    _meta({"matrix": [50, 50]}),
    _meta({"matrix": {"shape": "50x50"}}),
    _meta({"matrix": {"shape": [50]}}),
    _meta({"matrix": {"shape": [50, 50, 50]}}),
    _meta({"matrix": {"shape": [0, 50]}}),
    _meta({"matrix": {"shape": [-50, 50]}}),
    _meta({"matrix": {"shape": [True, 50]}}),
    _meta({"matrix": {"shape": [50.0, 50]}}),
    _meta({"matrix": {"shape": ["50", "50"]}}),
    _meta({"matrix": {"shape": [2**31, 2**31]}}),  # any size: bounded by the result limit
    _meta(b'{"matrix": {"shape": [%d, %d]}}' % (2**70, 2**70)),  # past 64 bits
    _meta({**_square(), "options": [1]}),
    _meta({**_square(), "options": {"k": -3}}),
    _meta({**_square(), "options": {"k": "3"}}),
    _meta({**_square(), "options": {"k": True}}),
    _meta({**_square(), "options": {"k": 2**63 - 1}}),
    _meta({**_square(), "options": {"dtype": ["float32"]}}),
    _meta({**_square(), "result_encoding": {"json": 1}}),
    _meta({**_square(), "request_id": {"not": "a string"}}),
    _meta({**_square(), "request_id": "bad id with spaces " * 20}),
    [("svd-test-fault", None)],
    [("svd-test-fault", b"\xff" * 65)],  # over its size limit
    [("svd-test-fault", b"kill"), ("svd-test-fault", b"hang")],
]


@pytest.mark.parametrize("headers", GARBAGE_HEADERS)
def test_garbage_headers_never_raise(headers: list[tuple[str, bytes | None]]) -> None:
    ticket = price(_record(b"\0" * 16, headers), LIMITS, test_faults=True)
    _check_sane(ticket, LIMITS)
    assert ticket.request_id in (None, "r-1")


@given(
    value=st.binary(max_size=256),
    headers=st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from(["content-type", "svd-meta", TEST_FAULT_HEADER, "Content-Type"]),
                st.text(max_size=12),
            ),
            st.one_of(
                st.none(),
                st.binary(max_size=64),
                st.sampled_from([BINARY, orjson.dumps(_square()), b"{}", b"kill"]),
                st.recursive(
                    st.none()
                    | st.booleans()
                    | st.integers(-(2**63), 2**63 - 1)
                    | st.floats()
                    | st.text(max_size=8),
                    lambda children: (
                        st.lists(children, max_size=3)
                        | st.dictionaries(
                            st.sampled_from(
                                ["matrix", "shape", "options", "k", "dtype", "request_id"]
                            ),
                            children,
                            max_size=4,
                        )
                    ),
                    max_leaves=12,
                ).map(lambda obj: orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)),
            ),
        ),
        max_size=6,
    ),
    test_faults=st.booleans(),
)
def test_any_record_is_priced_without_raising(
    value: bytes, headers: list[tuple[str, bytes | None]], test_faults: bool
) -> None:
    limits = DecodeLimits(max_result_bytes=1 << 20)
    _check_sane(price(_record(value, headers), limits, test_faults=test_faults), limits)


def _check_sane(ticket: Ticket, limits: DecodeLimits) -> None:
    assert SMALLEST_ROOM <= ticket.answer_bytes <= max(limits.max_result_bytes, SMALLEST_ROOM)
    assert ticket.cost == 2 * ticket.value_bytes + 2 * ticket.answer_bytes
    assert ticket.unreadable is None


def test_a_test_fault_is_read_only_when_test_faults_are_on() -> None:
    _, message = make_request(np.ones((4, 4)))
    headers = [*message.headers, (TEST_FAULT_HEADER, b"kill_once")]
    record = _record(message.value, headers)
    assert price(record, LIMITS, test_faults=True).fault == "kill_once"
    assert price(record, LIMITS).fault is None


def test_an_unreadable_record_costs_nothing() -> None:
    record = unreadable_record(TP, 7, UnsupportedCodecError("no zstd"))
    ticket = price(record, LIMITS, test_faults=True)
    assert ticket.cost == 0 and ticket.answer_bytes == 0
    assert ticket.unreadable is not None and "no zstd" in ticket.unreadable
    assert ticket.request_id is None and ticket.fault is None
    assert ticket.context == {"request_id": None, "topic": TP.topic, "partition": 3, "offset": 7}


async def test_reprice_charges_the_budget_for_the_room_the_worker_found() -> None:
    inflight = InFlight(Budget(max_requests=10, max_bytes=1 << 30))
    other = price(_record(b"{}", []), LIMITS)
    ticket = price(_record(b"[1.0, 2.0]" * 100, []), LIMITS)
    for admitted in (other, ticket):
        inflight.admit(admitted.cost)
    before = ticket.cost
    ticket.reprice(1_000_000, inflight)
    assert ticket.answer_bytes == 1_000_000
    assert ticket.cost == 2 * ticket.value_bytes + 2 * 1_000_000
    assert inflight.bytes == other.cost + ticket.cost and inflight.requests == 2
    assert inflight.peak_bytes == inflight.bytes
    # Charged down again, the room it gave back wakes whoever waits for room.
    waiter = asyncio.create_task(inflight.wait_for_release(30))
    await asyncio.sleep(0)
    ticket.reprice(SMALLEST_ROOM, inflight)
    await asyncio.wait_for(waiter, 5)
    assert ticket.cost == before and inflight.bytes == other.cost + before
    # What the service releases when the request is done is the repriced cost: nothing is left.
    inflight.release(ticket.cost)
    inflight.release(other.cost)
    assert (inflight.requests, inflight.bytes) == (0, 0)


def test_a_short_json_request_is_repriced_from_what_the_worker_asks() -> None:
    # Short numbers ("1.0,") make a small value with a large answer: the estimate falls short,
    # the worker says how much it needs before computing, and that room is enough.
    _, message = make_request(np.ones((40, 40)), encoding=codec.Encoding.JSON)
    record = _message_record(message)
    ticket = price(record, LIMITS)
    outcome = _worker_pass(record, ticket.answer_bytes)
    assert isinstance(outcome, NeedsRoom) and outcome.answer_bytes > ticket.answer_bytes
    inflight = InFlight(Budget(max_requests=1, max_bytes=1 << 30))
    inflight.admit(ticket.cost)
    ticket.reprice(outcome.answer_bytes, inflight)
    assert inflight.bytes == ticket.cost == 2 * len(message.value) + 2 * outcome.answer_bytes
    assert isinstance(_worker_pass(record, ticket.answer_bytes), Answered)


# -- stored payloads (schema_version 2) ---------------------------------------------------------


def _stored_record(shape: tuple[int, int], **fields: Any) -> ConsumerRecord[bytes, bytes]:
    a = np.zeros(shape)
    _, message = make_request(a, request_id="stored-1", **fields)
    ref = codec.ObjectRef(url="s3://svd-payloads/requests/r", nbytes=a.nbytes, sha256="0" * 64)
    return _message_record(codec.to_stored(message, ref))


def test_a_stored_request_is_charged_its_matrix_and_its_stored_factors_before_any_fetch() -> None:
    record = _stored_record((2048, 2048), options={"full_matrices": True})
    ticket = price(record, LIMITS, store_results_above=512 * 1024)
    matrix = factors = 2048 * 2048 * 8
    factors = 2 * matrix + 2048 * 8
    assert ticket.stored_bytes == matrix + factors
    assert ticket.answer_bytes == codec.STORED_RESULT_ROOM  # the answer is the reference
    assert ticket.cost == 2 * len(record.value or b"") + 2 * ticket.answer_bytes + matrix + factors
    assert ticket.request_id == "stored-1"  # read with the reference, for the logs


def test_a_stored_request_with_small_factors_gets_room_for_its_answer_in_the_record() -> None:
    record = _stored_record((2048, 2048), options={"compute_uv": False})
    ticket = price(record, LIMITS, store_results_above=512 * 1024)
    assert ticket.stored_bytes == 2048 * 2048 * 8  # only the matrix: S travels inline
    # Binary, as the request it was converted from (codec.to_stored): S's 2048 float64 values.
    assert ticket.answer_bytes == 2048 * 8


def test_a_stored_request_that_asks_for_json_gets_room_for_json() -> None:
    record = _stored_record((2048, 2048), options={"compute_uv": False}, result_encoding="json")
    ticket = price(record, LIMITS, store_results_above=512 * 1024)
    assert ticket.answer_bytes == codec.result_bytes(
        (2048, 2048), k=None, full_matrices=False, compute_uv=False, itemsize=8,
        encoding=codec.Encoding.JSON,
    )  # fmt: skip


def test_without_a_store_nothing_is_priced_as_stored_factors() -> None:
    _, message = make_request(np.zeros((512, 512)), options={"full_matrices": True})
    assert price(_message_record(message), LIMITS).stored_bytes == 0
    stored = price(_message_record(message), LIMITS, store_results_above=1024)
    assert stored.stored_bytes == 2 * 512 * 512 * 8 + 512 * 8
    assert stored.answer_bytes == codec.STORED_RESULT_ROOM


def test_a_version_1_request_is_never_priced_as_stored_factors() -> None:
    _, message = make_request(np.zeros((512, 512)), schema_version=1)
    assert price(_message_record(message), LIMITS, store_results_above=0).stored_bytes == 0


@pytest.mark.parametrize(
    "ref",
    [{"nbytes": -1}, {"nbytes": "8"}, {"nbytes": True}, "s3://x", None, {"nbytes": 1.5}],
)
def test_a_malformed_reference_is_priced_as_nothing_stored_and_left_to_the_worker(
    ref: object,
) -> None:
    body = {
        "schema_version": 2,
        "request_id": "r",
        "matrix": {"shape": [2, 2], "dtype": "float64", "ref": ref},
    }
    ticket = price(_record(orjson.dumps(body), [("content-type", b"application/json")]), LIMITS)
    assert ticket.stored_bytes == 0
