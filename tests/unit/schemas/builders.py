"""Raw wire messages for tests: built by hand, not by the codec, so the codec is tested
against the documented format rather than against itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

JSON = [("content-type", b"application/json")]


def request_obj(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema_version": 1,
        "request_id": "req-1",
        "options": {},
        "matrix": {"shape": [2, 3], "dtype": "float64", "data": [1, 2, 3, 4, 5, 6.5]},
    }
    obj.update(overrides)
    return obj


def json_request(**overrides: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
    return orjson.dumps(request_obj(**overrides)), list(JSON)


def binary_request(
    array: np.ndarray[Any, Any] | None = None, value: bytes | None = None, **meta: Any
) -> tuple[bytes, list[tuple[str, bytes]]]:
    if array is None:
        array = np.arange(6, dtype="<f8").reshape(2, 3)
    obj = request_obj(**meta)
    obj["matrix"] = meta.get("matrix", {"shape": list(array.shape), "dtype": array.dtype.name})
    headers = [
        ("content-type", b"application/vnd.svd.binary"),
        ("svd-meta", orjson.dumps(obj)),
    ]
    return (
        array.astype(array.dtype.newbyteorder("<")).tobytes() if value is None else value
    ), headers


def nested(depth: int) -> Any:
    """A JSON value of the given nesting depth (1 = a flat array)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value
