"""Turning untrusted bytes into validated models, with each failure mapped to its error code."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas.errors import ContractError, ErrorCode
from schemas.limits import DecodeLimits
from schemas.models import MATRIX_TAGS, SUPPORTED_SCHEMA_VERSIONS, SvdOptions

M = TypeVar("M", bound=BaseModel)

_CONTAINERS = frozenset({list, dict})
#: How a message names the type of a parsed JSON value that is not a number.
JSON_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    str: "a string",
    type(None): "null",
    list: "an array",
    dict: "an object",
}
_KNOWN_OPTIONS = ", ".join(SvdOptions.model_fields)


_DEFAULT_LIMITS = DecodeLimits()
_COUNT_CONTAINERS_ABOVE_BYTES = 1 << 20
_SLACK = 4
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b"[{:")


def load_json_object(
    data: bytes | bytearray | memoryview, what: str, limits: DecodeLimits | None = None
) -> dict[str, Any]:
    """Parse JSON that must be an object, with no key twice in any object. orjson caps nesting
    at 1024 itself, so the parser's stack is safe; our (much lower) depth limit is enforced
    afterwards by check_structure."""
    limits = limits or _DEFAULT_LIMITS
    if len(data) > _COUNT_CONTAINERS_ABOVE_BYTES:
        # Millions of tiny arrays, objects or keys take orjson many times longer per byte than
        # numbers do. One byte scan counts the brackets, braces and colons (those inside strings
        # too, hence the slack) and refuses such a value before it is parsed; check_structure
        # and the key scan then count exactly.
        structural = _as_bytes(data).translate(None, _NOT_STRUCTURAL)
        keys = structural.count(b":")
        if len(structural) - keys > _SLACK * limits.max_json_containers:
            raise ContractError(
                ErrorCode.INVALID_SCHEMA,
                f"{what} holds about {len(structural) - keys} objects and arrays; a message "
                "needs a few dozen",
            )
        if keys > _SLACK * limits.max_json_keys:
            raise ContractError(
                ErrorCode.INVALID_SCHEMA,
                f"{what} holds about {keys} object keys; a message needs a few dozen",
            )
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _json_error(exc, what) from exc
    if not _keys_all_counted(obj, data):
        _check_unique_keys(data, what, limits.max_json_keys)
    if type(obj) is not dict:
        raise ContractError(ErrorCode.INVALID_SCHEMA, f"{what} must be a JSON object")
    return obj


def _json_error(exc: orjson.JSONDecodeError, what: str) -> ContractError:
    text = str(exc)
    if "depth limit" in text or "recursion limit" in text:
        return ContractError(ErrorCode.JSON_TOO_DEEP, f"{what} is nested too deeply: {text}")
    where = f"line {exc.lineno} column {exc.colno}"
    if "is infinity" in text:
        return ContractError(
            ErrorCode.NON_FINITE, f"{what}: the number at {where} is beyond the range of a double"
        )
    # JSON has no NaN or Infinity; a producer that writes them (Python's json module does by
    # default, C's printf writes nan and inf) is told about the values, not about a syntax error.
    literal = _non_finite_literal(exc.doc, exc.pos)
    if literal is not None:
        return ContractError(
            ErrorCode.NON_FINITE,
            f"{what} contains {literal} at {where}: JSON has no NaN or Infinity, and only finite "
            "numbers are accepted",
        )
    if "UTF-8" in text:
        return ContractError(ErrorCode.INVALID_ENCODING, f"{what} is not valid UTF-8: {text}")
    return ContractError(ErrorCode.INVALID_ENCODING, f"{what} is not valid JSON: {text}")


# What producers write for a non-finite number: NaN and Infinity (JavaScript, Python's json), nan
# and inf (C's printf), with a sign or a NaN payload, or MSVC's 1.#INF and 1.#QNAN.
_NON_FINITE = re.compile(
    r"[+-]?(?:nan(?:\(\w*\))?|inf(?:inity)?|\d\.#(?:inf|ind|q?nan|snan)\d*)", re.IGNORECASE
)
# A bare token: what lies between JSON's delimiters.
_TOKEN = re.compile(r"[^\s,\[\]{}:]+")


def _non_finite_literal(doc: str, pos: int) -> str | None:
    """The non-finite number orjson stopped at (pos counts characters of doc, the decoded text),
    if it stands where a value can; None for any other syntax error."""
    # orjson stops at the literal's first letter, or just after its sign, or at MSVC's "#": look
    # a little either side for the token that covers pos.
    near = _TOKEN.finditer(doc, max(pos - 32, 0), pos + 32)
    token = next((t for t in near if t.end() > pos), None)
    if token is None or token.start() > pos or not _NON_FINITE.fullmatch(token[0]):
        return None
    # A value follows "[", "," or ":" and precedes ",", "]" or "}"; elsewhere the literal is only
    # a symptom (a missing colon or comma, an unquoted key) and the syntax error is the news.
    before = doc[max(token.start() - 4096, 0) : token.start()].rstrip()[-1:]
    after = doc[token.end() : token.end() + 4096].lstrip()[:1]
    if before in ("", "[", ",", ":") and after in ("", ",", "]", "}"):
        return token[0]
    return None


# A run of strings with only scalars, commas and brackets between them (no brace, no colon): group
# 1 is its first string, group 2 its last if there are several, group 3 the colon that follows
# when the last one is an object key. Outside strings, a quote always opens one in valid JSON, so
# matching from left to right stays in step with the document. Every match starts with a quote,
# which the regex engine finds at memchr speed: a matrix of numbers between two strings costs
# almost nothing, and an array of strings is one match, not one Python step per string.
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_STRING_RUN = re.compile(rb'(%s)(?:[^"{}:]*+(%s))*+(\s*+:)?' % (_STRING, _STRING))


# A key as it can only end: a closing quote, maybe spaces, a colon. Also matched inside a string
# value that holds such text, so a count of these is never below the number of keys.
_KEY_END = re.compile(rb'"\s*:')
# The most containers and elements the fast path walks; a bulk array of numbers is left to the
# scan below, which passes over it at memchr speed.
_KEY_COUNT_WALK = 512


def _keys_all_counted(parsed: object, data: bytes | bytearray | memoryview) -> bool:
    """True when the parsed document kept as many keys as the text can hold, so none was a
    repeat (orjson keeps one of each); False means "not shown": ``_check_unique_keys`` decides.

    The scan costs a Python step per string; this, a C-speed count and a walk of a small
    document (an svd-meta header), which is what every binary request carries.
    """
    kept, budget = 0, _KEY_COUNT_WALK
    stack = [parsed]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            kept += len(node)
            budget -= len(node)
            stack.extend(node.values())
        elif type(node) is list:
            budget -= len(node)
            stack.extend(node)
        if budget < 0:
            return False
    return kept == len(_KEY_END.findall(_as_bytes(data)))


def _check_unique_keys(data: bytes | bytearray | memoryview, what: str, max_keys: int) -> None:
    """Reject an object that holds a key twice. orjson keeps the last one silently, so a message
    could mean one thing to the service and another to a reader that keeps the first.

    Only for bytes orjson has accepted: the scan relies on them being valid JSON.
    """
    text = _as_bytes(data)
    objects: list[set[bytes]] = []  # the keys seen so far in each open object, innermost last
    end = 0
    count = 0
    for run in _STRING_RUN.finditer(text):
        start = run.start()
        # Between two runs there are no strings, hence no keys: a brace opened and closed there is
        # an empty object, and the only one that can stay open is the object whose first key
        # comes next. So the braces of a gap amount to some closes, then at most one open.
        last_open, last_close = text.rfind(b"{", end, start), text.rfind(b"}", end, start)
        if last_close >= 0:
            opens = text.count(b"{", end, start) if last_open >= 0 else 0
            closed = text.count(b"}", end, start) - opens + (last_open > last_close)
            del objects[len(objects) - closed :]
        if last_open > last_close:
            objects.append(set())
        end = run.end()
        if run.start(3) >= 0:
            count += 1
            if count > max_keys:  # each key costs a Python step: bound the scan
                raise ContractError(
                    ErrorCode.INVALID_SCHEMA,
                    f"{what} has more than {max_keys} object keys; a message needs a few dozen",
                )
            key = run[2] or run[1]
            if b"\\" in key:  # one key has several spellings ("a", "\u0061"): compare meanings
                key = orjson.dumps(orjson.loads(key))
            keys = objects[-1]
            if key in keys:
                name = orjson.loads(key)
                raise ContractError(
                    ErrorCode.INVALID_ENCODING,
                    f"{what}: key {_shorten(name)!r} appears twice in one object",
                )
            keys.add(key)


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    # The codec hands over a memoryview of the record's bytes object: search that, not a copy.
    if type(data) is memoryview and type(data.obj) is bytes and data.nbytes == len(data.obj):
        return data.obj
    return bytes(data)


def check_structure(root: dict[str, Any], limits: DecodeLimits, what: str) -> None:
    """Reject nesting deeper than max_json_depth (the top-level object is depth 1) and objects
    with more than max_json_fields fields, before any validation looks at them.

    Callers take the bulk numeric arrays out first; they are type-checked when converted.
    """
    stack: list[tuple[Any, int]] = [(root, 1)]
    seen = 1
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
        inner = [child for child in children if type(child) in _CONTAINERS]
        seen += len(inner)
        if seen > limits.max_json_containers:
            raise ContractError(
                ErrorCode.INVALID_SCHEMA,
                f"{what} holds more than {limits.max_json_containers} objects and arrays; a "
                "message needs a few dozen",
            )
        stack.extend((child, depth + 1) for child in inner)


def peek_request_id(obj: object) -> str | None:
    """The request_id of a parsed object if it is a valid one, so errors can name it."""
    if type(obj) is not dict:
        return None
    value = obj.get("request_id")
    return value if is_valid_request_id(value) else None


# Printable ASCII without spaces, as the RequestId model says; a regex checks it in C.
_REQUEST_ID = re.compile(r"[!-~]{1,128}")


def is_valid_request_id(value: object) -> bool:
    return type(value) is str and _REQUEST_ID.fullmatch(value) is not None


# Kafka's rule for topic names, as schemas.models.TopicName states it.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def is_valid_topic_name(value: object) -> bool:
    return (
        type(value) is str and _TOPIC_NAME.fullmatch(value) is not None and value not in (".", "..")
    )


def check_schema_version(obj: dict[str, Any], what: str, request_id: str | None) -> None:
    # Checked before the model: a future version may have fields this one would call invalid.
    if "schema_version" not in obj:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA, f"{what}: schema_version is required", request_id=request_id
        )
    version = obj["schema_version"]
    if type(version) not in (int, float):  # not bool: type() is exact
        kind = JSON_TYPE_NAMES.get(type(version), type(version).__name__)
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"{what}: schema_version must be an integer, got {kind}",
            request_id=request_id,
        )
    _check_supported(version, f"{what}: schema_version {version!r}", request_id)


def check_version_header(raw: bytes | None, request_id: str | None = None) -> int | None:
    if raw is None:
        return None
    text = raw.decode("ascii", "replace").strip()
    if is_decimal(text):
        version: float = int(text)
    elif _NUMBER.fullmatch(text):
        version = float(text)  # never raises: too many digits make it inf, which is unsupported
    else:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"svd-schema-version header must be an integer, got {_shorten(text)!r}",
            request_id=request_id,
        )
    return _check_supported(version, f"svd-schema-version header {_shorten(text)!r}", request_id)


# A number in JSON's syntax, except that leading zeros stay allowed as they were for a decimal.
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _check_supported(version: float, what: str, request_id: str | None) -> int:
    # A float equal to a supported version is that version (1.0 is 1 in JSON); set membership
    # compares by value, so it needs no conversion (and 1e300 none either).
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ContractError(
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
            f"{what} is not supported; supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)}",
            request_id=request_id,
        )
    return int(version)


def _shorten(text: str, limit: int = 64) -> str:
    # Untrusted text quoted in a message: enough to recognise it.
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


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
        elif kind == "union_tag_invalid" and str(err.get("ctx", {}).get("tag", "")).startswith(
            "stored"
        ):
            problems.append(
                (
                    ErrorCode.INVALID_SCHEMA,
                    f"{where}.ref: a reference travels in a JSON request (content-type "
                    "application/json), not in a binary request's svd-meta",
                )
            )
        elif not loc:  # the whole object: ``what`` already says which
            problems.append((ErrorCode.INVALID_SCHEMA, err["msg"]))
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
