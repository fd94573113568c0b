"""Dead letters keep the original record intact and add parseable svd-dlq-* headers."""

from __future__ import annotations

import pytest

from schemas import (
    DLQ_HEADERS,
    ContractError,
    DeadLetterMeta,
    ErrorCode,
    encode_dead_letter,
    read_dead_letter,
)
from schemas.deadletter import TRUNCATED_FIELD_BYTES


def dlq_meta(**overrides: object) -> DeadLetterMeta:
    fields: dict[str, object] = {
        "code": ErrorCode.NON_FINITE,
        "reason": "matrix has a non-finite value (nan) at index [0, 1] \u2013 r\u00e9sum\u00e9",
        "source_topic": "svd-requests",
        "source_partition": 3,
        "source_offset": 12345678901,
        "attempts": 2,
        "request_id": "req-7",
        "timestamp_ms": 1_700_000_000_000,
    }
    return DeadLetterMeta.model_validate(fields | overrides)


ORIGINAL_VALUE = b"\x00\xff garbage that is not even UTF-8 \xfe"
ORIGINAL_HEADERS = [
    ("content-type", b"application/vnd.svd.binary"),
    ("x-trace", b"\x00\x01"),
    ("content-type", b"duplicate kept as is"),
    # A replayed dead letter already carries our headers; they belong to the original.
    ("svd-dlq-code", b"TIMEOUT"),
]


def test_original_bytes_and_headers_survive_and_meta_reads_back() -> None:
    meta = dlq_meta()
    message = encode_dead_letter(ORIGINAL_VALUE, ORIGINAL_HEADERS, meta, key=b"orig-key")
    assert message.value == ORIGINAL_VALUE
    assert message.key == b"orig-key"
    assert message.headers[: len(ORIGINAL_HEADERS)] == ORIGINAL_HEADERS
    assert [n for n, _ in message.headers[len(ORIGINAL_HEADERS) :]] == list(DLQ_HEADERS.values())

    letter = read_dead_letter(message.value, message.headers)
    assert letter.value == ORIGINAL_VALUE
    assert letter.original_headers == ORIGINAL_HEADERS
    assert letter.meta == meta.model_copy(update={"value_bytes": len(ORIGINAL_VALUE)})
    assert not letter.meta.truncated


def test_header_values_are_plain_text() -> None:
    message = encode_dead_letter(b"", [], dlq_meta(request_id=None))
    headers = dict(message.headers)
    assert headers["svd-dlq-source-offset"] == b"12345678901"
    assert headers["svd-dlq-code"] == b"NON_FINITE"
    assert headers["svd-dlq-request-id"] == b""
    assert message.key == b""
    assert read_dead_letter(message.value, message.headers).meta.request_id is None


def test_key_defaults_to_the_request_id() -> None:
    assert encode_dead_letter(b"v", [], dlq_meta()).key == b"req-7"


def test_null_value_and_header_values_become_empty() -> None:
    message = encode_dead_letter(None, [("h", None)], dlq_meta())
    assert message.value == b"" and message.headers[0] == ("h", b"")


@pytest.mark.parametrize(
    "headers",
    [
        [("content-type", b"application/json")],
        [(n, b"x") for n in DLQ_HEADERS.values()],  # values that do not parse
        [(n, b"1" * 5000) for n in DLQ_HEADERS.values()],
    ],
)
def test_a_record_that_is_not_a_dead_letter_is_refused(headers: list[tuple[str, bytes]]) -> None:
    with pytest.raises(ContractError) as info:
        read_dead_letter(b"", headers)
    assert info.value.code is ErrorCode.INVALID_SCHEMA


def test_a_dead_letter_that_fits_is_whole_even_with_a_limit() -> None:
    whole = encode_dead_letter(ORIGINAL_VALUE, ORIGINAL_HEADERS, dlq_meta(), key=b"k")
    limited = encode_dead_letter(
        ORIGINAL_VALUE, ORIGINAL_HEADERS, dlq_meta(), key=b"k", max_bytes=1 << 20
    )
    assert limited == whole


def test_a_dead_letter_too_large_for_its_topic_is_cut_down_to_fit() -> None:
    value = bytes(range(256)) * 4096  # 1 MiB
    headers = [("svd-meta", b"m" * 100_000), ("content-type", b"application/json")]
    message = encode_dead_letter(value, headers, dlq_meta(), key=b"k" * 5000, max_bytes=65536)
    size = len(message.key) + len(message.value) + sum(len(n) + len(v) for n, v in message.headers)
    assert size <= 65536
    letter = read_dead_letter(message.value, message.headers)
    assert letter.meta.truncated and letter.meta.value_bytes == len(value)
    assert len(letter.value) > 0 and value.startswith(letter.value)
    assert letter.original_headers == [
        ("svd-meta", b"m" * TRUNCATED_FIELD_BYTES),
        ("content-type", b"application/json"),
    ]
    assert message.key == b"k" * TRUNCATED_FIELD_BYTES
    assert dict(message.headers)["svd-dlq-truncated"] == b"true"


def test_headers_that_crowd_out_everything_are_dropped_before_ours() -> None:
    headers = [(f"h{i}", b"x" * 2000) for i in range(100)]
    message = encode_dead_letter(b"v" * 10_000, headers, dlq_meta(), max_bytes=8192)
    letter = read_dead_letter(message.value, message.headers)
    assert letter.meta.truncated and letter.original_headers == []
    assert letter.meta.value_bytes == 10_000 and letter.value != b"v" * 10_000


def test_an_unreadable_record_reads_back_without_a_size() -> None:
    meta = dlq_meta(request_id=None).model_copy(update={"truncated": True})
    message = encode_dead_letter(None, [], meta)
    headers = dict(message.headers)
    assert headers["svd-dlq-value-bytes"] == b"" and headers["svd-dlq-truncated"] == b"true"
    letter = read_dead_letter(message.value, message.headers)
    assert letter.meta.value_bytes is None and letter.meta.truncated
