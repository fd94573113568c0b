"""recover_request_id: best effort, bounded, never raises."""

from __future__ import annotations

import orjson
import pytest

from schemas import recover_request_id
from schemas.codec import recover_reply_topic
from tests.unit.schemas.builders import JSON, binary_request, json_request, request_obj


def test_from_a_valid_json_request() -> None:
    assert recover_request_id(*json_request(request_id="abc-1")) == "abc-1"


def test_from_the_binary_meta_header_even_when_the_value_is_garbage() -> None:
    _, headers = binary_request(request_id="bin-1")
    assert recover_request_id(b"\x00", headers) == "bin-1"


def test_from_a_json_request_that_fails_validation() -> None:
    value, headers = json_request(request_id="bad-opts", options={"nope": True})
    assert recover_request_id(value, headers) == "bad-opts"


def test_from_the_head_of_a_large_truncated_json_value() -> None:
    value = orjson.dumps(request_obj(request_id="big-1", matrix={"data": [0.5] * 50_000}))
    assert recover_request_id(value[: len(value) // 2], JSON) == "big-1"


def test_escaped_ids_are_unescaped() -> None:
    value = b'{"request_id": "a\\u0041\\"b", "matrix": ' + b"[" * 10
    assert recover_request_id(value, JSON) == 'aA"b'


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"request_id": 5}',
        b'{"request_id": "has space"}',
        b'{"request_id": "' + b"x" * 200 + b'"}',
    ],
)
def test_none_when_there_is_no_valid_id(value: bytes) -> None:
    assert recover_request_id(value, JSON) is None


def test_never_raises_on_broken_headers() -> None:
    headers = [("svd-meta", b"{not json"), ("svd-meta", b"twice")]
    assert recover_request_id(b"", headers) is None
    assert recover_request_id(b"", [("svd-meta", b"[]")]) is None


def test_from_the_first_of_two_meta_headers() -> None:
    headers = [("svd-meta", b'{"request_id": "first"}'), ("svd-meta", b'{"request_id": "second"}')]
    assert recover_request_id(b"", headers) == "first"


def test_from_the_head_of_a_meta_header_too_large_to_parse() -> None:
    meta = b'{"schema_version": 1, "request_id": "huge-meta", "pad": "' + b"x" * 100_000 + b'"}'
    assert recover_request_id(b"", [("svd-meta", meta)]) == "huge-meta"


def test_from_the_key_when_nothing_in_the_record_says() -> None:
    assert recover_request_id(b"\xff\xfe", JSON, key=b"key-7") == "key-7"
    # A binary message without svd-meta: its value is the matrix, never searched for an id.
    assert recover_request_id(b'{"request_id": "no"}', [], key=b"by-key") == "no"
    assert recover_request_id(b"\x00" * 16, [("content-type", b"x")], key=b"by-key") == "by-key"


def test_the_record_says_before_the_key() -> None:
    value, headers = json_request(request_id="in-value")
    assert recover_request_id(value, headers, key=b"in-key") == "in-value"


@pytest.mark.parametrize("key", [b"", b"has space", b"\xc3\xa9t\xc3\xa9", b"k" * 129])
def test_not_from_a_key_that_is_no_request_id(key: bytes) -> None:
    assert recover_request_id(b"\xff", JSON, key=key) is None


def test_from_a_request_wrapped_in_an_array() -> None:
    value = b'[{"schema_version": 1, "request_id": "wrapped-1", "matrix": {}}]'
    assert recover_request_id(value, JSON) == "wrapped-1"


def test_the_reply_topic_of_a_request_that_did_not_decode() -> None:
    value, headers = json_request(request_id="r-1", reply_topic="svd-results.web-1", colour=1)
    assert recover_reply_topic(value, headers) == "svd-results.web-1"
    meta = b'{"request_id": "r-2", "reply_topic": "svd-results.web-2", "matrix": 5}'
    assert recover_reply_topic(b"\x00" * 8, [("svd-meta", meta)]) == "svd-results.web-2"
    truncated = b'{"request_id": "r-3", "reply_topic": "svd-results.web-3", "matrix": {"data": [1,'
    assert recover_reply_topic(truncated, JSON) == "svd-results.web-3"


@pytest.mark.parametrize("topic", ["bad topic", "", ".", "x" * 250, 5])
def test_no_reply_topic_that_kafka_would_not_take(topic: object) -> None:
    value = orjson.dumps({"request_id": "r-4", "reply_topic": topic})
    assert recover_reply_topic(value, JSON) is None
