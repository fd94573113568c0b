"""Encoding and decoding of requests, results and errors (see docs/wire-format.md).

Everything decoded here is untrusted: sizes are checked before anything is allocated, and
array data is either viewed in place (binary) or converted from a checked list of numbers
(JSON). Nothing is ever unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import orjson

from schemas import sparse
from schemas._arrays import (
    WIRE_DTYPES,
    FloatArray,
    check_finite,
    dtype_name,
    from_buffer,
    from_json_numbers,
    to_wire,
)
from schemas._validation import (
    check_schema_version,
    check_structure,
    check_version_header,
    is_valid_request_id,
    is_valid_topic_name,
    load_json_object,
    peek_request_id,
    validate,
)
from schemas.deadletter import DeadLetter, encode_dead_letter, read_dead_letter
from schemas.errors import ContractError, ErrorCode, SvdServiceError
from schemas.headers import (
    CONTENT_TYPE,
    CONTENT_TYPES,
    SVD_META,
    SVD_SCHEMA_VERSION,
    Encoding,
    ReceivedHeaders,
    encoding_of,
    header_value,
)
from schemas.limits import DecodeLimits, result_limit
from schemas.models import (
    ERROR_SCHEMA_VERSION,
    ITEMSIZE,
    STORED_PAYLOADS_VERSION,
    ArraySpec,
    BinaryArray,
    BinaryFactors,
    ErrorResult,
    MatrixSpec,
    ObjectRef,
    SparseMatrixSpec,
    SvdRequestJson,
    SvdRequestMeta,
    SvdResultBinaryMeta,
    SvdResultMeta,
    SvdResultSpec,
    SvdResultStored,
)
from schemas.records import Buffer, EncodedMessage
from schemas.sparse import SparseMatrix

__all__ = [
    "DeadLetter",
    "DecodedRequest",
    "DecodedResult",
    "EncodedMessage",
    "Encoding",
    "StoredResult",
    "check_answerable",
    "decode_reply",
    "decode_request",
    "encode_dead_letter",
    "encode_error",
    "encode_request",
    "encode_result",
    "encode_stored_request",
    "load_stored_request",
    "load_stored_result",
    "read_dead_letter",
    "recover_reply_topic",
    "recover_request_id",
    "reply_encoding",
    "result_bytes",
    "result_room",
    "stored_factors",
    "to_stored",
    "write_result",
    "write_stored_result",
]

_DEFAULT_LIMITS = DecodeLimits()
# The most bytes one number takes in a JSON result (orjson's shortest round-trip form, sign and
# exponent included, plus its comma; float32 prints up to 16 characters, e.g. -0.0000021079127),
# and room for everything but the numbers.
_JSON_BYTES_PER_NUMBER = {4: 17, 8: 25}
_JSON_RESULT_OVERHEAD = 4096
# The smallest float64 that rounds to infinity in float32: halfway between float32's largest
# number, 2**128 - 2**104, and 2**128 (the tie rounds to even, 2**128, which is infinite).
_FLOAT32_OVERFLOWS_AT = 2.0**128 - 2.0**103
_VERSION_HEADERS = {v: (SVD_SCHEMA_VERSION, str(v).encode()) for v in (1, 2)}
_MISSING = object()
#: Room for the value of a result whose factors are stored: its JSON without any numbers.
STORED_RESULT_ROOM = 8 * 1024


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    meta: SvdRequestMeta
    # In the wire dtype (not yet options.dtype); read-only. For binary, a view of the value.
    # A SparseMatrix when the request's matrix has a format (schemas/sparse.py). None while a
    # stored matrix is not loaded yet (``stored`` says where it is; ``load_stored_request``).
    matrix: FloatArray | SparseMatrix | None
    encoding: Encoding
    nbytes: int  # size of the received value
    stored: ObjectRef | None = None

    @property
    def reply_encoding(self) -> Encoding:
        return reply_encoding(self.meta, self.encoding)


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A result whose factors are in a store: where (``ref``) and how they lie in the object."""

    meta: SvdResultMeta
    factors: BinaryFactors
    ref: ObjectRef


@dataclass(frozen=True, slots=True)
class DecodedResult:
    meta: SvdResultMeta
    u: FloatArray | None
    s: FloatArray
    vt: FloatArray | None
    encoding: Encoding


def _view(value: Buffer) -> memoryview:
    view = memoryview(value)
    if not view.c_contiguous:
        raise ContractError(ErrorCode.INVALID_ENCODING, "value buffer is not contiguous")
    # Byte-addressed from here on: len() of a memoryview counts items, not bytes.
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _headers(encoding: Encoding, version: int) -> list[tuple[str, bytes]]:
    return [(CONTENT_TYPE, CONTENT_TYPES[encoding].encode()), _VERSION_HEADERS[version]]


# ----------------------------------------------------------------------------------- requests


def decode_request(
    value: Buffer, headers: ReceivedHeaders, limits: DecodeLimits | None = None
) -> DecodedRequest:
    """Validate a request record. Raises ContractError (with request_id when it was readable)."""
    limits = limits or _DEFAULT_LIMITS
    view = _view(value)
    if view.nbytes > limits.max_message_bytes:
        raise ContractError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"value is {view.nbytes} bytes; the limit is {limits.max_message_bytes}",
        )
    encoding = encoding_of(headers, max_bytes=limits.max_header_bytes)
    check_version_header(
        header_value(headers, SVD_SCHEMA_VERSION, max_bytes=limits.max_header_bytes)
    )
    matrix: FloatArray | SparseMatrix | None
    if encoding is Encoding.JSON:
        meta, matrix = _decode_json_request(view, limits)
    else:
        meta, matrix = _decode_binary_request(view, headers, limits)
    stored = meta.stored if isinstance(meta, SvdRequestJson) else None
    return DecodedRequest(
        meta=meta, matrix=matrix, encoding=encoding, nbytes=view.nbytes, stored=stored
    )


def _decode_stored_request(obj: dict[str, Any], limits: DecodeLimits) -> SvdRequestJson:
    """A JSON request whose matrix is a reference: everything but the matrix's bytes is checked
    here, the object's size included, so nothing is fetched for a request that would fail."""
    check_structure(obj, limits, "value")
    request_id = peek_request_id(obj)
    check_schema_version(obj, "value", request_id)
    meta = validate(SvdRequestJson, obj, "value", request_id)
    ref = meta.stored
    assert ref is not None  # the discriminator chose a stored matrix
    spec = meta.matrix
    if isinstance(spec, SparseMatrixSpec):
        sparse.check_stored(meta, ref.nbytes, limits)
    else:
        _check_limits(meta, limits)
        if ref.nbytes != spec.nbytes:
            raise ContractError(
                ErrorCode.SHAPE_MISMATCH,
                f"matrix.ref.nbytes is {ref.nbytes}; a {spec.dtype} matrix of shape "
                f"{spec.shape} needs {spec.nbytes}",
                request_id=request_id,
            )
    return meta


def load_stored_request(
    request: DecodedRequest, data: Buffer, limits: DecodeLimits | None = None
) -> DecodedRequest:
    """``request`` with its stored matrix read from ``data``, the object's bytes (already
    verified against the reference): checked as a binary request's value would be."""
    limits = limits or _DEFAULT_LIMITS
    meta = request.meta
    view = _view(data)
    loaded: FloatArray | SparseMatrix
    if isinstance(meta.matrix, SparseMatrixSpec):
        head = meta.model_dump(mode="json", exclude_none=True)
        del head["matrix"]["ref"]
        _, loaded = sparse.decode_binary(view, head, limits)
    else:
        dense = from_buffer(view, 0, meta.matrix.shape, meta.matrix.dtype)
        check_finite(dense, "matrix", meta.request_id)
        loaded = dense
    return DecodedRequest(
        meta=meta, matrix=loaded, encoding=request.encoding, nbytes=request.nbytes,
        stored=request.stored,
    )  # fmt: skip


def reply_encoding(meta: SvdRequestMeta, request_encoding: Encoding) -> Encoding:
    """The encoding of a request's answer: its result_encoding, else its own."""
    chosen = meta.result_encoding
    return request_encoding if chosen is None else Encoding(chosen)


def result_room(meta: SvdRequestMeta, encoding: Encoding) -> int:
    """The most bytes the value of this request's result can take in ``encoding``: exact for
    binary, the worst case for JSON (whose size is only known once encoded)."""
    return result_bytes(
        meta.matrix.shape,
        k=meta.options.k,
        full_matrices=meta.options.full_matrices,
        compute_uv=meta.options.compute_uv,
        itemsize=ITEMSIZE[meta.compute_dtype],
        encoding=encoding,
    )


def result_bytes(
    shape: Sequence[int],
    *,
    k: int | None,
    full_matrices: bool,
    compute_uv: bool,
    itemsize: int,
    encoding: Encoding,
) -> int:
    """``result_room`` from the numbers alone (the service prices a request from its header)."""
    m, n = shape
    r = min(k or min(m, n), m, n)
    if not compute_uv:
        numbers = r
    elif full_matrices:
        numbers = m * m + r + n * n
    else:
        numbers = m * r + r + r * n
    if encoding is Encoding.BINARY:
        return numbers * itemsize
    return _JSON_RESULT_OVERHEAD + numbers * _JSON_BYTES_PER_NUMBER[itemsize]


def check_answerable(
    request: DecodedRequest, limits: DecodeLimits | None = None, *, factors_stored: bool = False
) -> None:
    """Refuse before computing what a decoded request could not be answered with: a JSON result
    over the limit (its worst case, as a binary one over the limit is refused by the size
    checks), and a float64 matrix asked to be computed in float32 that holds a value beyond
    float32's range (it would become infinite in the cast, and the input the caller sent is
    finite). ``factors_stored``: the factors go to the store (the worker decided), so no JSON
    result carries them. Raises ContractError."""
    limits = limits or _DEFAULT_LIMITS
    meta, matrix, encoding = request.meta, request.matrix, request.reply_encoding
    if encoding is Encoding.JSON and not factors_stored:
        worst = result_room(meta, encoding)
        if worst > limits.max_result_bytes:
            numbers = (worst - _JSON_RESULT_OVERHEAD) // _JSON_BYTES_PER_NUMBER[
                ITEMSIZE[meta.compute_dtype]
            ]
            raise ContractError(
                ErrorCode.LIMIT_EXCEEDED,
                f"a JSON result of {numbers} numbers may take {worst} bytes; the limit is "
                f"{limits.max_result_bytes}: ask for result_encoding binary, k or compute_uv "
                "false",
                request_id=meta.request_id,
            )
    if matrix is None:  # stored, not loaded yet: checked again once it is
        return
    values = matrix if isinstance(matrix, np.ndarray) else matrix.data
    if ITEMSIZE[meta.compute_dtype] < values.dtype.itemsize and values.size:
        largest = max(float(values.max()), -float(values.min()))
        if largest >= _FLOAT32_OVERFLOWS_AT:
            raise ContractError(
                ErrorCode.NON_FINITE,
                f"the matrix holds {largest:.6g}, beyond float32's range: it would be infinite "
                "in options.dtype float32; compute in float64 or scale the matrix down",
                request_id=meta.request_id,
            )


def _decode_json_request(
    view: memoryview, limits: DecodeLimits
) -> tuple[SvdRequestMeta, FloatArray | SparseMatrix | None]:
    obj = load_json_object(view, "value", limits)
    matrix = obj.get("matrix")
    if type(matrix) is dict and "ref" in matrix:
        return _decode_stored_request(obj, limits), None
    if sparse.is_sparse(matrix):
        return sparse.decode_json(obj, limits)
    # The data array leaves the tree before the depth walk: it can hold millions of numbers, and
    # from_json_numbers checks its elements anyway.
    data = matrix.pop("data", _MISSING) if type(matrix) is dict else _MISSING
    check_structure(obj, limits, "value")
    meta = _validate_request(obj, "value", limits)
    if data is _MISSING:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            "matrix.data is required in a JSON request",
            request_id=meta.request_id,
        )
    array = from_json_numbers(data, meta.matrix.shape, meta.matrix.dtype, "matrix", meta.request_id)
    array.flags.writeable = False
    return meta, array


def _decode_binary_request(
    view: memoryview, headers: ReceivedHeaders, limits: DecodeLimits
) -> tuple[SvdRequestMeta, FloatArray | SparseMatrix]:
    obj = _load_meta_header(headers, limits)
    if sparse.is_sparse(obj.get("matrix")):
        return sparse.decode_binary(view, obj, limits)
    meta = _validate_request(obj, "svd-meta", limits)
    # Shape, dtype and limits are settled before the value is looked at.
    if view.nbytes != meta.matrix.nbytes:
        raise ContractError(
            ErrorCode.SHAPE_MISMATCH,
            f"value is {view.nbytes} bytes; a {meta.matrix.dtype} matrix of shape "
            f"{meta.matrix.shape} needs {meta.matrix.nbytes}",
            request_id=meta.request_id,
        )
    array = from_buffer(view, 0, meta.matrix.shape, meta.matrix.dtype)
    check_finite(array, "matrix", meta.request_id)
    return meta, array


def _load_meta_header(headers: ReceivedHeaders, limits: DecodeLimits) -> dict[str, Any]:
    raw = header_value(headers, SVD_META, max_bytes=limits.max_header_bytes)
    if raw is None:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA, f"a binary message needs the {SVD_META!r} header"
        )
    obj = load_json_object(raw, SVD_META, limits)
    check_structure(obj, limits, SVD_META)
    return obj


def _validate_request(obj: dict[str, Any], what: str, limits: DecodeLimits) -> SvdRequestMeta:
    request_id = peek_request_id(obj)
    check_schema_version(obj, what, request_id)
    meta = validate(SvdRequestMeta, obj, what, request_id)
    _check_limits(meta, limits)
    return meta


def _check_limits(meta: SvdRequestMeta, limits: DecodeLimits) -> None:
    rows, cols = meta.matrix.shape
    checks = (
        ("rows", rows, limits.max_rows),
        ("cols", cols, limits.max_cols),
        ("elements", rows * cols, limits.max_elements),
        ("matrix bytes", meta.matrix.nbytes, limits.max_matrix_bytes),
        ("result bytes", meta.result_nbytes(), result_limit(meta.schema_version, limits)),
    )
    for name, actual, limit in checks:
        if actual > limit:
            raise ContractError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{name} {actual} exceeds the limit {limit} (shape {meta.matrix.shape}, "
                f"{meta.matrix.dtype})",
                request_id=meta.request_id,
            )


def encode_request(
    meta: SvdRequestMeta,
    matrix: np.ndarray[Any, Any] | SparseMatrix,
    encoding: Encoding = Encoding.JSON,
) -> EncodedMessage:
    """Encode a request. meta.matrix must describe `matrix` (see MatrixSpec.of, or
    SparseMatrix.spec for a sparse matrix)."""
    if isinstance(matrix, SparseMatrix):
        return sparse.encode_request(meta, matrix, encoding)
    wire = to_wire(matrix, "matrix", ndim=(2,))
    if meta.matrix != MatrixSpec.of(wire):
        raise ValueError(
            f"meta.matrix {meta.matrix} does not describe the {wire.dtype} {wire.shape} array"
        )
    body = meta.model_dump(mode="json", exclude_none=True)
    headers = _headers(encoding, meta.schema_version)
    if encoding is Encoding.JSON:
        body["matrix"]["data"] = _native(wire).reshape(-1)
        value = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    else:
        headers.append((SVD_META, orjson.dumps(body)))
        value = wire.tobytes()
    return EncodedMessage(key=meta.request_id.encode(), value=value, headers=headers)


def encode_stored_request(meta: SvdRequestJson) -> EncodedMessage:
    """A version 2 request whose matrix is a stored object (``meta.matrix.ref``): always JSON."""
    if meta.stored is None:
        raise ValueError("meta.matrix has no ref")
    value = orjson.dumps(meta.model_dump(mode="json", exclude_none=True))
    return EncodedMessage(
        key=meta.request_id.encode(),
        value=value,
        headers=_headers(Encoding.JSON, meta.schema_version),
    )


def _native(array: FloatArray) -> FloatArray:
    # orjson serialises native-endian arrays only; the wire arrays are little-endian.
    return array.astype(array.dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------------------------ results


def encode_result(
    meta: SvdResultMeta,
    u: np.ndarray[Any, Any] | None,
    s: np.ndarray[Any, Any],
    vt: np.ndarray[Any, Any] | None,
    encoding: Encoding,
) -> EncodedMessage:
    """Encode a successful result; the factors' shapes and dtype are taken from the arrays.
    Raises ContractError NON_FINITE when a factor is not finite."""
    factors = _factors(u, s, vt)
    if encoding is Encoding.JSON:
        value, headers = _json_result(meta, factors)
    else:
        wire = {name: to_wire(a, name, ndim=(a.ndim,)) for name, a in factors.items()}
        headers = _binary_result_headers(meta, wire)
        # One copy: join reads the arrays' buffers directly.
        value = b"".join(a.data.cast("B") for a in wire.values())
    return EncodedMessage(key=meta.request_id.encode(), value=value, headers=headers)


def write_result(
    meta: SvdResultMeta,
    u: np.ndarray[Any, Any] | None,
    s: np.ndarray[Any, Any],
    vt: np.ndarray[Any, Any] | None,
    encoding: Encoding,
    out: memoryview,
) -> tuple[int, list[tuple[str, bytes]]]:
    """``encode_result`` written into ``out`` (``result_room`` bytes suffice): the value's size
    and the headers. A binary result's factors are copied once, straight into ``out`` in wire
    order, and checked there; ValueError when they do not fit, ContractError NON_FINITE when a
    factor is not finite."""
    factors = _factors(u, s, vt)
    target = _view(out)
    if encoding is Encoding.JSON:
        value, headers = _json_result(meta, factors)
        if len(value) > target.nbytes:
            raise ValueError(f"the result takes {len(value)} bytes; {target.nbytes} were reserved")
        target[: len(value)] = value
        return len(value), headers
    end = 0
    placed: dict[str, np.ndarray[Any, Any]] = {}
    dtype = WIRE_DTYPES[dtype_name(factors["s"])]
    for name, a in factors.items():
        if end + a.size * dtype.itemsize > target.nbytes:
            raise ValueError(f"the factors do not fit the {target.nbytes} bytes reserved")
        wire = np.frombuffer(target, dtype=dtype, count=a.size, offset=end).reshape(a.shape)
        np.copyto(wire, a)
        placed[name] = wire
        end += wire.nbytes
    # One scan of the factors where they now lie back to back, not one per factor.
    if not np.isfinite(np.frombuffer(target, dtype=dtype, count=end // dtype.itemsize)).all():
        for name, wire in placed.items():
            check_finite(wire, name)  # names the factor
    return end, _binary_result_headers(meta, placed)


def _factors(
    u: np.ndarray[Any, Any] | None, s: np.ndarray[Any, Any], vt: np.ndarray[Any, Any] | None
) -> dict[str, np.ndarray[Any, Any]]:
    if (u is None) != (vt is None):
        raise ValueError("u and vt are given together or not at all")
    factors = {name: a for name, a in (("u", u), ("s", s), ("vt", vt)) if a is not None}
    for name, a in factors.items():
        if a.ndim != (1 if name == "s" else 2) or a.size == 0:
            raise ContractError(
                ErrorCode.INVALID_SHAPE,
                f"{name} must be non-empty with ndim {1 if name == 's' else 2}, got {a.shape}",
            )
    if len({dtype_name(a) for a in factors.values()}) != 1:
        raise ValueError("u, s and vt must share one dtype")
    return factors


def _json_result(
    meta: SvdResultMeta, factors: dict[str, np.ndarray[Any, Any]]
) -> tuple[bytes, list[tuple[str, bytes]]]:
    body = meta.model_dump(mode="json", exclude_none=True, include=set(SvdResultMeta.model_fields))
    wire = {name: to_wire(a, name, ndim=(a.ndim,)) for name, a in factors.items()}
    body["factors"] = {
        name: {"shape": list(a.shape), "dtype": a.dtype.name, "data": _native(a).reshape(-1)}
        for name, a in wire.items()
    }
    headers = _headers(Encoding.JSON, meta.schema_version)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), headers


def _binary_result_body(
    meta: SvdResultMeta, wire: dict[str, np.ndarray[Any, Any]]
) -> dict[str, Any]:
    """The result object with each factor's place in the bytes that follow it (a binary
    result's value, or a stored result's object)."""
    body = meta.model_dump(mode="json", exclude_none=True, include=set(SvdResultMeta.model_fields))
    offset, specs = 0, {}
    for name, a in wire.items():
        specs[name] = {
            "shape": list(a.shape),
            "dtype": dtype_name(a),
            "offset": offset,
            "nbytes": a.nbytes,
        }
        offset += a.nbytes
    body["factors"] = specs
    return body


def _binary_result_headers(
    meta: SvdResultMeta, wire: dict[str, np.ndarray[Any, Any]]
) -> list[tuple[str, bytes]]:
    headers = _headers(Encoding.BINARY, meta.schema_version)
    headers.append((SVD_META, orjson.dumps(_binary_result_body(meta, wire))))
    return headers


def stored_factors(
    u: np.ndarray[Any, Any] | None, s: np.ndarray[Any, Any], vt: np.ndarray[Any, Any] | None
) -> dict[str, np.ndarray[Any, Any]]:
    """The factors as they are stored, back to back in this order: little-endian, row-major
    (a copy only where they are not already). ContractError NON_FINITE when one is not finite."""
    factors = _factors(u, s, vt)
    wire = {name: to_wire(a, name, ndim=(a.ndim,)) for name, a in factors.items()}
    for name, a in wire.items():
        check_finite(a, name)
    return wire


def write_stored_result(
    meta: SvdResultMeta, wire: dict[str, np.ndarray[Any, Any]], ref: ObjectRef, out: memoryview
) -> tuple[int, list[tuple[str, bytes]]]:
    """The answer to a request whose factors (``stored_factors``) were written to the object
    ``ref``: a JSON result with the factors' places in it and the reference, into ``out``
    (``STORED_RESULT_ROOM`` bytes suffice)."""
    if meta.schema_version < STORED_PAYLOADS_VERSION:
        raise ValueError("only a version 2 result can reference stored factors")
    body = _binary_result_body(meta, wire)
    body["factors_ref"] = ref.model_dump(mode="json")
    value = orjson.dumps(body)
    target = _view(out)
    if len(value) > target.nbytes:
        raise ValueError(f"the result takes {len(value)} bytes; {target.nbytes} were reserved")
    target[: len(value)] = value
    return len(value), _headers(Encoding.JSON, meta.schema_version)


def encode_error(
    error: ErrorResult | SvdServiceError, encoding: Encoding | None = None
) -> EncodedMessage:
    """Encode an error result. It is JSON whatever the request's encoding (so a reader needs no
    binary machinery to read a failure); `encoding` is accepted for symmetry and not used."""
    del encoding
    result = error if isinstance(error, ErrorResult) else ErrorResult.from_exception(error)
    # request_id stays even when null (readers look for it); other absent optionals are omitted.
    unset = {f for f in ("correlation_id", "traceparent") if getattr(result, f) is None}
    value = orjson.dumps(result.model_dump(mode="json", exclude=unset))
    key = (result.request_id or "").encode()
    return EncodedMessage(
        key=key, value=value, headers=_headers(Encoding.JSON, ERROR_SCHEMA_VERSION)
    )


def decode_reply(
    value: Buffer, headers: ReceivedHeaders, limits: DecodeLimits | None = None
) -> DecodedResult | StoredResult | ErrorResult:
    """Decode a record from the results topic. Raises ContractError if it is malformed."""
    limits = limits or _DEFAULT_LIMITS
    view = _view(value)
    encoding = encoding_of(headers, max_bytes=limits.max_header_bytes)
    check_version_header(
        header_value(headers, SVD_SCHEMA_VERSION, max_bytes=limits.max_header_bytes)
    )
    if encoding is Encoding.JSON:
        return _decode_json_reply(view, limits)
    return _decode_binary_reply(view, headers, limits)


def _decode_json_reply(
    view: memoryview, limits: DecodeLimits
) -> DecodedResult | StoredResult | ErrorResult:
    obj = load_json_object(view, "value", limits)
    request_id = peek_request_id(obj)
    factors = obj.get("factors")
    data: dict[str, object] = {}
    if type(factors) is dict:
        for name, spec in factors.items():
            if type(spec) is dict and "data" in spec:
                data[name] = spec.pop("data")
    check_structure(obj, limits, "value")
    check_schema_version(obj, "value", request_id)
    status = obj.get("status")
    if status == "error":
        return validate(ErrorResult, obj, "value", request_id)
    if status != "ok":
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"status must be 'ok' or 'error', got {status!r}",
            request_id=request_id,
        )
    if "factors_ref" in obj:
        stored = validate(SvdResultStored, obj, "value", request_id)
        _check_layout(stored.factors, stored.factors_ref.nbytes, request_id)
        return StoredResult(meta=_base_meta(stored), factors=stored.factors, ref=stored.factors_ref)
    spec = validate(SvdResultSpec, obj, "value", request_id)
    arrays: dict[str, FloatArray | None] = {"u": None, "s": None, "vt": None}
    for name in arrays:
        a: ArraySpec | None = getattr(spec.factors, name)
        if a is None:
            continue
        if name not in data:
            raise ContractError(
                ErrorCode.INVALID_SCHEMA, f"factors.{name}.data is missing", request_id=request_id
            )
        arrays[name] = from_json_numbers(
            data[name], a.shape, a.dtype, f"factors.{name}", request_id
        )
    return _result(spec, arrays, Encoding.JSON)


def _decode_binary_reply(
    view: memoryview, headers: ReceivedHeaders, limits: DecodeLimits
) -> DecodedResult:
    obj = _load_meta_header(headers, limits)
    request_id = peek_request_id(obj)
    check_schema_version(obj, SVD_META, request_id)
    meta = validate(SvdResultBinaryMeta, obj, SVD_META, request_id)
    placed = _check_layout(meta.factors, view.nbytes, request_id)
    arrays: dict[str, FloatArray | None] = {"u": None, "s": None, "vt": None}
    for name, a in placed.items():
        arrays[name] = array = from_buffer(view, a.offset, a.shape, a.dtype)
        check_finite(array, f"factors.{name}", request_id)
    return _result(meta, arrays, Encoding.BINARY)


def _check_layout(
    factors: BinaryFactors, size: int, request_id: str | None
) -> dict[str, BinaryArray]:
    """Every array inside the value, exactly sized, none overlapping, nothing left over."""
    placed = {n: a for n in ("u", "s", "vt") if (a := getattr(factors, n)) is not None}
    end = 0
    for name, a in sorted(placed.items(), key=lambda item: item[1].offset):
        needed = prod(a.shape) * ITEMSIZE[a.dtype]
        if a.nbytes != needed:
            raise ContractError(
                ErrorCode.SHAPE_MISMATCH,
                f"factors.{name}: nbytes {a.nbytes} but shape {a.shape} {a.dtype} needs {needed}",
                request_id=request_id,
            )
        if a.offset < end:
            raise ContractError(
                ErrorCode.SHAPE_MISMATCH,
                f"factors.{name} overlaps another array",
                request_id=request_id,
            )
        end = a.offset + a.nbytes
    if end != size:
        raise ContractError(
            ErrorCode.SHAPE_MISMATCH,
            f"value is {size} bytes; the factors described end at byte {end}",
            request_id=request_id,
        )
    return placed


def _result(
    wire: SvdResultMeta, arrays: dict[str, FloatArray | None], encoding: Encoding
) -> DecodedResult:
    u, s, vt = arrays["u"], arrays["s"], arrays["vt"]
    if s is None or s.ndim != 1 or (u is None) != (vt is None):
        raise ContractError(
            ErrorCode.INVALID_SHAPE,
            "a result has a 1-D s, and a 2-D u and vt together or neither",
            request_id=wire.request_id,
        )
    for name, a in (("u", u), ("vt", vt)):
        if a is not None and a.ndim != 2:
            raise ContractError(
                ErrorCode.INVALID_SHAPE, f"factors.{name} must be 2-D", request_id=wire.request_id
            )
    return DecodedResult(meta=_base_meta(wire), u=u, s=s, vt=vt, encoding=encoding)


def _base_meta(wire: SvdResultMeta) -> SvdResultMeta:
    # The base model, without the wire-specific factor descriptions.
    return SvdResultMeta.model_validate(
        {name: getattr(wire, name) for name in SvdResultMeta.model_fields}
    )


def load_stored_result(result: StoredResult, data: Buffer) -> DecodedResult:
    """A stored result's factors, read from ``data`` (the object's bytes, already verified
    against the reference) as a binary result's value is."""
    view = _view(data)
    request_id = result.meta.request_id
    placed = _check_layout(result.factors, view.nbytes, request_id)
    arrays: dict[str, FloatArray | None] = {"u": None, "s": None, "vt": None}
    for name, a in placed.items():
        arrays[name] = array = from_buffer(view, a.offset, a.shape, a.dtype)
        check_finite(array, f"factors.{name}", request_id)
    return _result(result.meta, arrays, Encoding.BINARY)


def to_stored(message: EncodedMessage, ref: ObjectRef) -> EncodedMessage:
    """A binary request (``encode_request``) whose value was stored as ``ref``, as the version 2
    JSON request that references it instead of carrying it (its answer still binary, unless the
    request named another ``result_encoding``)."""
    raw = dict(message.headers)[SVD_META]
    body = orjson.loads(raw)
    body["schema_version"] = STORED_PAYLOADS_VERSION
    # Answered as the binary request it was: a JSON answer of factors just under the store
    # threshold would be several times larger than the record it has to fit.
    body.setdefault("result_encoding", Encoding.BINARY.value)
    matrix = body.pop("matrix")
    matrix["ref"] = ref.model_dump(mode="json")
    body["matrix"] = matrix  # last, as everywhere
    meta = validate(SvdRequestJson, body, "request", body.get("request_id"))
    return encode_stored_request(meta)


# ------------------------------------------------------------------------- request id recovery

# Only the head of a large JSON value is searched: well-formed producers put request_id before
# the matrix, and a failing message should not cost a full parse twice.
_RECOVER_PARSE_BYTES = 64 * 1024


def recover_request_id(
    value: Buffer, headers: ReceivedHeaders, key: bytes | None = None
) -> str | None:
    """Best-effort request id of a record that failed to decode, for keying the error result.

    Looked for in order: the first ``svd-meta`` header (a binary request; its head if it is
    too large to parse), else the JSON value (likewise), else the record key when the key is
    a valid request id (producers are asked to key requests by id). Never raises; None if no
    valid id is found anywhere.
    """
    found = _member_in_json(_request_object(value, headers), "request_id")
    if found is None and key is not None:
        try:
            candidate = bytes(key).decode("ascii")
        except (UnicodeDecodeError, TypeError):
            return None
        found = candidate if is_valid_request_id(candidate) else None
    return found


def recover_reply_topic(value: Buffer, headers: ReceivedHeaders) -> str | None:
    """Best-effort reply topic of a record that failed to decode, read as the request id is
    (``recover_request_id``), so an error reaches a requester that reads only its own topic.
    Never raises; None when there is none. The caller still checks it before writing there.
    """
    return _member_in_json(_request_object(value, headers), "reply_topic")


def _request_object(value: Buffer, headers: ReceivedHeaders) -> Buffer:
    """Where a record's request object is: its first svd-meta header, else its value."""
    for name, raw in headers:
        if isinstance(name, str) and name.lower() == SVD_META:
            return raw or b""
    return value


_MEMBER_RES = {
    name: re.compile(rb'"%s"\s*:\s*("(?:[^"\\\x00-\x1f]|\\.){1,%d}")' % (name.encode(), longest))
    for name, longest in (("request_id", 128), ("reply_topic", 249))
}
_MEMBER_VALID = {"request_id": is_valid_request_id, "reply_topic": is_valid_topic_name}


def _member_in_json(data: Buffer, name: str) -> str | None:
    valid = _MEMBER_VALID[name]
    try:
        view = _view(data)
        if view.nbytes <= _RECOVER_PARSE_BYTES:
            try:
                obj = orjson.loads(view)
            except orjson.JSONDecodeError:
                obj = None
            found = obj.get(name) if type(obj) is dict else None
            if valid(found):
                return str(found)
        # Unparseable, too large to parse, or well-formed but not a request object (an array
        # holding one, say): the member in its head still names the requester.
        match = _MEMBER_RES[name].search(bytes(view[:_RECOVER_PARSE_BYTES]))
        if match is None:
            return None
        candidate = orjson.loads(match.group(1))
        return candidate if valid(candidate) else None
    except Exception:
        return None
