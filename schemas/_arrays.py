"""numpy <-> wire conversions. Arrays on the wire are IEEE 754 little-endian, row-major."""

from __future__ import annotations

from math import prod
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from schemas._validation import JSON_TYPE_NAMES
from schemas.errors import ContractError, ErrorCode
from schemas.models import Dtype

FloatArray: TypeAlias = npt.NDArray[np.floating[Any]]

WIRE_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}

# Bounds the temporary boolean array of the finiteness check (1 byte per element checked).
_FINITE_CHUNK = 1 << 20


def dtype_name(array: np.ndarray[Any, Any]) -> Dtype:
    # By kind and size, so a big-endian float64 is still float64 (to_wire swaps it).
    if array.dtype.kind == "f" and array.dtype.itemsize == 8:
        return "float64"
    if array.dtype.kind == "f" and array.dtype.itemsize == 4:
        return "float32"
    raise ContractError(
        ErrorCode.UNSUPPORTED_DTYPE, f"dtype {array.dtype} is not supported; use float32 or float64"
    )


def from_json_numbers(
    data: object, shape: list[int], dtype: Dtype, what: str, request_id: str | None = None
) -> FloatArray:
    if type(data) is not list:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"{what}.data must be an array of numbers",
            request_id=request_id,
        )
    # numpy would quietly turn true into 1.0, "2" into 2.0 and null into NaN; only numbers pass.
    # orjson yields int and float only for JSON numbers (huge integers become float).
    odd = set(map(type, data)) - {float, int}
    if odd:
        names = ", ".join(sorted(JSON_TYPE_NAMES.get(t, t.__name__) for t in odd))
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"{what}.data must contain only numbers, found {names}",
            request_id=request_id,
        )
    expected = prod(shape)
    if len(data) != expected:
        raise ContractError(
            ErrorCode.SHAPE_MISMATCH,
            f"{what}.data has {len(data)} numbers; shape {shape} needs {expected}",
            request_id=request_id,
        )
    # Converting straight to the target dtype avoids a float64 temporary for float32 data;
    # values beyond float32 range become inf here and are reported by check_finite.
    with np.errstate(over="ignore"):
        array = np.array(data, dtype=WIRE_DTYPES[dtype]).reshape(shape)
    check_finite(array, what, request_id)
    return array


def from_buffer(buffer: memoryview, offset: int, shape: list[int], dtype: Dtype) -> FloatArray:
    """A read-only view of the bytes, never a copy. Bounds are the caller's to check."""
    count = prod(shape)
    array = np.frombuffer(buffer, dtype=WIRE_DTYPES[dtype], count=count, offset=offset)
    # A bytearray or writable memoryview would give a writable view of the received buffer.
    array.flags.writeable = False
    return array.reshape(shape)


def check_finite(array: FloatArray, what: str, request_id: str | None = None) -> None:
    flat = array.reshape(-1)
    for start in range(0, flat.size, _FINITE_CHUNK):
        ok = np.isfinite(flat[start : start + _FINITE_CHUNK])
        if not ok.all():
            index = start + int(np.argmin(ok))
            where = np.unravel_index(index, array.shape)
            raise ContractError(
                ErrorCode.NON_FINITE,
                f"{what} has a non-finite value ({flat[index]}) at index {list(map(int, where))}",
                request_id=request_id,
            )


def to_wire(array: np.ndarray[Any, Any], what: str, ndim: tuple[int, ...]) -> FloatArray:
    """A C-contiguous little-endian float32/float64 array (a copy only if needed)."""
    if array.ndim not in ndim or array.size == 0:
        raise ContractError(
            ErrorCode.INVALID_SHAPE,
            f"{what} must be non-empty with ndim in {ndim}, got {array.shape}",
        )
    name = dtype_name(array)
    wire = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name])
    check_finite(wire, what)
    return wire
