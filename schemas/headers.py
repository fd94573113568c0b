"""Kafka header names and content types, and strict reading of received headers."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import TypeAlias

from schemas.errors import ContractError, ErrorCode

# Headers as received from a Kafka client: a value may be null.
ReceivedHeaders: TypeAlias = Sequence[tuple[str, bytes | None]]

CONTENT_TYPE = "content-type"
# JSON metadata of a binary message (the request or result object without array data).
SVD_META = "svd-meta"
# Schema version of the message, so a reader can reject a version before parsing the value.
SVD_SCHEMA_VERSION = "svd-schema-version"

DLQ_PREFIX = "svd-dlq-"

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_BINARY = "application/vnd.svd.binary"


class Encoding(StrEnum):
    JSON = "json"
    BINARY = "binary"


CONTENT_TYPES: dict[Encoding, str] = {
    Encoding.JSON: CONTENT_TYPE_JSON,
    Encoding.BINARY: CONTENT_TYPE_BINARY,
}
_ENCODINGS = {ct: enc for enc, ct in CONTENT_TYPES.items()}


def header_value(headers: ReceivedHeaders, name: str, *, max_bytes: int) -> bytes | None:
    """The single value of header `name` (matched case-insensitively), or None if absent.

    A repeated header is rejected rather than picking one: two content types or two metas would
    let the producer and the service disagree on what the message means.
    """
    found: bytes | None = None
    seen = False
    for key, value in headers:
        if key.lower() != name:
            continue
        if seen:
            raise ContractError(
                ErrorCode.INVALID_ENCODING, f"header {name!r} appears more than once"
            )
        seen = True
        found = b"" if value is None else bytes(value)
    if found is not None and len(found) > max_bytes:
        raise ContractError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"header {name!r} is {len(found)} bytes; the limit is {max_bytes}",
        )
    return found


def encoding_of(headers: ReceivedHeaders, *, max_bytes: int) -> Encoding:
    """The encoding named by content-type. No content-type means JSON; the value is never sniffed."""
    raw = header_value(headers, CONTENT_TYPE, max_bytes=max_bytes)
    if raw is None:
        return Encoding.JSON
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ContractError(ErrorCode.INVALID_ENCODING, "content-type is not ASCII") from exc
    # Media-type parameters (e.g. "; charset=utf-8") are allowed and ignored: JSON is always UTF-8.
    media_type = text.split(";", 1)[0].strip().lower()
    try:
        return _ENCODINGS[media_type]
    except KeyError as exc:
        raise ContractError(
            ErrorCode.INVALID_ENCODING,
            f"unsupported content-type {text!r}; use {CONTENT_TYPE_JSON!r} or "
            f"{CONTENT_TYPE_BINARY!r}",
        ) from exc
