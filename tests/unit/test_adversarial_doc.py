"""The adversarial corpus as data: its document is generated from it, it covers what issue #15
asks for (at least 200 records, every error code an input can trigger, every codec) and issue
#17's references (the objects it puts in the store, deterministic but for the run's places), and
the judge of tests/integration/test_adversarial.py catches what it is there to catch."""

from __future__ import annotations

import functools
import hashlib
from collections import Counter

import numpy as np
import orjson
import pytest

from schemas import codec
from schemas._validation import is_valid_request_id
from schemas.errors import ErrorCode
from schemas.models import ObjectRef, SvdResultMeta, Timings, WorkerInfo
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


@functools.cache
def _cases() -> dict[str, build.Case]:
    return {c.name: c for c in build.expand(build.load())}


def _case(name: str) -> build.Record:
    return build.build(_cases()[name], TOPICS)


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


def test_the_judge_checks_the_original_a_truncated_dead_letter_keeps_in_the_store() -> None:
    record = _case("value-over-limit-no-id")
    sent = [judge.Sent(record, 0, 3)]
    original = record.value or b""
    url = f"{build.EXAMPLE_PLACES['store']}/dead-letters/svd-requests-t/0/3"

    def letter(ref: object) -> judge.Seen:
        text = orjson.dumps(ref).decode() if isinstance(ref, dict) else str(ref)
        return _dead_letter(record, 3, value=original[:65536], truncated="true", original_ref=text)

    def kinds(seen: judge.Seen, objects: dict[str, bytes | None]) -> list[str]:
        verdict = judge.judge(sent, [seen], TOPICS, objects, originals_stored=True)
        return sorted(m.kind for m in verdict.mismatches)

    ref = {"url": url, "nbytes": len(original), "sha256": hashlib.sha256(original).hexdigest()}
    assert judge.stored_originals([letter(ref)], TOPICS["dlq"]) == [url]
    assert kinds(letter(ref), {url: original}) == []
    assert kinds(letter(ref), {}) == ["dead-letter-original"]
    assert kinds(letter(ref), {url: original[:-1]}) == ["dead-letter-original"]
    assert kinds(letter({**ref, "nbytes": 1}), {url: original}) == ["dead-letter-original-ref"]
    assert kinds(letter(""), {}) == ["dead-letter-original-ref"]  # none, with a store
    assert kinds(letter("{not json"), {}) == ["dead-letter-original-ref"]
    # Without a store none is owed; a dead letter that holds its original references none.
    assert _kinds(sent, [letter("")]) == []
    exact = _case("ct-unknown")
    held = _dead_letter(exact, 7, original_ref=orjson.dumps(ref).decode())
    assert _kinds([judge.Sent(exact, 0, 7)], [_error(exact, 0), held]) == [
        "dead-letter-original-ref"
    ]


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


# --- stored objects: what the test puts in the store, and how stored results are judged -------


def test_stored_records_reference_the_objects_put_in_place(records: list[build.Record]) -> None:
    store = build.EXAMPLE_PLACES["store"]
    referencing = [r for r in records if "object" in r.case.spec]
    assert len(referencing) >= 80
    for r in referencing:
        request = orjson.loads(r.value or b"") if r.case.answer == "ok" else None
        if request is not None:  # an ok one: version 2, trusted, and its object is there as is
            ref = request["matrix"]["ref"]
            assert request["schema_version"] == 2, r.name
            assert r.reference == ref["url"], r.name
            assert ref["url"].startswith((f"{store}/", f"file://{build.EXAMPLE_PLACES['root']}/"))
            (upload,) = [u for u in r.uploads if u.url == ref["url"]]
            assert len(upload.data) == ref["nbytes"], r.name
            assert hashlib.sha256(upload.data).hexdigest() == ref["sha256"], r.name
    by_name = {r.name: r for r in referencing}
    short = by_name["stored-object-short"]
    assert [len(u.data) for u in short.uploads] == [40]
    assert by_name["stored-missing"].uploads == []
    (target, link) = by_name["stored-untrusted-symlink"].uploads
    assert link.link == target.url.removeprefix("file://") and link.url == (
        by_name["stored-untrusted-symlink"].reference
    )


def test_only_the_runs_places_change_between_runs() -> None:
    here = build.build_all(TOPICS)
    # What makes the example places, and what makes another run's.
    example = (b"/srv/adv-run", b"adv-run", b"svd-payloads")
    other = (b"/var/tmp/pytest-7/objects", b"adv-0123456789", b"another-bucket")
    assert build.places(*(x.decode() for x in example[::-1])) == build.EXAMPLE_PLACES
    there = build.build_all({**TOPICS, **build.places(*(x.decode() for x in other[::-1]))})

    def same(a: bytes | None, b: bytes | None) -> bool:
        for mine, theirs in zip(example, other, strict=True):
            b = None if b is None else b.replace(theirs, mine)
        return a == b

    for a, b in zip(here, there, strict=True):
        assert a.name == b.name and a.key == b.key
        assert same(a.value, b.value), a.name
        assert all(same(x, y) for (_, x), (_, y) in zip(a.headers, b.headers, strict=True))
        assert [u.data for u in a.uploads] == [u.data for u in b.uploads], a.name


def _stored_answer(record: build.Record, s_scale: float = 1.0) -> tuple[judge.Seen, bytes, str]:
    """An answer whose factors are stored, as the service writes it, and the object's bytes."""
    assert record.matrix is not None
    u, s, vt = np.linalg.svd(record.matrix, full_matrices=False)
    meta = SvdResultMeta(
        schema_version=2,
        request_id=record.case.request_id or "",
        timings=Timings(queue_wait_ms=0, compute_ms=0, total_ms=0),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )
    wire = codec.stored_factors(u, s * s_scale, vt)
    data = b"".join(a.tobytes() for a in wire.values())
    url = f"{build.EXAMPLE_PLACES['store']}/results/x"
    ref = ObjectRef(url=url, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    out = bytearray(codec.STORED_RESULT_ROOM)
    size, headers = codec.write_stored_result(meta, wire, ref, memoryview(out))
    key = (record.case.request_id or "").encode()
    return judge.Seen(TOPICS["results"], 0, 0, key, bytes(out[:size]), headers), data, url


def test_the_judge_reads_and_checks_stored_results() -> None:
    record = _case("stored-result")
    sent = [judge.Sent(record, 0, 0)]
    seen, data, url = _stored_answer(record)
    assert [a.ref.url for a in judge.stored_results([seen])] == [url]

    def kinds(objects: dict[str, bytes | None]) -> list[str]:
        return sorted(m.kind for m in judge.judge(sent, [seen], TOPICS, objects).mismatches)

    assert kinds({url: data}) == []
    assert kinds({}) == ["answer"]  # not read: no factors to check
    assert kinds({url: data[:-8]}) == ["answer"]
    assert kinds({url: data[:-1] + bytes([data[-1] ^ 1])}) == ["answer"]
    wrong, wrong_data, _ = _stored_answer(record, s_scale=1.01)
    got = judge.judge(sent, [wrong], TOPICS, {url: wrong_data}).mismatches
    assert [m.kind for m in got] == ["factors"]


def test_the_judge_wants_stored_factors_where_the_case_says_and_only_there() -> None:
    inline_case = _case("stored-f64-none")
    seen, data, url = _stored_answer(inline_case)
    kinds = [
        m.kind
        for m in judge.judge(
            [judge.Sent(inline_case, 0, 0)], [seen], TOPICS, {url: data}
        ).mismatches
    ]
    assert kinds == ["result-kind"]
    stored_case = _case("stored-result")
    assert stored_case.matrix is not None
    u, s, vt = np.linalg.svd(stored_case.matrix, full_matrices=False)
    meta = SvdResultMeta(
        request_id=stored_case.case.request_id or "",
        timings=Timings(queue_wait_ms=0, compute_ms=0, total_ms=0),
        worker=WorkerInfo(instance_id="i", host="h", pid=1),
    )
    message = codec.encode_result(meta, u, s, vt, codec.Encoding.JSON)
    inline = judge.Seen(TOPICS["results"], 0, 0, message.key, message.value, message.headers)
    kinds = [
        m.kind for m in judge.judge([judge.Sent(stored_case, 0, 0)], [inline], TOPICS).mismatches
    ]
    assert kinds == ["result-kind"]
