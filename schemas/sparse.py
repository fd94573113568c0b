"""Sparse input matrices (CSR, CSC, COO) on the wire: decoding, validation and encoding.

A request whose ``matrix`` has a ``format`` is sparse (docs/wire-format.md, "Sparse matrices").
In JSON its arrays are inline (``data``, then ``indices`` and ``indptr``, or ``row`` and
``col``); in the binary encoding ``svd-meta`` gives ``index_dtype``, ``nnz`` and where each array
lies in the value, and the arrays are viewed in place (``numpy.frombuffer``), never copied.

Checks, in this order, each with its code; nothing is allocated before the limits passed:

1. the fields (the models): ``INVALID_SCHEMA`` for missing, extra or mistyped arrays;
2. the limits, from the meta alone: rows, cols, nnz, the arrays' bytes, the result's bytes
   (``LIMIT_EXCEEDED``);
3. lengths: data, indices, row and col hold nnz entries, indptr rows+1 (csr) or cols+1 (csc);
   in binary each ``nbytes`` must match and the arrays must fill the value exactly, without
   overlapping (``SHAPE_MISMATCH``);
4. structure (``INVALID_SPARSE``): indptr starts at 0, never decreases and ends at nnz; every
   index lies inside the shape;
5. finiteness of the values (``NON_FINITE``).

Repeated coordinates are summed and indices need not be sorted (scipy's rules): the worker
settles both on its own copy, so decoding stays a few O(nnz) passes without allocating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import orjson

from schemas._arrays import WIRE_DTYPES, FloatArray, check_finite, dtype_name
from schemas._validation import (
    check_schema_version,
    check_structure,
    peek_request_id,
    validate,
)
from schemas.errors import ContractError, ErrorCode
from schemas.headers import CONTENT_TYPE, CONTENT_TYPES, SVD_META, SVD_SCHEMA_VERSION, Encoding
from schemas.limits import DecodeLimits, result_limit
from schemas.models import (
    INDEX_ITEMSIZE,
    ITEMSIZE,
    SPARSE_INDEX_ARRAYS,
    ByteRange,
    IndexDtype,
    SparseBinaryMatrix,
    SparseFormat,
    SparseMatrixSpec,
    SvdRequestMeta,
)
from schemas.records import EncodedMessage

__all__ = [
    "SparseMatrix",
    "decode_binary",
    "decode_json",
    "encode_request",
    "is_sparse",
]

IntArray: TypeAlias = npt.NDArray[np.integer[Any]]

INDEX_WIRE_DTYPES: dict[str, np.dtype[Any]] = {"int32": np.dtype("<i4"), "int64": np.dtype("<i8")}
_ARRAY_FIELDS: Final = ("data", "indices", "indptr", "row", "col")
_INT32_MAX: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class SparseMatrix:
    """A validated sparse matrix as received: read-only arrays, for binary views of the value.

    ``index_arrays`` is ``(indices, indptr)`` for csr and csc, ``(row, col)`` for coo. Entries
    may be unsorted and repeated (repeats add up). ``shape``, ``dtype``, ``ndim`` and
    ``astype`` mirror numpy's, so code that only sizes a matrix takes either kind.
    """

    format: SparseFormat
    shape: tuple[int, int]
    data: FloatArray
    index_arrays: tuple[IntArray, IntArray]

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the value carries in the binary encoding)."""
        return int(self.data.nbytes + sum(a.nbytes for a in self.index_arrays))

    @property
    def index_names(self) -> tuple[str, str]:
        return SPARSE_INDEX_ARRAYS[self.format]

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The arrays by their wire names, data first."""
        names = self.index_names
        return {"data": self.data, names[0]: self.index_arrays[0], names[1]: self.index_arrays[1]}

    def astype(self, dtype: npt.DTypeLike) -> SparseMatrix:
        """The same matrix with its values converted (the index arrays are shared)."""
        return SparseMatrix(self.format, self.shape, self.data.astype(dtype), self.index_arrays)

    def spec(self) -> SparseBinaryMatrix:
        """The svd-meta description of this matrix, arrays back to back in ``arrays()`` order."""
        wire = _to_wire(self)
        index_dtype = wire.index_arrays[0].dtype
        ranges: dict[str, ByteRange] = {}
        offset = 0
        for name, array in wire.arrays().items():
            ranges[name] = ByteRange(offset=offset, nbytes=array.nbytes)
            offset += array.nbytes
        return SparseBinaryMatrix(
            format=self.format,
            shape=list(self.shape),
            dtype=dtype_name(wire.data),
            index_dtype="int64" if index_dtype.itemsize == 8 else "int32",
            nnz=self.nnz,
            **ranges,
        )

    @classmethod
    def from_scipy(cls, matrix: Any) -> SparseMatrix:
        """From a scipy.sparse array or matrix in csr, csc or coo format (no copy if possible)."""
        fmt = getattr(matrix, "format", None)
        if fmt in ("csr", "csc"):
            index_arrays = (matrix.indices, matrix.indptr)
        elif fmt == "coo":
            index_arrays = (matrix.row, matrix.col)
        else:
            raise ValueError(f"expected a scipy.sparse csr, csc or coo matrix, got {fmt!r}")
        m, n = (int(d) for d in matrix.shape)
        return cls(fmt, (m, n), np.asarray(matrix.data), index_arrays)

    def to_scipy(self) -> Any:
        """A scipy.sparse array of this format sharing the arrays (read-only views stay so)."""
        import scipy.sparse

        first, second = self.index_arrays
        if self.format == "coo":
            return scipy.sparse.coo_array((self.data, (first, second)), shape=self.shape)
        kind = scipy.sparse.csr_array if self.format == "csr" else scipy.sparse.csc_array
        return kind((self.data, first, second), shape=self.shape)

    def toarray(self) -> FloatArray:
        """The dense matrix (repeated entries summed). For tests and small matrices only."""
        dense = np.zeros(self.shape, dtype=self.data.dtype.newbyteorder("="))
        first, second = (a.astype(np.intp) for a in self.index_arrays)
        if self.format == "coo":
            rows, cols = first, second
        else:
            major = np.repeat(np.arange(second.shape[0] - 1), np.diff(second))
            rows, cols = (major, first) if self.format == "csr" else (first, major)
        np.add.at(dense, (rows, cols), self.data)
        return dense


def is_sparse(matrix: object) -> bool:
    """Whether a parsed request's ``matrix`` object describes a sparse matrix."""
    return type(matrix) is dict and "format" in matrix


class _SparseJsonHead(SvdRequestMeta):
    """A JSON sparse request once its arrays were taken out."""

    matrix: SparseMatrixSpec


# ----------------------------------------------------------------------------------- decoding


def decode_json(obj: dict[str, Any], limits: DecodeLimits) -> tuple[SvdRequestMeta, SparseMatrix]:
    """A parsed JSON request whose matrix is sparse (``is_sparse``)."""
    matrix: dict[str, Any] = obj["matrix"]
    # The bulk arrays leave the tree before the depth walk, as a dense matrix's data does.
    arrays: dict[str, Any] = {name: matrix.pop(name) for name in _ARRAY_FIELDS if name in matrix}
    check_structure(obj, limits, "value")
    request_id = peek_request_id(obj)
    check_schema_version(obj, "value", request_id)
    meta = validate(_SparseJsonHead, obj, "value", request_id)
    spec = meta.matrix
    wanted: tuple[str, ...] = ("data", *SPARSE_INDEX_ARRAYS[spec.format])
    if set(arrays) != set(wanted):
        missing = [n for n in wanted if n not in arrays]
        extra = [n for n in arrays if n not in wanted]
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"value: a {spec.format} matrix has {', '.join(wanted)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not expected: {', '.join(extra)}" if extra else ""),
            request_id=request_id,
        )
    for name in wanted:
        if type(arrays[name]) is not list:
            kind = "numbers" if name == "data" else "integers"
            raise ContractError(
                ErrorCode.INVALID_SCHEMA,
                f"matrix.{name} must be an array of {kind}",
                request_id=request_id,
            )
    nnz = len(arrays["data"])
    rows, cols = spec.shape
    index_dtype: IndexDtype = "int32" if max(rows, cols, nnz) < _INT32_MAX else "int64"
    _check_limits(meta, spec, nnz, index_dtype, limits)
    data = arrays["data"]
    _only(data, (float, int), "numbers", request_id, "data")
    first_name, second_name = SPARSE_INDEX_ARRAYS[spec.format]
    first = _integers(arrays[first_name], request_id, first_name)
    second = _integers(arrays[second_name], request_id, second_name)
    lengths = _expected_lengths(spec.format, spec.shape, nnz)
    for name, given in ((first_name, first), (second_name, second)):
        if len(given) != lengths[name]:
            raise _length_error(spec, name, len(given), lengths[name], request_id)
    with np.errstate(over="ignore"):  # beyond float32's range -> inf -> NON_FINITE below
        values = np.array(data, dtype=WIRE_DTYPES[spec.dtype])
    try:
        index_arrays = (_index_array(first, index_dtype), _index_array(second, index_dtype))
    except OverflowError as exc:
        raise ContractError(
            ErrorCode.INVALID_SPARSE,
            f"matrix: an index does not fit {index_dtype}, so it lies outside the shape {spec.shape}",
            request_id=request_id,
        ) from exc
    for array in (values, *index_arrays):
        array.flags.writeable = False
    sparse = SparseMatrix(spec.format, (rows, cols), values, index_arrays)
    _check_sparse(sparse, request_id)
    return meta, sparse


def check_stored(meta: SvdRequestMeta, nbytes: int, limits: DecodeLimits) -> None:
    """A stored sparse matrix's limits and layout against its object's size, before fetching."""
    spec = meta.matrix
    if not isinstance(spec, SparseBinaryMatrix):  # the discriminator guarantees it
        raise ContractError(ErrorCode.INVALID_SCHEMA, "matrix is not a stored sparse matrix")
    _check_limits(meta, spec, spec.nnz, spec.index_dtype, limits)
    _check_layout(spec, nbytes, meta.request_id, "the object (matrix.ref.nbytes)")


def decode_binary(
    view: memoryview, obj: dict[str, Any], limits: DecodeLimits
) -> tuple[SvdRequestMeta, SparseMatrix]:
    """A binary request whose svd-meta (parsed, ``obj``) describes a sparse matrix."""
    request_id = peek_request_id(obj)
    check_schema_version(obj, SVD_META, request_id)
    meta = validate(SvdRequestMeta, obj, SVD_META, request_id)
    spec = meta.matrix
    if not isinstance(spec, SparseBinaryMatrix):  # the discriminator guarantees it
        raise ContractError(ErrorCode.INVALID_SCHEMA, "svd-meta: matrix is not sparse")
    _check_limits(meta, spec, spec.nnz, spec.index_dtype, limits)
    ranges = _check_layout(spec, view.nbytes, request_id)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, (where, dtype, count) in ranges.items():
        array = np.frombuffer(view, dtype=dtype, count=count, offset=where.offset)
        array.flags.writeable = False
        arrays[name] = array
    first_name, second_name = SPARSE_INDEX_ARRAYS[spec.format]
    sparse = SparseMatrix(
        spec.format,
        (spec.rows, spec.cols),
        arrays["data"],
        (arrays[first_name], arrays[second_name]),
    )
    _check_sparse(sparse, request_id)
    return meta, sparse


def _only(
    value: list[Any], kinds: tuple[type, ...], what: str, request_id: str | None, name: str
) -> set[type]:
    """The types in value, which must all be among kinds."""
    # set(map(type, ...)) runs in C; bool is its own type, so true is not taken for 1.
    found = set(map(type, value))
    odd = found - set(kinds)
    if odd:
        names = ", ".join(sorted(t.__name__ for t in odd))
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"matrix.{name} must contain only {what}, found {names}",
            request_id=request_id,
        )
    return found


def _integers(value: list[Any], request_id: str | None, name: str) -> list[Any] | FloatArray:
    """An index array's integers: ints as given, or, when some were written as floats, all of
    them in a float64 array. JSON has one number type: 2.0 is the integer 2 there (and for JSON
    Schema's "integer"), while 2.5 is not an integer."""
    if float not in _only(value, (int, float), "integers", request_id, name):
        return value
    numbers = np.array(value, dtype=np.float64)
    fractional = np.trunc(numbers) != numbers
    if fractional.any():
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"matrix.{name} must contain only integers, found {numbers[fractional.argmax()]}",
            request_id=request_id,
        )
    return numbers


def _index_array(values: list[Any] | FloatArray, index_dtype: IndexDtype) -> IntArray:
    """Raises OverflowError for a value beyond the index dtype, whatever the input's kind."""
    dtype = INDEX_WIRE_DTYPES[index_dtype]
    if isinstance(values, list):
        return np.array(values, dtype=dtype)
    # A float beyond the range would be cast to garbage, not refused: check first. The bounds
    # compare exactly (info.max + 1 is a power of two, so float64 holds it).
    info = np.iinfo(dtype)
    if values.size and not (info.min <= values.min() and values.max() < info.max + 1):
        raise OverflowError(f"an index does not fit {index_dtype}")
    return values.astype(dtype)


def _check_limits(
    meta: SvdRequestMeta,
    spec: SparseMatrixSpec,
    nnz: int,
    index_dtype: IndexDtype,
    limits: DecodeLimits,
) -> None:
    """Limits of a sparse request, from its meta alone. The dense element limit (rows * cols)
    does not apply: the matrix is never densified."""
    rows, cols = spec.shape
    lengths = _expected_lengths(spec.format, spec.shape, nnz)
    matrix_bytes = nnz * ITEMSIZE[spec.dtype] + INDEX_ITEMSIZE[index_dtype] * (
        sum(lengths.values()) - nnz
    )
    checks = (
        ("rows", rows, limits.max_rows),
        ("cols", cols, limits.max_cols),
        ("nnz", nnz, limits.max_nnz),
        ("matrix bytes", matrix_bytes, limits.max_matrix_bytes),
        ("result bytes", meta.result_nbytes(), result_limit(meta.schema_version, limits)),
    )
    for name, actual, limit in checks:
        if actual > limit:
            raise ContractError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{name} {actual} exceeds the limit {limit} (sparse, shape {spec.shape}, "
                f"nnz {nnz}, {spec.dtype})",
                request_id=meta.request_id,
            )


def _expected_lengths(fmt: SparseFormat, shape: list[int], nnz: int) -> dict[str, int]:
    """Lengths of the arrays of a matrix with nnz entries (data included)."""
    rows, cols = shape
    if fmt == "coo":
        return {"data": nnz, "row": nnz, "col": nnz}
    return {"data": nnz, "indices": nnz, "indptr": (rows if fmt == "csr" else cols) + 1}


def _length_error(
    spec: SparseMatrixSpec, name: str, actual: int, wanted: int, request_id: str | None
) -> ContractError:
    rule = (
        f"{'rows' if spec.format == 'csr' else 'cols'} + 1 = {wanted}"
        if name == "indptr"
        else f"one per entry of data: {wanted}"
    )
    return ContractError(
        ErrorCode.SHAPE_MISMATCH,
        f"matrix.{name} has {actual} entries; a {spec.format} matrix of shape {spec.shape} "
        f"needs {rule}",
        request_id=request_id,
    )


def _check_layout(
    spec: SparseBinaryMatrix, size: int, request_id: str | None, what: str = "value"
) -> dict[str, tuple[ByteRange, np.dtype[Any], int]]:
    """Each array exactly sized, inside the value, none overlapping, nothing left over."""
    lengths = _expected_lengths(spec.format, spec.shape, spec.nnz)
    placed: dict[str, tuple[ByteRange, np.dtype[Any], int]] = {}
    for name, count in lengths.items():
        where: ByteRange | None = getattr(spec, name)
        assert where is not None  # the model requires the format's arrays
        dtype = WIRE_DTYPES[spec.dtype] if name == "data" else INDEX_WIRE_DTYPES[spec.index_dtype]
        needed = count * dtype.itemsize
        if where.nbytes != needed:
            raise ContractError(
                ErrorCode.SHAPE_MISMATCH,
                f"matrix.{name}: nbytes {where.nbytes}, but {count} entries of "
                f"{dtype.name} need {needed}",
                request_id=request_id,
            )
        placed[name] = (where, dtype, count)
    end = 0
    for name, (where, _, _) in sorted(placed.items(), key=lambda item: item[1][0].offset):
        if where.offset < end:
            raise ContractError(
                ErrorCode.SHAPE_MISMATCH,
                f"matrix.{name} overlaps another array",
                request_id=request_id,
            )
        end = where.offset + where.nbytes
    if end != size:
        raise ContractError(
            ErrorCode.SHAPE_MISMATCH,
            f"{what} is {size} bytes; the arrays described end at byte {end}",
            request_id=request_id,
        )
    return placed


def _check_sparse(matrix: SparseMatrix, request_id: str | None) -> None:
    """Structure (INVALID_SPARSE), then finite values (NON_FINITE). O(nnz), no large copies."""
    rows, cols = matrix.shape
    first, second = matrix.index_arrays
    if matrix.format == "coo":
        _check_bounds(first, rows, "row", request_id)
        _check_bounds(second, cols, "col", request_id)
    else:
        indptr, nnz = second, matrix.nnz
        major = "row" if matrix.format == "csr" else "column"
        if int(indptr[0]) != 0:
            raise _sparse_error(f"matrix.indptr[0] is {int(indptr[0])}; it must be 0", request_id)
        if int(indptr[-1]) != nnz:
            raise _sparse_error(
                f"matrix.indptr ends at {int(indptr[-1])}; it must end at nnz = {nnz}",
                request_id,
            )
        steps = np.diff(indptr)
        if steps.size and int(steps.min()) < 0:
            at = int(np.argmax(steps < 0))
            raise _sparse_error(
                f"matrix.indptr[{at + 1}] = {int(indptr[at + 1])} is below indptr[{at}] = "
                f"{int(indptr[at])}: it must never decrease ({major} {at} would have "
                f"{int(steps[at])} entries)",
                request_id,
            )
        minor = cols if matrix.format == "csr" else rows
        _check_bounds(first, minor, "indices", request_id)
    check_finite(matrix.data, "matrix.data", request_id)


def _check_bounds(index: IntArray, bound: int, name: str, request_id: str | None) -> None:
    if index.size == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= bound:
        at = int(np.argmax((index < 0) | (index >= bound)))
        raise _sparse_error(
            f"matrix.{name}[{at}] = {int(index[at])} is outside 0..{bound - 1}", request_id
        )


def _sparse_error(message: str, request_id: str | None) -> ContractError:
    return ContractError(ErrorCode.INVALID_SPARSE, message, request_id=request_id)


# ----------------------------------------------------------------------------------- encoding


def _to_wire(matrix: SparseMatrix) -> SparseMatrix:
    """Little-endian float32/float64 values and int32/int64 indices (copies only if needed)."""
    data = np.ascontiguousarray(matrix.data, dtype=WIRE_DTYPES[dtype_name(matrix.data)])
    first, second = matrix.index_arrays
    wide = any(a.dtype.itemsize > 4 for a in matrix.index_arrays)
    for a in matrix.index_arrays:
        if a.dtype.kind not in "iu" or a.ndim != 1:
            raise ContractError(
                ErrorCode.INVALID_SPARSE, f"index arrays must be 1-D integers, got {a.dtype}"
            )
    index = INDEX_WIRE_DTYPES["int64" if wide else "int32"]
    return SparseMatrix(
        matrix.format,
        matrix.shape,
        data.reshape(-1),
        (np.ascontiguousarray(first, dtype=index), np.ascontiguousarray(second, dtype=index)),
    )


def encode_request(
    meta: SvdRequestMeta, matrix: SparseMatrix, encoding: Encoding = Encoding.JSON
) -> EncodedMessage:
    """Encode a sparse request. ``meta.matrix`` must be ``matrix.spec()``.

    The matrix is checked as the service would check it (ContractError with its code), so a
    request that encodes is one the service accepts as far as the matrix goes.
    """
    wire = _to_wire(matrix)
    if meta.matrix != matrix.spec():
        raise ValueError(f"meta.matrix {meta.matrix} does not describe the sparse matrix given")
    _check_sparse(wire, meta.request_id)
    body = meta.model_dump(mode="json", exclude_none=True)
    version = (SVD_SCHEMA_VERSION, str(meta.schema_version).encode())
    headers = [(CONTENT_TYPE, CONTENT_TYPES[encoding].encode()), version]
    arrays = wire.arrays()
    if encoding is Encoding.JSON:
        inline: dict[str, Any] = {k: body["matrix"][k] for k in ("format", "shape", "dtype")}
        inline.update({name: a.tolist() for name, a in arrays.items()})
        body["matrix"] = inline
        value = orjson.dumps(body)
    else:
        headers.append((SVD_META, orjson.dumps(body)))
        value = b"".join(a.tobytes() for a in arrays.values())
    return EncodedMessage(key=meta.request_id.encode(), value=value, headers=headers)
