"""Sparse matrices on the wire (CSR, CSC, COO; JSON and binary) and the algorithm option:
round trips, zero-copy decoding, and every bad input with its error code.

Messages are built by hand from the documented format (docs/wire-format.md, "Sparse
matrices"), not by the codec, so the codec is tested against the contract, not against itself.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
import scipy.sparse
from jsonschema import Draft202012Validator

from schemas import ContractError, DecodeLimits, Encoding, ErrorCode, SvdRequestMeta, codec
from schemas.export import SCHEMA_DIR
from schemas.sparse import SparseMatrix
from tests.support.sparse import random_sparse
from tests.unit.schemas.builders import JSON
from tests.unit.schemas.test_schemas_contract_files import (
    _examples,
    _kcat_producer_args,
    _printf_bytes,
)

Message = tuple[bytes, list[tuple[str, bytes]]]
BINARY = [("content-type", b"application/vnd.svd.binary")]

# A = [[1, 0, 2, 0],
#      [0, 0, 3, 0],
#      [4, 5, 0, 6]]
DENSE = np.array([[1, 0, 2, 0], [0, 0, 3, 0], [4, 5, 0, 6]], dtype=np.float64)
ARRAYS: dict[str, dict[str, list[float] | list[int]]] = {
    "csr": {"data": [1, 2, 3, 4, 5, 6], "indices": [0, 2, 2, 0, 1, 3], "indptr": [0, 2, 3, 6]},
    "csc": {"data": [1, 4, 5, 2, 3, 6], "indices": [0, 2, 2, 0, 1, 2], "indptr": [0, 2, 3, 5, 6]},
    "coo": {"data": [1, 2, 3, 4, 5, 6], "row": [0, 0, 1, 2, 2, 2], "col": [0, 2, 2, 0, 1, 3]},
}
NAMES = {"csr": ("indices", "indptr"), "csc": ("indices", "indptr"), "coo": ("row", "col")}


def head(fmt: str = "csr", options: Any = None, **overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema_version": 1,
        "request_id": "sp-1",
        "options": {"k": 2} if options is None else options,
        "matrix": {"format": fmt, "shape": [3, 4], "dtype": "float64"},
    }
    obj.update(overrides)
    return obj


def sparse_json(
    fmt: str = "csr", *, drop: tuple[str, ...] = (), options: Any = None, **arrays: Any
) -> Message:
    obj = head(fmt, options)
    given = {**ARRAYS.get(fmt, ARRAYS["csr"]), **arrays}
    obj["matrix"].update({k: v for k, v in given.items() if k not in drop})
    return orjson.dumps(obj), list(JSON)


def sparse_binary(
    fmt: str = "csr",
    *,
    dtype: str = "float64",
    index_dtype: str = "int32",
    arrays: dict[str, Any] | None = None,
    matrix: dict[str, Any] | None = None,
    value: bytes | None = None,
    order: tuple[str, ...] | None = None,
    **fields: Any,
) -> Message:
    """Arrays back to back in ``order`` (default: data first), described in svd-meta."""
    wire = {"float32": "<f4", "float64": "<f8"}.get(dtype, "<f8")
    index = {"int32": "<i4", "int64": "<i8"}.get(index_dtype, "<i4")
    given = {**ARRAYS[fmt], **(arrays or {})}
    parts = {
        name: np.asarray(values, dtype=wire if name == "data" else index).tobytes()
        for name, values in given.items()
    }
    offset, ranges = 0, {}
    for name in order or tuple(parts):
        ranges[name] = {"offset": offset, "nbytes": len(parts[name])}
        offset += len(parts[name])
    obj = head(fmt, **fields)
    obj["matrix"].update(
        {"dtype": dtype, "index_dtype": index_dtype, "nnz": len(given["data"]), **ranges}
    )
    obj["matrix"].update(matrix or {})
    body = b"".join(parts[name] for name in order or tuple(parts))
    return (body if value is None else value), [*BINARY, ("svd-meta", orjson.dumps(obj))]


def json_matrix(**matrix: Any) -> Message:
    """A JSON request with exactly this matrix object."""
    return orjson.dumps(head(matrix=matrix)), list(JSON)


def decoded(message: Message, limits: DecodeLimits | None = None) -> codec.DecodedRequest:
    value, headers = message
    return codec.decode_request(value, headers, limits)


def rejected(message: Message, limits: DecodeLimits | None = None) -> ContractError:
    with pytest.raises(ContractError) as info:
        decoded(message, limits)
    return info.value


# --- what decodes --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("maker", [sparse_json, sparse_binary], ids=["json", "binary"])
def test_the_documented_formats_decode(fmt: str, maker: Any) -> None:
    request = decoded(maker(fmt))
    matrix = request.matrix
    assert isinstance(matrix, SparseMatrix)
    assert (matrix.format, matrix.shape, matrix.nnz) == (fmt, (3, 4), 6)
    assert request.meta.matrix.shape == [3, 4] and request.meta.options.k == 2
    np.testing.assert_array_equal(matrix.toarray(), DENSE)
    np.testing.assert_array_equal(matrix.to_scipy().toarray(), DENSE)
    assert not matrix.data.flags.writeable
    assert not any(a.flags.writeable for a in matrix.index_arrays)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_binary_arrays_are_views_of_the_value(fmt: str) -> None:
    value, headers = sparse_binary(fmt, index_dtype="int64")
    received = bytearray(value)  # as the Kafka client hands it over
    matrix = codec.decode_request(received, headers).matrix
    assert isinstance(matrix, SparseMatrix)
    buffer = np.frombuffer(received, dtype=np.uint8)
    for array in (matrix.data, *matrix.index_arrays):
        assert np.shares_memory(array, buffer)
    assert matrix.index_arrays[0].dtype == np.dtype("<i8")


def test_binary_arrays_may_come_in_any_order_and_alignment() -> None:
    # indptr first, then float32 data (24 bytes), then indices: nothing is aligned to 8.
    request = decoded(sparse_binary("csr", dtype="float32", order=("indptr", "data", "indices")))
    assert isinstance(request.matrix, SparseMatrix)
    np.testing.assert_array_equal(request.matrix.toarray(), DENSE.astype(np.float32))


def test_unsorted_and_repeated_entries_are_accepted() -> None:
    # Row 2 written out of order, and A[0, 0] = 1 stored as 0.25 + 0.75.
    message = sparse_json(
        "csr",
        data=[0.25, 2, 0.75, 3, 6, 4, 5],
        indices=[0, 2, 0, 2, 3, 0, 1],
        indptr=[0, 3, 4, 7],
    )
    matrix = decoded(message).matrix
    assert isinstance(matrix, SparseMatrix) and matrix.nnz == 7
    np.testing.assert_array_equal(matrix.toarray(), DENSE)
    np.testing.assert_array_equal(matrix.to_scipy().toarray(), DENSE)


def test_indices_written_as_integral_floats_are_integers() -> None:
    # JSON has one number type: 2.0 is the integer 2 there, as for JSON Schema's "integer".
    message = sparse_json("csr", indices=[0.0, 2, 2e0, 0, 1, 3], indptr=[0, 2.0, 3, 6])
    matrix = decoded(message).matrix
    assert isinstance(matrix, SparseMatrix)
    assert [a.dtype for a in matrix.index_arrays] == [np.dtype("<i4")] * 2
    np.testing.assert_array_equal(matrix.toarray(), DENSE)
    value, headers = sparse_binary("coo")
    meta = orjson.loads(dict(headers)["svd-meta"])
    meta["matrix"]["nnz"] = 6.0
    meta["matrix"]["row"] = {k: float(v) for k, v in meta["matrix"]["row"].items()}
    matrix = decoded((value, [*BINARY, ("svd-meta", orjson.dumps(meta))])).matrix
    np.testing.assert_array_equal(matrix.toarray(), DENSE)


def test_empty_rows_and_no_entries_at_all() -> None:
    zero = sparse_json("csr", data=[], indices=[], indptr=[0, 0, 0, 0])
    matrix = decoded(zero).matrix
    assert isinstance(matrix, SparseMatrix) and matrix.nnz == 0
    assert not matrix.toarray().any()
    assert decoded(sparse_binary("coo", arrays={"data": [], "row": [], "col": []})).matrix.nnz == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_through_the_codec(encoding: Encoding, fmt: str, dtype: type) -> None:
    rng = np.random.default_rng(1)
    matrix = random_sparse(rng, (9, 7), fmt=fmt, dtype=dtype, index_dtype=np.int64)
    meta = SvdRequestMeta(
        request_id="rt-1", options={"k": 3, "algorithm": "lobpcg"}, matrix=matrix.spec()
    )
    message = codec.encode_request(meta, matrix, encoding)
    back = codec.decode_request(message.value, message.headers)
    assert back.encoding is encoding and back.meta.options.algorithm == "lobpcg"
    assert isinstance(back.matrix, SparseMatrix) and back.matrix.format == fmt
    assert back.matrix.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.matrix.toarray(), matrix.toarray())


def test_from_scipy_and_the_encoder_refuses_a_wrong_description() -> None:
    a = scipy.sparse.random_array((5, 4), density=0.5, rng=np.random.default_rng(2))
    for fmt in ("csr", "csc", "coo"):
        matrix = SparseMatrix.from_scipy(a.asformat(fmt))
        np.testing.assert_array_equal(matrix.toarray(), a.toarray())
    other = SparseMatrix.from_scipy(scipy.sparse.csr_array(np.eye(5, 4)))
    meta = SvdRequestMeta(request_id="r", options={"k": 1}, matrix=matrix.spec())
    with pytest.raises(ValueError, match="does not describe"):
        codec.encode_request(meta, other)
    with pytest.raises(ValueError, match="csr, csc or coo"):
        SparseMatrix.from_scipy(a.tobsr())


def test_encoding_checks_the_matrix_like_the_service() -> None:
    bad = SparseMatrix(
        "csr", (2, 2), np.array([1.0]), (np.array([5], np.int32), np.array([0, 1, 1], np.int32))
    )
    meta = SvdRequestMeta(request_id="r", options={"k": 1}, matrix=bad.spec())
    with pytest.raises(ContractError) as info:
        codec.encode_request(meta, bad, Encoding.BINARY)
    assert info.value.code is ErrorCode.INVALID_SPARSE


# --- every bad input, with its code ---------------------------------------------------------

CASES: dict[str, tuple[Message, ErrorCode]] = {
    # --- fields (the models)
    "unknown format": (sparse_json("bsr"), ErrorCode.INVALID_SCHEMA),
    "format not a string": (sparse_json(fmt=1), ErrorCode.INVALID_SCHEMA),  # type: ignore[arg-type]
    "csr without indptr": (sparse_json("csr", drop=("indptr",)), ErrorCode.INVALID_SCHEMA),
    "csr with row and col": (sparse_json("csr", row=[0], col=[0]), ErrorCode.INVALID_SCHEMA),
    "coo without col": (sparse_json("coo", drop=("col",)), ErrorCode.INVALID_SCHEMA),
    "coo with indptr": (sparse_json("coo", indptr=[0, 6]), ErrorCode.INVALID_SCHEMA),
    "json without data": (sparse_json("csc", drop=("data",)), ErrorCode.INVALID_SCHEMA),
    "indices not an array": (sparse_json("csr", indices=3), ErrorCode.INVALID_SCHEMA),
    "indices with a fraction": (
        sparse_json("csr", indices=[0, 2, 2.5, 0, 1, 3]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "row with a boolean": (
        sparse_json("coo", row=[0, 0, 1, 2, 2, True]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "data with a string": (
        sparse_json("csr", data=[1, 2, 3, 4, 5, "6"]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "index beyond 64 bits": (  # orjson reads such a number as a float, an integral one
        (
            sparse_json("csr", indices=[0, 2, 2, 0, 1, 987654321])[0].replace(
                b"987654321", str(2**70).encode()
            ),
            list(JSON),
        ),
        ErrorCode.INVALID_SPARSE,
    ),
    "index of 1e300": (sparse_json("coo", row=[0, 0, 1, 2, 2, 1e300]), ErrorCode.INVALID_SPARSE),
    "json with binary fields": (
        json_matrix(**head()["matrix"], nnz=6, **ARRAYS["csr"]),
        ErrorCode.INVALID_SCHEMA,
    ),
    "binary without the indptr range": (
        sparse_binary("csr", matrix={"indptr": None}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "binary with inline data": (
        sparse_binary("csr", matrix={"data": [1, 2, 3, 4, 5, 6]}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "binary negative offset": (
        sparse_binary("csr", matrix={"data": {"offset": -1, "nbytes": 48}}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "binary nnz missing": (
        sparse_binary("csr", matrix={"nnz": None}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "sparse without k": (sparse_json("csr", options={}), ErrorCode.INVALID_SCHEMA),
    "sparse with algorithm dense": (
        sparse_json("csr", options={"k": 2, "algorithm": "dense"}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "unknown algorithm": (
        sparse_json("csr", options={"k": 2, "algorithm": "jacobi"}),
        ErrorCode.INVALID_SCHEMA,
    ),
    "k above min(rows, cols)": (sparse_json("csr", options={"k": 4}), ErrorCode.INVALID_SCHEMA),
    "unknown option": (
        sparse_json("csr", options={"k": 2, "tolerance": 1e-3}),
        ErrorCode.UNKNOWN_OPTION,
    ),
    "index dtype int16": (sparse_binary("csr", index_dtype="int16"), ErrorCode.UNSUPPORTED_DTYPE),
    "value dtype int32": (sparse_binary("csr", dtype="int32"), ErrorCode.UNSUPPORTED_DTYPE),
    "shape of one number": (
        json_matrix(format="csr", shape=[3], dtype="float64", **ARRAYS["csr"]),
        ErrorCode.INVALID_SHAPE,
    ),
    "zero columns": (
        sparse_binary("coo", matrix={"shape": [3, 0]}),
        ErrorCode.INVALID_SHAPE,
    ),
    # --- lengths
    "indices too short": (sparse_json("csr", indices=[0, 2, 2, 0, 1]), ErrorCode.SHAPE_MISMATCH),
    "indptr one too long": (
        sparse_json("csr", indptr=[0, 2, 3, 6, 6]),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "csc indptr sized for rows": (
        sparse_json("csc", indptr=[0, 2, 3, 6]),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "coo col shorter than data": (
        sparse_json("coo", col=[0, 2, 2, 0, 1]),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "binary data nbytes not nnz * 8": (
        sparse_binary("csr", matrix={"nnz": 5}),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "binary arrays overlap": (
        sparse_binary("csr", matrix={"indices": {"offset": 40, "nbytes": 24}}),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "binary value too short": (
        sparse_binary("csr", value=bytes(87)),
        ErrorCode.SHAPE_MISMATCH,
    ),
    "binary value too long": (
        sparse_binary("csr", value=bytes(89)),
        ErrorCode.SHAPE_MISMATCH,
    ),
    # --- structure
    "indptr not starting at 0": (
        sparse_json("csr", indptr=[1, 2, 3, 6]),
        ErrorCode.INVALID_SPARSE,
    ),
    "indptr not ending at nnz": (
        sparse_json("csr", indptr=[0, 2, 3, 5]),
        ErrorCode.INVALID_SPARSE,
    ),
    "indptr decreasing": (sparse_json("csr", indptr=[0, 3, 2, 6]), ErrorCode.INVALID_SPARSE),
    "column index equal to cols": (
        sparse_json("csr", indices=[0, 2, 2, 0, 1, 4]),
        ErrorCode.INVALID_SPARSE,
    ),
    "negative index": (sparse_json("csc", indices=[0, 2, -1, 0, 1, 2]), ErrorCode.INVALID_SPARSE),
    "index past int32 in json": (
        sparse_json("csr", indices=[0, 2, 2, 0, 1, 2**40]),
        ErrorCode.INVALID_SPARSE,
    ),
    "coo row out of bounds": (
        sparse_json("coo", row=[0, 0, 1, 2, 2, 3]),
        ErrorCode.INVALID_SPARSE,
    ),
    "coo col negative": (sparse_json("coo", col=[0, 2, 2, 0, -1, 3]), ErrorCode.INVALID_SPARSE),
    "binary index out of bounds": (
        sparse_binary("csr", index_dtype="int64", arrays={"indices": [0, 2, 2, 0, 1, 9]}),
        ErrorCode.INVALID_SPARSE,
    ),
    "binary indptr decreasing": (
        sparse_binary("csc", arrays={"indptr": [0, 2, 1, 5, 6]}),
        ErrorCode.INVALID_SPARSE,
    ),
    # --- values
    "json NaN token": (
        (sparse_json("csr")[0].replace(b"[1,2,3,", b"[NaN,2,3,"), list(JSON)),
        ErrorCode.NON_FINITE,
    ),
    "json beyond float32": (
        json_matrix(
            format="coo",
            shape=[3, 4],
            dtype="float32",
            **{**ARRAYS["coo"], "data": [1, 2, 3, 4, 5, 1e39]},
        ),
        ErrorCode.NON_FINITE,
    ),
    "binary infinity": (
        sparse_binary("coo", arrays={"data": [1, 2, 3, np.inf, 5, 6]}),
        ErrorCode.NON_FINITE,
    ),
}


@pytest.mark.parametrize(("message", "code"), list(CASES.values()), ids=list(CASES))
def test_rejected_with_code(message: Message, code: ErrorCode) -> None:
    error = rejected(message)
    assert error.code is code, error.message
    # Every rejection names the request, except before the JSON could be parsed at all.
    assert error.request_id == (
        None if code is ErrorCode.NON_FINITE and b"NaN" in message[0] else "sp-1"
    )
    assert error.retryable is False
    assert ".sparse" not in error.message and ".dense" not in error.message  # no union tags


def test_messages_say_what_is_wrong() -> None:
    assert "indptr[2] = 2 is below indptr[1] = 3" in rejected(CASES["indptr decreasing"][0]).message
    assert (
        "indices[5] = 4 is outside 0..3" in rejected(CASES["column index equal to cols"][0]).message
    )
    assert "matrix.shape" in rejected(CASES["shape of one number"][0]).message
    assert "needs options.k" in rejected(CASES["sparse without k"][0]).message


# --- limits: from svd-meta alone, before the value is looked at --------------------------------


def empty_value(**matrix: Any) -> Message:
    # The value is empty: reading it before the limits would be SHAPE_MISMATCH, not LIMIT_EXCEEDED.
    return sparse_binary("csr", value=b"", matrix=matrix)


@pytest.mark.parametrize(
    ("message", "limits"),
    [
        (empty_value(nnz=16_777_217, data={"offset": 0, "nbytes": 8 * 16_777_217}), DecodeLimits()),
        (empty_value(nnz=100), DecodeLimits(max_nnz=99)),
        (empty_value(shape=[16_385, 4]), DecodeLimits()),
        (empty_value(shape=[3, 2**40]), DecodeLimits()),
        (empty_value(), DecodeLimits(max_matrix_bytes=87)),  # 48 + 24 + 16 bytes
        # U and Vt of k = 2: (16384 * 2 * 2 + 2) * 8 = 524304 bytes
        (empty_value(shape=[16_384, 16_384]), DecodeLimits(max_result_bytes=524_303)),
    ],
    ids=["nnz", "nnz configured", "rows", "cols", "matrix bytes", "result bytes"],
)
def test_limits_before_the_value_is_read(message: Message, limits: DecodeLimits) -> None:
    assert rejected(message, limits).code is ErrorCode.LIMIT_EXCEEDED


def test_a_sparse_matrix_is_not_held_to_the_dense_element_limit() -> None:
    # 3 x 4 has 12 elements; a dense matrix would be refused at max_elements=11.
    limits = DecodeLimits(max_elements=11, max_matrix_bytes=88)
    assert isinstance(decoded(sparse_binary("csr"), limits).matrix, SparseMatrix)
    assert decoded(sparse_json("coo"), DecodeLimits(max_nnz=6)).matrix.nnz == 6  # type: ignore[union-attr]


# --- the JSON Schemas describe the same ---------------------------------------------------------


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMA_DIR / name).read_text("utf-8")))


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_valid_sparse_requests_conform_to_the_schemas(fmt: str) -> None:
    _validator("svd-request.json").validate(orjson.loads(sparse_json(fmt)[0]))
    meta = dict(sparse_binary(fmt)[1])["svd-meta"]
    _validator("svd-request-meta.json").validate(orjson.loads(meta))


_SCHEMA_REJECTS = [
    "unknown format",
    "format not a string",
    "csr without indptr",
    "csr with row and col",
    "coo without col",
    "coo with indptr",
    "json without data",
    "indices not an array",
    "row with a boolean",
    "indices with a fraction",
    "negative index",
    "coo col negative",
    "data with a string",
    "json with binary fields",
    "binary without the indptr range",
    "binary with inline data",
    "binary negative offset",
    "binary nnz missing",
    "unknown algorithm",
    "unknown option",
    "index dtype int16",
    "value dtype int32",
    "shape of one number",
    "zero columns",
]


@pytest.mark.parametrize("case", _SCHEMA_REJECTS)
def test_the_schemas_reject_what_they_can_express(case: str) -> None:
    (value, headers), _ = CASES[case]
    meta = dict(headers).get("svd-meta")
    instance = orjson.loads(meta if meta is not None else value)
    schema = _validator("svd-request-meta.json" if meta is not None else "svd-request.json")
    assert not schema.is_valid(instance)


# --- the examples in docs/wire-format.md are real messages --------------------------------------


def test_documented_sparse_json_request_decodes() -> None:
    request = decoded((_examples()["sparse-request.json"].encode(), list(JSON)))
    assert request.meta.request_id == "demo-0004" and request.meta.options.k == 2
    assert isinstance(request.matrix, SparseMatrix) and request.matrix.format == "csr"
    np.testing.assert_array_equal(request.matrix.toarray(), DENSE)


def test_documented_sparse_binary_request_decodes_and_kcat_sends_it() -> None:
    examples = _examples()
    value = _printf_bytes(examples["kcat-sparse"])
    documented = (
        "0000803f 00000040 00004040 00008040 0000a040 0000c040"
        " 00000000 00000000 01000000 02000000 02000000 02000000"
        " 00000000 02000000 02000000 00000000 01000000 03000000"
    )
    assert value == bytes.fromhex(documented)
    meta = examples["sparse-request-meta.json"].strip().encode()
    request = decoded((value, [*BINARY, ("svd-meta", meta)]))
    assert isinstance(request.matrix, SparseMatrix) and request.matrix.format == "coo"
    np.testing.assert_array_equal(request.matrix.toarray(), DENSE.astype(np.float32))
    argv, headers, file = _kcat_producer_args(examples["kcat-sparse"])
    assert file == "sparse.bin" and argv[argv.index("-k") + 1] == "demo-0005"
    assert decoded((value, headers)).meta == request.meta


def test_the_asyncapi_request_examples_decode() -> None:
    import yaml

    document = yaml.safe_load((SCHEMA_DIR.parent / "asyncapi.yaml").read_text("utf-8"))
    examples = document["components"]["messages"]["SvdRequestJson"]["examples"]
    kinds = {}
    for example in examples:
        request = decoded((orjson.dumps(example["payload"]), list(JSON)))
        kinds[example["name"]] = type(request.matrix).__name__
    assert kinds == {"small": "ndarray", "sparse": "SparseMatrix", "stored": "NoneType"}
