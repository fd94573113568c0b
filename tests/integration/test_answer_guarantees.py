"""No request can hold its partition: factors that overflow, and a bug on the request path.

Both used to leave the request unanswered and uncommitted ("the request stays uncommitted"):
the partition's commit position never moved again, and after a restart every later request on
it was computed and answered a second time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from consumer.admission import PARENT_FAULT, TEST_FAULT_HEADER
from localkafka import TopicSettings
from schemas import codec
from schemas.errors import ErrorCode
from tests.support.kafka_io import AnswerReader, make_request
from tests.support.service import ServiceProcess
from tests.support.tally import send_all, wait_committed_to_end

pytestmark = pytest.mark.kafka


async def test_overflowing_factors_and_unexpected_failures_are_answered_and_committed_past(
    kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path
) -> None:
    rng = np.random.default_rng(21)
    f64_id, f64 = make_request(np.full((4, 4), 1e308))
    f32_id, f32 = make_request(np.full((3, 5), 3e38, dtype=np.float32))
    json_id, as_json = make_request(np.full((4, 4), 1e308), encoding=codec.Encoding.JSON)
    bug_id, bug = make_request(rng.standard_normal((5, 5)))
    bug = codec.EncodedMessage(
        key=bug.key,
        value=bug.value,
        headers=[*bug.headers, (TEST_FAULT_HEADER, PARENT_FAULT.encode())],
    )
    good = dict(make_request(rng.standard_normal((6, 6))) for _ in range(6))
    # One partition, so a request that stalled its partition would stall the good ones' commit.
    await send_all(
        kafka_bootstrap, topics.requests, [f64, f32, as_json, bug, *good.values()], partition=0
    )
    group = f"g-{topics.requests}"
    service = ServiceProcess(
        kafka_bootstrap, topics, tmp_path / "svc.log", group_id=group, pool_size=1,
        enable_test_faults="true", unexpected_attempts=2, retry_backoff_s=0.05,
    )  # fmt: skip
    with service:
        async with AnswerReader(kafka_bootstrap, topics) as reader:
            expected = {f64_id, f32_id, json_id, bug_id, *good}
            answers = await reader.collect(expected, timeout=120, dead_letters=4)
            await wait_committed_to_end(kafka_bootstrap, group, topics.requests, timeout=60)
        log = service.log()
    assert set(good) <= set(answers.results)
    for request_id in (f64_id, f32_id, json_id):
        (error,) = answers.errors[request_id]
        assert error.code == ErrorCode.RESULT_OVERFLOW and not error.retryable, error
        assert "scale the matrix down" in error.message
    (error,) = answers.errors[bug_id]
    assert error.code == ErrorCode.INTERNAL and error.retryable, error
    dead = {d.meta.request_id: d.meta for d in answers.dead_letters}
    assert set(dead) == {f64_id, f32_id, json_id, bug_id}
    assert dead[bug_id].code == ErrorCode.INTERNAL and dead[bug_id].attempts == 2
    assert dead[f64_id].code == ErrorCode.RESULT_OVERFLOW and dead[f64_id].attempts == 1
    assert "unexpected failure on attempt 1 of 2" in log
    assert "answering INTERNAL with a dead letter and moving the commit on" in log
    assert "stays uncommitted" not in log
