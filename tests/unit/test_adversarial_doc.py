"""The adversarial corpus as data: its document is generated from it, it covers what issue #15
asks for (at least 200 records, every error code an input can trigger, every codec), and the
judge of tests/integration/test_adversarial.py catches what it is there to catch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import orjson
import pytest

from schemas import codec
from schemas._validation import is_valid_request_id
from schemas.errors import ErrorCode
from schemas.models import SvdResultMeta, Timings, WorkerInfo
from tests.adversarial import build, judge, render

TOPICS = {
    "requests": "svd-requests-t",
    "results": "svd-results-t",
    "dlq": "svd-dlq-t",
    "reply": "svd-results-t.adv",
    "other": "tenant-b-svd-results-t",
}
# A finite input whose factors overflow the dtype; the service is gaining this code.
NEW_CODES = frozenset({"RESULT_OVERFLOW"})


@pytest.fixture(scope="module")
def records() -> list[build.Record]:
    return build.build_all(TOPICS)


def test_the_committed_document_is_generated_from_the_corpus() -> None:
    text = render.render()
    assert render.DOC.exists() and render.DOC.read_text(encoding="utf-8") == text, (
        "docs/adversarial-corpus.md drifted from tests/adversarial/corpus.yaml: run "
        "python -m tests.adversarial.render --write"
    )


def test_at_least_200_records(records: list[build.Record]) -> None:
    assert len(records) >= 200


def test_every_error_code_an_input_can_trigger_is_covered(records: list[build.Record]) -> None:
    known = {c.value for c in ErrorCode} | NEW_CODES
    used = Counter(r.case.code for r in records if r.case.code is not None)
    assert set(used) <= known, f"codes the service does not have: {set(used) - known}"
    wanted = (known - build.NOT_FROM_INPUT) | NEW_CODES
    assert wanted <= set(used), f"not covered: {sorted(wanted - set(used))}"


def test_every_codec_carries_a_valid_json_and_a_valid_binary_request(
    records: list[build.Record],
) -> None:
    def binary(r: build.Record) -> bool:
        return any(v == build.CONTENT_TYPE_BINARY for n, v in r.headers if n == "content-type")

    for name in build.CODECS:
        ok = [r for r in records if r.case.codec == name and r.case.answer == "ok"]
        assert any(binary(r) for r in ok), f"no valid binary request in {name}"
        assert any(not binary(r) for r in ok), f"no valid JSON request in {name}"


def test_request_ids_keys_and_shared_ids_are_consistent(records: list[build.Record]) -> None:
    ids = Counter(r.case.request_id for r in records if r.case.request_id is not None)
    for r in records:
        case = r.case
        if case.answer == "none":
            # Nothing may name the record: a valid key would give it an answer.
            key = (r.key or b"").decode("ascii", "replace")
            assert r.key is None or not is_valid_request_id(key), (case.name, r.key)
            continue
        assert is_valid_request_id(case.request_id), case.name
        assert (ids[case.request_id] > 1) == case.shared_id, (
            f"{case.name}: request id {case.request_id} is shared by {ids[case.request_id]} "
            "records; say shared_id: true on each of them (and only then)"
        )


def test_expected_dead_letters_fit_the_sizes_the_test_runs_with(
    records: list[build.Record],
) -> None:
    for r in records:
        size = len(r.value or b"")
        if r.case.dead_letter == "truncated":
            assert size > build.DLQ_MESSAGE_BYTES, r.name
        elif r.case.dead_letter == "exact":
            headers = sum(len(n) + len(v or b"") for n, v in r.headers)
            assert size + headers + len(r.key or b"") < build.DLQ_MESSAGE_BYTES - 64 * 1024, r.name
        if size > build.SERVICE_MESSAGE_BYTES:
            assert r.case.code == "MESSAGE_TOO_LARGE", r.name


def test_ok_records_carry_what_their_answers_are_checked_against(
    records: list[build.Record],
) -> None:
    for r in records:
        if r.case.answer == "ok":
            assert r.matrix is not None and r.matrix.ndim == 2, r.name


def test_truncated_records_are_cut_and_codecs_expand() -> None:
    cases = {c.name: c for c in build.expand(build.load())}
    assert {f"json-f64-{codec}" for codec in build.CODECS} <= set(cases)
    record = build.build(cases["truncated-json-tiny"], TOPICS)
    assert record.value == b'{"schema_v'


# --- the judge: it must see what is wrong, not only pass what is right ------------------------


def _case(name: str) -> build.Record:
    (case,) = [c for c in build.expand(build.load()) if c.name == name]
    return build.build(case, TOPICS)


def _dead_letter(
    record: build.Record, offset: int, *, value: bytes | None = None, **fields: str
) -> judge.Seen:
    original = record.value or b""
    ours = {
        "svd-dlq-schema-version": "1",
        "svd-dlq-code": record.case.code or "",
        "svd-dlq-reason": "because",
        "svd-dlq-source-topic": TOPICS["requests"],
        "svd-dlq-source-partition": "0",
        "svd-dlq-source-offset": str(offset),
        "svd-dlq-attempts": "0",
        "svd-dlq-request-id": record.case.request_id or "",
        "svd-dlq-timestamp-ms": "1",
        "svd-dlq-value-bytes": str(len(original)),
        "svd-dlq-truncated": "false",
        **{f"svd-dlq-{k.replace('_', '-')}": v for k, v in fields.items()},
    }
    headers = [(n, v or b"") for n, v in record.headers] + [
        (n, v.encode()) for n, v in ours.items()
    ]
    return judge.Seen(
        TOPICS["dlq"], 0, offset, record.key, original if value is None else value, headers
    )


def _error(record: build.Record, offset: int, topic: str = "results") -> judge.Seen:
    body = {"schema_version": 1, "request_id": record.case.request_id, "status": "error",
            "code": record.case.code, "message": "no", "retryable": False}  # fmt: skip
    return judge.Seen(TOPICS[topic], 0, offset, (record.case.request_id or "").encode(),
                      orjson.dumps(body), [("content-type", b"application/json")])  # fmt: skip


def _kinds(sent: list[judge.Sent], seen: list[judge.Seen]) -> list[str]:
    return sorted(m.kind for m in judge.judge(sent, seen, TOPICS).mismatches)


def test_the_judge_passes_an_error_answered_and_dead_lettered_as_owed() -> None:
    record = _case("ct-unknown")
    sent = [judge.Sent(record, 0, 7)]
    assert _kinds(sent, [_error(record, 0), _dead_letter(record, 7)]) == []


def test_the_judge_sees_every_kind_of_wrong_answer_and_dead_letter() -> None:
    record = _case("ct-unknown")
    sent = [judge.Sent(record, 0, 7)]
    flipped = (record.value or b"")[:-1] + b"!"
    assert _kinds(sent, [_error(record, 0)]) == ["dead-letter-count"]
    assert _kinds(sent, [_dead_letter(record, 7)]) == ["answer-missing"]
    assert _kinds(sent, [_error(record, 0), _error(record, 1), _dead_letter(record, 7)]) == [
        "answer"
    ]
    assert _kinds(sent, [_error(record, 0, "reply"), _dead_letter(record, 7)]) == ["answer"]
    assert _kinds(sent, [_error(record, 0), _dead_letter(record, 7, value=flipped)]) == [
        "dead-letter-value"
    ]
    assert _kinds(sent, [_error(record, 0), _dead_letter(record, 7, attempts="1")]) == [
        "dead-letter-attempts"
    ]
    assert _kinds(sent, [_error(record, 0), _dead_letter(record, 7, truncated="true")]) == [
        "dead-letter-truncated"
    ]
    stray = _dead_letter(record, 8)
    assert _kinds(sent, [_error(record, 0), _dead_letter(record, 7), stray]) == [
        "stray-dead-letter"
    ]


def test_the_judge_checks_truncated_dead_letters_and_no_answer_cases() -> None:
    record = _case("value-over-limit-no-id")  # no answer, truncated dead letter
    sent = [judge.Sent(record, 0, 3)]
    prefix = (record.value or b"")[:65536]
    good = _dead_letter(record, 3, value=prefix, truncated="true")
    assert _kinds(sent, [good]) == []
    assert _kinds(sent, [_dead_letter(record, 3)]) == ["dead-letter-truncated", "dead-letter-value"]
    named = _dead_letter(record, 3, value=prefix, truncated="true", request_id="adv-x")
    assert _kinds(sent, [named]) == ["dead-letter-request-id"]


def test_the_judge_checks_the_numbers_of_ok_answers() -> None:
    record = _case("binary-f64-none")
    assert record.matrix is not None
    u, s, vt = np.linalg.svd(record.matrix, full_matrices=False)
    meta = SvdResultMeta(
        request_id=record.case.request_id or "",
        timings=Timings(queue_wait_ms=0, compute_ms=0, total_ms=0),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )

    def answer(s: np.ndarray) -> judge.Seen:
        message = codec.encode_result(meta, u, s, vt, codec.Encoding.BINARY)
        return judge.Seen(TOPICS["results"], 0, 0, message.key, message.value, message.headers)

    sent = [judge.Sent(record, 0, 0)]
    assert _kinds(sent, [answer(s)]) == []
    assert _kinds(sent, [answer(s * 1.01)]) == ["factors"]
