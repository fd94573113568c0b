"""Every failure path of the service ends in an answer: error result and/or dead letter."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from consumer.admission import TEST_FAULT_HEADER
from localkafka import TopicSettings
from schemas import codec
from schemas.errors import ErrorCode
from tests.support.kafka_io import AnswerReader, make_request, produce
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.kafka


def _with_header(message: codec.EncodedMessage, name: str, value: bytes) -> codec.EncodedMessage:
    return codec.EncodedMessage(
        key=message.key, value=message.value, headers=[*message.headers, (name, value)]
    )


async def test_invalid_requests_get_an_error_result_and_a_dead_letter(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    good_id, good = make_request(rng.standard_normal((8, 8)))
    # The SDK refuses to encode NaN, so patch one element of a valid binary request.
    nan_id, finite = make_request(np.ones((4, 4)))
    value = bytearray(finite.value)
    value[8 * 6 : 8 * 7] = np.array([np.nan], dtype="<f8").tobytes()
    nan_request = codec.EncodedMessage(key=finite.key, value=bytes(value), headers=finite.headers)
    bad_option = orjson.dumps(
        {"schema_version": 1, "request_id": "bad-option", "options": {"colour": "red"},
         "matrix": {"shape": [2, 2], "dtype": "float64", "data": [1, 2, 3, 4]}}
    )  # fmt: skip
    k_too_big_id = "k-too-big"
    k_too_big = orjson.dumps(
        {"schema_version": 1, "request_id": k_too_big_id, "options": {"k": 4},
         "matrix": {"shape": [2, 3], "dtype": "float64", "data": [1, 2, 3, 4, 5, 6]}}
    )  # fmt: skip
    expired_id, expired = make_request(
        rng.standard_normal((6, 6)), deadline_ms=int(time.time() * 1000) - 1000
    )
    # A reply topic that does not exist must not stall the partition (retrying forever).
    nowhere_id, nowhere = make_request(
        rng.standard_normal((3, 3)), reply_topic=f"{topics.results}.no-such-topic"
    )
    # Answered on the requests topic, a result would come back to the service as a request.
    bounced_id, bounced = make_request(rng.standard_normal((3, 3)), reply_topic=topics.requests)
    garbage = b"\x00\xffnot a request at all"
    await produce(
        kafka_bootstrap,
        topics.requests,
        [
            good,
            nan_request,
            (b"bad-option", bad_option, [("content-type", b"application/json")]),
            (b"k", k_too_big, [("content-type", b"application/json")]),
            expired,
            (None, garbage, [("content-type", b"application/json")]),
            nowhere,
            bounced,
        ],
    )
    expected_codes = {
        nan_id: ErrorCode.NON_FINITE,
        "bad-option": ErrorCode.UNKNOWN_OPTION,
        k_too_big_id: ErrorCode.INVALID_SCHEMA,
        expired_id: ErrorCode.EXPIRED,
        nowhere_id: ErrorCode.INVALID_SCHEMA,
        bounced_id: ErrorCode.INVALID_SCHEMA,
    }
    with ServiceProcess(kafka_bootstrap, topics, tmp_path / "svc.log", pool_size=1) as service:
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect({good_id, *expected_codes}, timeout=120, dead_letters=7)
    assert good_id in answers.results
    for request_id, code in expected_codes.items():
        (error,) = answers.errors[request_id]
        assert error.code == code, (request_id, error)
        assert error.message
    by_code = {d.meta.code: d for d in answers.dead_letters}
    assert set(by_code) == {*expected_codes.values(), ErrorCode.INVALID_ENCODING}
    assert by_code[ErrorCode.INVALID_ENCODING].value == garbage  # the original bytes, intact
    assert by_code[ErrorCode.INVALID_ENCODING].meta.request_id is None
    assert by_code[ErrorCode.UNKNOWN_OPTION].value == bad_option
    assert by_code[ErrorCode.UNKNOWN_OPTION].meta.source_topic == topics.requests
    assert "does not exist" in answers.errors[nowhere_id][0].message
    assert "not allowed" in answers.errors[bounced_id][0].message
    # Bad input is answered and committed past, never retried: one dead letter each.
    assert len(answers.dead_letters) == 7
    assert "Traceback" not in service.log()


async def test_worker_crashes_are_retried_then_dead_lettered_and_hangs_time_out(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    rng = np.random.default_rng(8)
    requests = {}
    for fault in ("kill_once", "segfault_once", "segfault", "hang", "raise", None):
        request_id, message = make_request(rng.standard_normal((10, 10)))
        requests[request_id] = fault
        if fault:
            message = _with_header(message, TEST_FAULT_HEADER, fault.encode())
        await produce(kafka_bootstrap, topics.requests, [message])
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log",
        pool_size=2, enable_test_faults="true", max_attempts=2, retry_backoff_s=0.05, task_timeout_s=3,
    )  # fmt: skip
    with service:
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            answers = await reader.collect(set(requests), timeout=120, dead_letters=3)
        # The pool is back to full size and still serves after all of that.
        after_id, after = make_request(rng.standard_normal((10, 10)))
        await produce(kafka_bootstrap, topics.requests, [after])
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            await reader.collect({after_id}, timeout=60)
    outcome = {rid: requests[rid] for rid in requests}
    for request_id, fault in outcome.items():
        if fault in (None, "kill_once", "segfault_once"):
            assert request_id in answers.results, fault  # retried on a fresh worker and answered
        else:
            (error,) = answers.errors[request_id]
            want = {
                "segfault": ErrorCode.WORKER_CRASHED,
                "hang": ErrorCode.TIMEOUT,
                "raise": ErrorCode.INTERNAL,
            }
            assert error.code == want[fault]
    dead = {d.meta.request_id: d.meta for d in answers.dead_letters}
    crashed = next(rid for rid, f in requests.items() if f == "segfault")
    assert dead[crashed].attempts == 2 and dead[crashed].code == ErrorCode.WORKER_CRASHED
    assert service.log().count("retrying in") >= 3  # kill_once, segfault_once, segfault's first try
