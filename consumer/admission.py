"""Admission: what a record will hold while in flight, priced without looking at its matrix.

The event loop never decodes a request (the worker does: consumer/processing.py). It prices a
record from what costs O(1) to read: the value's size and, for a binary request, the small
``svd-meta`` header, which names the shapes and options and so the exact size of the result.
A JSON request's result is estimated from its size; a worker that finds it needs more room
answers ``NeedsRoom`` before computing, and the request is charged again (``Ticket.reprice``).

What a request holds while in flight, and so its price: the record's value (held for a dead
letter), its copy in shared memory, the room for its encoded answer there, and the producer's
copy of the answer until the broker acknowledges it; for stored payloads (schema_version 2),
also the referenced matrix a worker reads and the factors it writes to the store, priced from
the reference's declared size before anything is fetched. A JSON value small enough to be a
reference (``_STORED_REQUEST_MAX_BYTES``) is parsed here to find it: microseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from consumer.flow import InFlight
from consumer.unreadable import UnreadableRecord
from schemas import codec
from schemas._validation import is_valid_request_id
from schemas.errors import ContractError
from schemas.headers import SVD_META, Encoding, encoding_of, header_value
from schemas.limits import DecodeLimits

# Test-only: names a fault for the worker to inject (see consumer.jobs.FAULTS). Honoured only
# when the service runs with SVD_ENABLE_TEST_FAULTS=true.
TEST_FAULT_HEADER = "svd-test-fault"
# Test-only: the fault that raises in this process instead, as a bug on the request path would.
PARENT_FAULT = "parent_raise"

# A JSON request's answer, before the worker has read its shape: room for a reduced SVD of a
# square matrix whose numbers print as long as the answer's (what the SDK sends). Anything
# else is found by the worker and charged again.
_JSON_ANSWER_PER_VALUE_BYTE = 3
# Room for an answer that is an error, or whose size the header does not tell.
_SMALL_ANSWER_BYTES = 4096
# A JSON request at most this large is parsed to price a stored matrix it references (one that
# carries its matrix inline is as cheap to parse at this size).
_STORED_REQUEST_MAX_BYTES = 64 * 1024


@dataclass(eq=False)
class Ticket:
    """An admitted record, its price, and what the parent read of it in O(1)."""

    record: ConsumerRecord[bytes, bytes]
    answer_bytes: int  # room reserved for the answer's value
    received_at: float
    request_id: str | None = None  # from a binary request's header, for the logs until answered
    fault: str | None = None
    unreadable: str | None = None  # why, for a record aiokafka could not read
    sparse: bool = False  # a binary request's header names a sparse format
    stored_bytes: int = 0  # the referenced matrix and the factors written to the store
    cost: int = field(init=False)

    def __post_init__(self) -> None:
        self.cost = (
            0
            if self.unreadable is not None
            else _cost(self.value_bytes, self.answer_bytes, self.stored_bytes)
        )

    @property
    def value_bytes(self) -> int:
        return len(self.record.value or b"")

    @property
    def context(self) -> dict[str, object]:
        record = self.record
        return {
            "request_id": self.request_id,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
        }

    def reprice(self, answer_bytes: int, inflight: InFlight) -> None:
        """Charge the budget for the room a worker found the answer needs. Not waited for: a
        request that holds budget and waits for more could wait on every other one."""
        old = self.cost
        self.answer_bytes = answer_bytes
        self.cost = _cost(self.value_bytes, answer_bytes, self.stored_bytes)
        inflight.resize(old, self.cost)


def price(
    record: ConsumerRecord[bytes, bytes],
    limits: DecodeLimits,
    *,
    test_faults: bool = False,
    store_results_above: int | None = None,
) -> Ticket:
    """The ticket for ``record``: O(1) in its matrix, whatever the bytes hold.
    ``store_results_above``: the service's store threshold for factors (None: no store)."""
    received_at = time.time()
    if isinstance(record, UnreadableRecord):
        return Ticket(record, 0, received_at, unreadable=record.reason)
    headers = list(record.headers)
    fault = _fault(headers) if test_faults else None
    value_bytes = len(record.value or b"")
    meta = _binary_meta(headers, limits)
    stored_in = 0
    if meta is None:
        meta = _stored_meta(record.value, headers, limits)
        stored_in = _stored_request_bytes(meta)
    if meta is None:
        answer = min(_JSON_ANSWER_PER_VALUE_BYTE * value_bytes, limits.max_result_bytes)
        request_id, sparse, stored_out = None, False, 0
    else:
        in_value = None if stored_in else value_bytes
        factors = _result_bytes(meta, in_value, Encoding.BINARY)
        stored_out = 0
        if store_results_above is not None and _speaks_v2(meta) and factors > store_results_above:
            answer, stored_out = codec.STORED_RESULT_ROOM, factors
        else:
            # A stored request is JSON: its answer is too, unless it asks otherwise.
            answer = _result_bytes(meta, in_value, Encoding.JSON if stored_in else Encoding.BINARY)
            if answer > limits.max_result_bytes:  # refused by the worker before using any room
                answer = 0
        found = meta.get("request_id")
        request_id = found if is_valid_request_id(found) else None
        sparse = type(meta.get("matrix")) is dict and "format" in meta["matrix"]
    answer = max(answer, _SMALL_ANSWER_BYTES)
    return Ticket(
        record, answer, received_at, request_id=request_id, fault=fault, sparse=sparse,
        stored_bytes=stored_in + stored_out,
    )  # fmt: skip


def _cost(value_bytes: int, answer_bytes: int, stored_bytes: int = 0) -> int:
    return 2 * value_bytes + 2 * answer_bytes + stored_bytes


def _stored_meta(
    value: bytes | None, headers: list[tuple[str, bytes]], limits: DecodeLimits
) -> dict[str, Any] | None:
    """A small JSON request that references a stored matrix, parsed; None for anything else."""
    if value is None or len(value) > _STORED_REQUEST_MAX_BYTES:
        return None
    try:
        if encoding_of(headers, max_bytes=limits.max_header_bytes) is not Encoding.JSON:
            return None
        meta = orjson.loads(value)
    except (ContractError, orjson.JSONDecodeError):
        return None
    if type(meta) is not dict or type(meta.get("matrix")) is not dict:
        return None
    return meta if "ref" in meta["matrix"] else None


def _stored_request_bytes(meta: dict[str, Any] | None) -> int:
    ref = meta["matrix"].get("ref") if meta is not None else None
    nbytes = ref.get("nbytes") if type(ref) is dict else None
    return nbytes if _count(nbytes) else 0  # type: ignore[return-value]


def _speaks_v2(meta: dict[str, Any]) -> bool:
    return meta.get("schema_version") == 2


def _binary_meta(headers: list[tuple[str, bytes]], limits: DecodeLimits) -> dict[str, Any] | None:
    """A binary request's svd-meta header as JSON, or None (a JSON request, or unreadable: the
    worker says why)."""
    try:
        if encoding_of(headers, max_bytes=limits.max_header_bytes) is not Encoding.BINARY:
            return None
        raw = header_value(headers, SVD_META, max_bytes=limits.max_header_bytes)
        meta = orjson.loads(raw) if raw is not None else None
    except (ContractError, orjson.JSONDecodeError):
        return None
    return meta if type(meta) is dict else None


def _result_bytes(meta: dict[str, Any], value_bytes: int | None, default: Encoding) -> int:
    """The result's size from a binary request's header (or a stored request); 0 where it does
    not say, or says what the value cannot be (the worker refuses such a request before using
    any room). ``value_bytes`` None: the matrix is stored, not in the value."""
    matrix = meta.get("matrix")
    options = meta.get("options") or {}
    if type(matrix) is not dict or type(options) is not dict:
        return 0
    shape = matrix.get("shape")
    if type(shape) is not list or len(shape) != 2 or not all(_count(d) for d in shape):
        return 0
    dense_bytes = shape[0] * shape[1] * (4 if matrix.get("dtype") == "float32" else 8)
    if "format" not in matrix and value_bytes is not None and dense_bytes != value_bytes:
        return 0  # SHAPE_MISMATCH
    return codec.result_bytes(
        shape,
        k=options.get("k") if _count(options.get("k")) else None,
        full_matrices=options.get("full_matrices") is True,
        compute_uv=options.get("compute_uv") is not False,
        itemsize=4 if (options.get("dtype") or matrix.get("dtype")) == "float32" else 8,
        encoding=Encoding(meta["result_encoding"])
        if meta.get("result_encoding") in ("json", "binary")
        else default,
    )


def _count(value: object) -> bool:
    return type(value) is int and value > 0


def _fault(headers: list[tuple[str, bytes]]) -> str | None:
    try:
        raw = header_value(headers, TEST_FAULT_HEADER, max_bytes=64)
    except ContractError:
        return None
    return raw.decode("ascii", "replace") if raw else None
