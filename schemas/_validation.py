"""Turning untrusted bytes into validated models, with each failure mapped to its error code."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.errors import ContractError, ErrorCode
from schemas.limits import DecodeLimits
from schemas.models import MATRIX_TAGS, SUPPORTED_SCHEMA_VERSIONS, SvdOptions

M = TypeVar("M", bound=BaseModel)

_CONTAINERS = frozenset({list, dict})
_KNOWN_OPTIONS = ", ".join(SvdOptions.model_fields)


def load_json_object(data: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """Parse JSON that must be an object. orjson caps nesting at 1024 itself, so the parser's
    stack is safe; our (much lower) depth limit is enforced afterwards by check_structure."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _json_error(exc, data, what) from exc
    if type(obj) is not dict:
        raise ContractError(ErrorCode.INVALID_SCHEMA, f"{what} must be a JSON object")
    return obj


def _json_error(
    exc: orjson.JSONDecodeError, data: bytes | bytearray | memoryview, what: str
) -> ContractError:
    text = str(exc)
    if "depth limit" in text or "recursion limit" in text:
        return ContractError(ErrorCode.JSON_TOO_DEEP, f"{what} is nested too deeply: {text}")
    # JSON has no NaN or Infinity; a producer that writes them (Python's json module does by
    # default) is told about the values, not about a syntax error.
    around = bytes(memoryview(data)[max(exc.pos - 16, 0) : exc.pos + 16])
    if "is infinity" in text or b"NaN" in around or b"Infinity" in around:
        return ContractError(
            ErrorCode.NON_FINITE, f"{what} contains NaN or Infinity, which is not accepted"
        )
    if "UTF-8" in text:
        return ContractError(ErrorCode.INVALID_ENCODING, f"{what} is not valid UTF-8: {text}")
    return ContractError(ErrorCode.INVALID_ENCODING, f"{what} is not valid JSON: {text}")


def check_structure(root: dict[str, Any], limits: DecodeLimits, what: str) -> None:
    """Reject nesting deeper than max_json_depth (the top-level object is depth 1) and objects
    with more than max_json_fields fields, before any validation looks at them.

    Callers take the bulk numeric arrays out first; they are type-checked when converted.
    """
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_json_depth:
            raise ContractError(
                ErrorCode.JSON_TOO_DEEP,
                f"{what} is nested deeper than {limits.max_json_depth} levels",
            )
        if type(node) is dict:
            if len(node) > limits.max_json_fields:
                raise ContractError(
                    ErrorCode.INVALID_SCHEMA,
                    f"{what} has an object with {len(node)} fields; at most "
                    f"{limits.max_json_fields} are accepted",
                )
            children = node.values()
        # set(map(type, ...)) runs in C; it skips the per-element Python loop for flat lists.
        elif not _CONTAINERS.intersection(map(type, node)):
            continue
        else:
            children = node
        stack.extend((child, depth + 1) for child in children if type(child) in _CONTAINERS)


def peek_request_id(obj: object) -> str | None:
    """The request_id of a parsed object if it is a valid one, so errors can name it."""
    if type(obj) is not dict:
        return None
    value = obj.get("request_id")
    return value if is_valid_request_id(value) else None


def is_valid_request_id(value: object) -> bool:
    return (
        type(value) is str
        and 1 <= len(value) <= 128
        and value.isascii()
        and all("!" <= c <= "~" for c in value)
    )


def check_schema_version(obj: dict[str, Any], what: str, request_id: str | None) -> None:
    # Checked before the model: a future version may have fields this one would call invalid.
    if "schema_version" not in obj:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA, f"{what}: schema_version is required", request_id=request_id
        )
    version = obj["schema_version"]
    if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ContractError(
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
            f"{what}: schema_version {version!r} is not supported; supported: "
            f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}",
            request_id=request_id,
        )


def check_version_header(raw: bytes | None, request_id: str | None = None) -> int | None:
    if raw is None:
        return None
    text = raw.decode("ascii", "replace").strip()
    if not is_decimal(text) or int(text) not in SUPPORTED_SCHEMA_VERSIONS:
        raise ContractError(
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
            f"svd-schema-version header {text!r} is not supported; supported: "
            f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}",
            request_id=request_id,
        )
    return int(text)


def is_decimal(text: str) -> bool:
    # Bounded, because int() refuses (ValueError) strings of more than 4300 digits.
    return 0 < len(text) <= 20 and text.isascii() and text.isdecimal()


def validate(model: type[M], obj: dict[str, Any], what: str, request_id: str | None) -> M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _contract_error(exc, what, request_id) from exc


# When one message has several problems, the most specific code wins.
_PRIORITY = (
    ErrorCode.UNKNOWN_OPTION,
    ErrorCode.UNSUPPORTED_DTYPE,
    ErrorCode.INVALID_SHAPE,
    ErrorCode.INVALID_SCHEMA,
)


def _contract_error(exc: ValidationError, what: str, request_id: str | None) -> ContractError:
    problems: list[tuple[ErrorCode, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = _without_tags(tuple(err["loc"]))
        where = _format_loc(loc) or what
        kind = err["type"]
        if kind == "extra_forbidden" and loc[:-1] == ("options",):
            problems.append(
                (ErrorCode.UNKNOWN_OPTION, f"{where}: unknown option (known: {_KNOWN_OPTIONS})")
            )
        elif kind == "extra_forbidden":
            problems.append((ErrorCode.INVALID_SCHEMA, f"{where}: unknown field"))
        elif kind == "missing":
            problems.append((ErrorCode.INVALID_SCHEMA, f"{where}: required field is missing"))
        elif loc and loc[-1] == "dtype" and kind == "literal_error":
            problems.append(
                (ErrorCode.UNSUPPORTED_DTYPE, f"{where}: unsupported dtype; use float32 or float64")
            )
        elif loc and loc[-1] == "index_dtype" and kind == "literal_error":
            problems.append(
                (
                    ErrorCode.UNSUPPORTED_DTYPE,
                    f"{where}: unsupported index dtype; use int32 or int64",
                )
            )
        elif "shape" in loc:
            problems.append(
                (ErrorCode.INVALID_SHAPE, f"{where}: {err['msg']} (a 2-D, non-empty [rows, cols])")
            )
        else:
            problems.append((ErrorCode.INVALID_SCHEMA, f"{where}: {err['msg']}"))
    code = min((c for c, _ in problems), key=_PRIORITY.index, default=ErrorCode.INVALID_SCHEMA)
    shown = "; ".join(message for _, message in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return ContractError(code, f"{what}: {shown}{more}", request_id=request_id)


def _without_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # matrix is a union of dense and sparse specs; pydantic puts the member's tag in the path.
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (i > 0 and loc[i - 1] == "matrix" and part in MATRIX_TAGS)
    )


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
