"""Dead letters: the original record kept byte for byte, with svd-dlq-* headers appended.

Each DeadLetterMeta field becomes one header, always present and always in field order, so a
reader can split the original headers from ours even when the original already carried
svd-dlq-* headers (a dead letter that was replayed and failed again).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas._validation import is_decimal, validate
from schemas.errors import ContractError, ErrorCode
from schemas.headers import DLQ_PREFIX, ReceivedHeaders
from schemas.models import DeadLetterMeta
from schemas.records import Buffer, EncodedMessage

DLQ_HEADERS: dict[str, str] = {
    field: DLQ_PREFIX + field.replace("_", "-") for field in DeadLetterMeta.model_fields
}
_INT_FIELDS = frozenset(
    {"schema_version", "source_partition", "source_offset", "attempts", "timestamp_ms"}
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes
    original_headers: list[tuple[str, bytes | None]]
    meta: DeadLetterMeta


def dead_letter_headers(meta: DeadLetterMeta) -> list[tuple[str, bytes]]:
    out = []
    for field, header in DLQ_HEADERS.items():
        value = getattr(meta, field)
        out.append((header, b"" if value is None else str(value).encode()))
    return out


def encode_dead_letter(
    original_value: Buffer | None,
    original_headers: ReceivedHeaders,
    meta: DeadLetterMeta,
    *,
    key: bytes | None = None,
) -> EncodedMessage:
    """The DLQ record: value verbatim, original headers in order, then ours. The key is the
    original key when given, else the request id (empty if unknown). A null original value or
    header value is written as empty bytes (EncodedMessage carries bytes only)."""
    headers = [(name, b"" if v is None else bytes(v)) for name, v in original_headers]
    headers.extend(dead_letter_headers(meta))
    if key is None:
        key = (meta.request_id or "").encode()
    value = b"" if original_value is None else bytes(original_value)
    return EncodedMessage(key=key, value=value, headers=headers)


def read_dead_letter(value: Buffer | None, headers: ReceivedHeaders) -> DeadLetter:
    """Split a DLQ record into the original value and headers and the DeadLetterMeta."""
    count = len(DLQ_HEADERS)
    ours = list(headers[-count:]) if len(headers) >= count else []
    if [name for name, _ in ours] != list(DLQ_HEADERS.values()):
        raise ContractError(
            ErrorCode.INVALID_SCHEMA,
            f"not a dead letter: the last {count} headers must be {list(DLQ_HEADERS.values())}",
        )
    fields: dict[str, object] = {}
    for field, (_, raw) in zip(DLQ_HEADERS, ours, strict=True):
        text = (raw or b"").decode("utf-8", "replace")
        if field in _INT_FIELDS:
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
