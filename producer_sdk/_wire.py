"""From a call to a request record, and from a reply record to a result or an error.

Shared by the real client, the listener and the fake, so all three accept, reject and answer
exactly alike. Every byte goes through ``schemas.codec``; nothing here knows the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import time
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt

from objectstore import PayloadStore, StoreError, StoreUnavailable
from producer_sdk.errors import InvalidReply, SvdError, service_error
from producer_sdk.result import SvdResult
from schemas import codec
from schemas._validation import validate
from schemas.errors import ContractError, ErrorCode
from schemas.headers import Encoding, ReceivedHeaders
from schemas.models import ErrorResult, SvdRequestMeta
from schemas.records import Buffer


def new_request_id() -> str:
    # uuid4 alone keeps requests of different clients apart: matching never relies on a prefix.
    return uuid.uuid4().hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def as_matrix(matrix: npt.ArrayLike) -> np.ndarray[Any, Any]:
    """The caller's matrix as an array. Integers become float64 (exact up to 2**53); any other
    non-float dtype is left for the contract to reject with UNSUPPORTED_DTYPE."""
    try:
        array = np.asarray(matrix)
    except (ValueError, TypeError) as exc:
        raise service_error(
            ErrorCode.INVALID_SHAPE,
            f"the matrix is not a rectangular array of numbers: {exc}",
            request_id=None,
            retryable=False,
        ) from None
    if array.dtype.kind in "iu":
        return array.astype(np.float64)
    return array


def _index(value: object) -> object:
    # numpy integers are fine as k; bools and floats are left for strict validation to reject.
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        return value
    return operator.index(value)


def build_request(
    matrix: npt.ArrayLike,
    *,
    request_id: str,
    k: int | None,
    full_matrices: bool,
    compute_uv: bool,
    created_at_ms: int,
    deadline_ms: int,
    encoding: Encoding,
    reply_topic: str | None = None,
    correlation_id: str | None = None,
    schema_version: int = 1,
) -> codec.EncodedMessage:
    """The request record. Raises SvdInvalidRequest with the code the service would answer.
    ``schema_version`` 2 lets the service answer with stored factors (a client with a store)."""
    array = as_matrix(matrix)
    options: dict[str, object] = {"full_matrices": full_matrices, "compute_uv": compute_uv}
    if k is not None:
        options["k"] = _index(k)
    body: dict[str, Any] = {
        "schema_version": schema_version,
        "request_id": request_id,
        "options": options,
        "created_at_ms": created_at_ms,
        "deadline_ms": deadline_ms,
        "matrix": {"shape": [int(d) for d in array.shape], "dtype": array.dtype.name},
    }
    if reply_topic is not None:
        body["reply_topic"] = reply_topic
    if correlation_id is not None:
        body["correlation_id"] = correlation_id
    try:
        meta = validate(SvdRequestMeta, body, "request", request_id)
        return codec.encode_request(meta, array, encoding)
    except ContractError as exc:
        raise service_error(
            exc.code, exc.message, request_id=request_id, retryable=exc.retryable
        ) from None


def outcome_of(reply: codec.DecodedResult | ErrorResult) -> SvdResult | SvdError:
    if isinstance(reply, ErrorResult):
        return service_error(
            reply.code, reply.message, request_id=reply.request_id, retryable=reply.retryable
        )
    # Binary replies are read-only views of the record; JSON ones are made read-only too, so
    # code written against one encoding does not break on the other.
    for array in (reply.u, reply.s, reply.vt):
        if array is not None:
            array.flags.writeable = False
    return SvdResult(
        request_id=reply.meta.request_id,
        u=reply.u,
        s=reply.s,
        vt=reply.vt,
        meta=reply.meta,
        encoding=reply.encoding,
    )


def decode_answer(
    value: Buffer, headers: ReceivedHeaders, expected_id: str | None
) -> SvdResult | SvdError | codec.StoredResult:
    """Decode a reply record; a malformed one becomes InvalidReply rather than an exception.
    A result whose factors are stored comes back as is: ``fetch_stored`` reads them."""
    try:
        reply = codec.decode_reply(value, headers)
    except ContractError as exc:
        return InvalidReply(
            exc.code, f"malformed reply: {exc.message}", request_id=expected_id, retryable=False
        )
    found = reply.request_id if isinstance(reply, ErrorResult) else reply.meta.request_id
    if expected_id is not None and found != expected_id:
        return InvalidReply(
            ErrorCode.INVALID_SCHEMA,
            f"reply keyed {expected_id!r} carries request_id {found!r}",
            request_id=expected_id,
            retryable=False,
        )
    if isinstance(reply, codec.StoredResult):
        return reply
    return outcome_of(reply)


# A stored result's object is read again after the store failed, twice, 0.2 s then 0.4 s later,
# before the call fails with STORE_UNAVAILABLE (retryable).
_FETCH_ATTEMPTS = 3
_FETCH_FIRST_WAIT_S = 0.2


async def fetch_stored(
    store: PayloadStore | None, stored: codec.StoredResult, *, delete: bool
) -> SvdResult | SvdError:
    """The factors of a stored result, read from the store (only from a location this client
    trusts: its own store and its ``trusted_urls``) and verified; the object is deleted after
    when ``delete``. A failure becomes the SvdError of its code."""
    request_id = stored.meta.request_id
    ref = stored.ref
    if store is None:
        return InvalidReply(
            ErrorCode.UNTRUSTED_REFERENCE,
            f"the result's factors are stored at {ref.url} but this client has no store",
            request_id=request_id,
            retryable=False,
        )
    for attempt in range(1, _FETCH_ATTEMPTS + 1):
        try:
            data = await store.read_async(ref.url, ref.nbytes, ref.sha256, request_id)
            break
        except StoreUnavailable as exc:
            if attempt == _FETCH_ATTEMPTS:
                return _store_error(exc, request_id)
            await asyncio.sleep(_FETCH_FIRST_WAIT_S * 2 ** (attempt - 1))
        except StoreError as exc:
            return _store_error(exc, request_id)
    try:
        if len(data) > _DECODE_INLINE_BYTES:
            result = await asyncio.to_thread(codec.load_stored_result, stored, data)
        else:
            result = codec.load_stored_result(stored, data)
    except ContractError as exc:
        return InvalidReply(
            exc.code, f"malformed stored result: {exc.message}", request_id=request_id,
            retryable=False,
        )  # fmt: skip
    if delete:
        with contextlib.suppress(StoreError):  # the bucket's lifecycle rule is the fallback
            await store.delete_async(ref.url)
    return outcome_of(result)


_DECODE_INLINE_BYTES = 256 * 1024


def _store_error(exc: StoreError, request_id: str) -> SvdError:
    return service_error(
        exc.code,
        f"the result's factors could not be read: {exc.message}",
        request_id=request_id,
        retryable=exc.retryable,
    )
