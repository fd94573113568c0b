"""Dead letters: the original record kept byte for byte, with svd-dlq-* headers appended.

Each DeadLetterMeta field becomes one header, always present and always in field order, so a
reader can split the original headers from ours even when the original already carried
svd-dlq-* headers (a dead letter that was replayed and failed again).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from schemas._validation import is_decimal, validate
from schemas.errors import ContractError, ErrorCode
from schemas.headers import DLQ_PREFIX, ReceivedHeaders
from schemas.models import DeadLetterMeta, ObjectRef
from schemas.records import Buffer, EncodedMessage, record_size

DLQ_HEADERS: dict[str, str] = {
    field: DLQ_PREFIX + field.replace("_", "-") for field in DeadLetterMeta.model_fields
}
# What version 1 dead letters carry: the same headers without the last (original-ref).
_V1_HEADERS: dict[str, str] = dict(list(DLQ_HEADERS.items())[:-1])
_INT_FIELDS = frozenset(
    {
        "schema_version",
        "source_partition",
        "source_offset",
        "attempts",
        "timestamp_ms",
        "value_bytes",
    }
)
_BOOL_FIELDS = frozenset({"truncated"})

# A truncated dead letter keeps at most this much of each original header, and of the key: enough
# to recognise a request (its svd-meta head holds the request id), not enough to crowd out the
# value's prefix.
TRUNCATED_FIELD_BYTES = 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes
    original_headers: list[tuple[str, bytes | None]]
    meta: DeadLetterMeta


def dead_letter_headers(meta: DeadLetterMeta) -> list[tuple[str, bytes]]:
    out = []
    for field, header in DLQ_HEADERS.items():
        value = getattr(meta, field)
        if value is None:
            text = ""
        elif isinstance(value, ObjectRef):
            text = orjson.dumps(value.model_dump(mode="json")).decode()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out.append((header, text.encode()))
    return out


def encode_dead_letter(
    original_value: Buffer | None,
    original_headers: ReceivedHeaders,
    meta: DeadLetterMeta,
    *,
    key: bytes | None = None,
    max_bytes: int | None = None,
) -> EncodedMessage:
    """The DLQ record: value verbatim, original headers in order, then ours. The key is the
    original key when given, else the request id (empty if unknown). A null original value or
    header value is written as empty bytes (EncodedMessage carries bytes only).

    With ``max_bytes`` (what the dead-letter topic takes), a record that would not fit is
    written cut down instead of not at all: each original header value and the key cut to
    ``TRUNCATED_FIELD_BYTES``, then as long a prefix of the value as fits, with
    ``svd-dlq-truncated: true``; ``svd-dlq-value-bytes`` always gives the original size.
    """
    value = b"" if original_value is None else bytes(original_value)
    headers = [(name, b"" if v is None else bytes(v)) for name, v in original_headers]
    if key is None:
        key = (meta.request_id or "").encode()
    if meta.value_bytes is None and not meta.truncated:
        meta = meta.model_copy(update={"value_bytes": len(value)})
    full = record_size(key, value, [*headers, *dead_letter_headers(meta)])
    if max_bytes is not None and full > max_bytes:
        meta = meta.model_copy(update={"truncated": True})
        key = key[:TRUNCATED_FIELD_BYTES]
        headers = [(name[:256], v[:TRUNCATED_FIELD_BYTES]) for name, v in headers]
        room = max_bytes - record_size(key, b"", [*headers, *dead_letter_headers(meta)])
        if room < 0:  # even the cut headers crowd the limit: keep the service's own
            headers = []
            room = max_bytes - record_size(key, b"", dead_letter_headers(meta))
        value = value[: max(room, 0)]
    return EncodedMessage(key=key, value=value, headers=[*headers, *dead_letter_headers(meta)])


def read_dead_letter(value: Buffer | None, headers: ReceivedHeaders) -> DeadLetter:
    """Split a DLQ record into the original value and headers and the DeadLetterMeta (a
    version 2 dead letter's twelve headers, or a version 1 one's eleven)."""
    for names in (DLQ_HEADERS, _V1_HEADERS):
        count = len(names)
        ours = list(headers[-count:]) if len(headers) >= count else []
        if [name for name, _ in ours] == list(names.values()):
            break
    else:
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"not a dead letter: the last headers must be {list(DLQ_HEADERS.values())}",
        )
    fields: dict[str, object] = {}
    for field, (_, raw) in zip(names, ours, strict=True):
        text = (raw or b"").decode("utf-8", "replace")
        if field in _BOOL_FIELDS:
            if text not in ("true", "false"):
                raise ContractError(
                    ErrorCode.INVALID_SCHEMA, f"{DLQ_HEADERS[field]}: {text!r} is not true or false"
                )
            fields[field] = text == "true"
        elif field in ("value_bytes", "original_ref") and not text:
            continue  # unknown (the record could not be read), or nothing stored
        elif field == "original_ref":
            try:
                fields[field] = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise ContractError(
                    ErrorCode.INVALID_SCHEMA, f"{DLQ_HEADERS[field]}: not JSON"
                ) from None
        elif field in _INT_FIELDS:
            if not is_decimal(text):
                raise ContractError(
                    ErrorCode.INVALID_SCHEMA, f"{DLQ_HEADERS[field]}: {text!r} is not a number"
                )
            fields[field] = int(text)
        elif text or field != "request_id":
            fields[field] = text
    meta = validate(DeadLetterMeta, fields, "dead letter headers", None)
    return DeadLetter(
        value=b"" if value is None else bytes(value),
        original_headers=list(headers[:-count]),
        meta=meta,
    )
