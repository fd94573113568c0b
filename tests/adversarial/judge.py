"""What the service owed each record of the corpus, against what it wrote: a list of mismatches.

Pure functions over records sent (with their partition and offset) and records read back from
the results, reply and dead-letter topics. Answers and dead letters are read leniently (plain
JSON and header lists, not the project's models), so a code the models do not know yet, or a
dead-letter header set that changed, is reported as a mismatch instead of an exception. A result
whose factors are stored (factors_ref) is judged from the object's bytes, which the caller read
from the store: their size and sha256 against the reference, then the numbers. So is the whole
original a truncated dead letter references (svd-dlq-original-ref) when the service has a store.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from schemas import codec
from tests.adversarial.build import RETRYABLE, Record

# A truncated dead letter keeps this much of each original header value and of the key.
TRUNCATED_FIELD_BYTES = 1024
DLQ_FIRST = "svd-dlq-schema-version"  # the first of the service's own dead-letter headers
# Always present on a dead letter (docs/wire-format.md, and the two added for truncation).
DLQ_REQUIRED = (
    "svd-dlq-schema-version", "svd-dlq-code", "svd-dlq-reason", "svd-dlq-source-topic",
    "svd-dlq-source-partition", "svd-dlq-source-offset", "svd-dlq-attempts",
    "svd-dlq-request-id", "svd-dlq-timestamp-ms", "svd-dlq-truncated", "svd-dlq-value-bytes",
)  # fmt: skip
# Where a dead letter too large for its topic keeps its whole original, with a store (JSON
# {url, nbytes, sha256}; empty or absent when the dead letter holds the original itself).
DLQ_ORIGINAL_REF = "svd-dlq-original-ref"


@dataclass(frozen=True)
class Seen:
    """A record read back from one of the service's output topics."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Sent:
    record: Record
    partition: int
    offset: int


@dataclass(frozen=True)
class Mismatch:
    case: str
    kind: str
    expected: str
    got: str

    def line(self) -> str:
        return f"{self.case}: {self.kind}: expected {self.expected}; got {self.got}"


@dataclass
class Answer:
    where: str  # "results", "reply" or another topic's name
    seen: Seen
    request_id: str | None = None
    status: str | None = None
    code: str | None = None  # None for a result
    retryable: object = None
    result: codec.DecodedResult | None = None
    stored: codec.StoredResult | None = None  # factors in the store, not loaded (yet)
    problem: str | None = None

    @property
    def outcome(self) -> str:
        return "undecodable" if self.problem else (self.code or "ok")


@dataclass
class DeadLetterSeen:
    seen: Seen
    original_headers: list[tuple[str, bytes | None]]
    fields: dict[str, str]

    @property
    def source(self) -> tuple[str, int, int] | None:
        try:
            return (
                self.fields["svd-dlq-source-topic"],
                int(self.fields["svd-dlq-source-partition"]),
                int(self.fields["svd-dlq-source-offset"]),
            )
        except (KeyError, ValueError):
            return None

    @property
    def original_ref(self) -> dict[str, Any] | str | None:
        """The reference to the whole original ({url, nbytes, sha256}), None when there is
        none, or what is wrong with the header."""
        text = self.fields.get(DLQ_ORIGINAL_REF, "")
        if not text:
            return None
        try:
            ref = orjson.loads(text)
            if isinstance(ref, dict) and all(
                isinstance(ref.get(k), t)
                for k, t in (("url", str), ("nbytes", int), ("sha256", str))
            ):
                return ref
        except orjson.JSONDecodeError:
            pass
        return f"not a reference: {text[:100]!r}"


@dataclass
class Verdict:
    mismatches: list[Mismatch] = field(default_factory=list)
    answers: int = 0
    ok_answers: int = 0
    error_answers: int = 0
    dead_letters: int = 0

    def add(self, case: str, kind: str, expected: object, got: object) -> None:
        self.mismatches.append(Mismatch(case, kind, str(expected), str(got)))

    def by_kind(self) -> Counter[str]:
        return Counter(m.kind for m in self.mismatches)


# ----------------------------------------------------------------------------------- reading


def header(headers: Iterable[tuple[str, bytes | None]], name: str) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def read_answer(seen: Seen, where: str) -> Answer:
    answer = Answer(where=where, seen=seen)
    content_type = (header(seen.headers, "content-type") or b"").decode("latin-1")
    try:
        if content_type.startswith("application/vnd.svd.binary"):
            meta = orjson.loads(header(seen.headers, "svd-meta") or b"")
        else:
            meta = orjson.loads(seen.value or b"")
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        answer.request_id = meta.get("request_id")
        answer.status = meta.get("status")
        if answer.status == "error":
            answer.code = str(meta.get("code"))
            answer.retryable = meta.get("retryable")
        elif answer.status == "ok":
            reply = codec.decode_reply(seen.value or b"", seen.headers)
            if isinstance(reply, codec.StoredResult):
                answer.stored = reply
            elif isinstance(reply, codec.DecodedResult):
                answer.result = reply
            else:
                raise ValueError(f"status ok read as {type(reply).__name__}")
        else:
            raise ValueError(f"status {answer.status!r}")
    except Exception as exc:
        answer.problem = f"{type(exc).__name__}: {exc}"[:200]
    return answer


def read_dead_letter(seen: Seen) -> DeadLetterSeen | None:
    names = [name for name, _ in seen.headers]
    if DLQ_FIRST not in names:
        return None
    start = len(names) - 1 - names[::-1].index(DLQ_FIRST)
    ours = {name: (value or b"").decode("utf-8", "replace") for name, value in seen.headers[start:]}
    return DeadLetterSeen(seen, list(seen.headers[:start]), ours)


# ---------------------------------------------------------------------------------- judging


def stored_results(seen: Iterable[Seen]) -> list[codec.StoredResult]:
    """The answers among ``seen`` whose factors are in the store (to read before judging)."""
    return [a.stored for a in (read_answer(s, s.topic) for s in seen) if a.stored is not None]


def stored_originals(seen: Iterable[Seen], dlq: str) -> list[str]:
    """The URLs of the originals that dead letters among ``seen`` (on ``dlq``) keep in the store
    (to read before judging)."""
    letters = (read_dead_letter(s) for s in seen if s.topic == dlq)
    refs = (letter.original_ref for letter in letters if letter is not None)
    return [ref["url"] for ref in refs if isinstance(ref, dict)]


def load_stored(stored: codec.StoredResult, data: bytes | None) -> codec.DecodedResult | str:
    """The result of a stored answer from its object's bytes, or why it cannot be had."""
    ref = stored.ref
    if data is None:
        return f"{ref.url} could not be read"
    if len(data) != ref.nbytes:
        return f"{ref.url} is {len(data)} bytes; factors_ref says {ref.nbytes}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        return f"{ref.url} has sha256 {digest}; factors_ref says {ref.sha256}"
    try:
        return codec.load_stored_result(stored, data)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]


def judge(
    sent: list[Sent],
    seen: list[Seen],
    topics: Mapping[str, str],
    objects: Mapping[str, bytes | None] | None = None,
    *,
    originals_stored: bool = False,
) -> Verdict:
    """Every record's answers and dead letters against its case. ``topics``: results, reply,
    dlq and requests by role; ``objects``: the bytes of stored results and of dead letters'
    originals by URL (None: unread); ``originals_stored``: the service has a store, so a
    truncated dead letter must reference its whole original in it."""
    verdict = Verdict()
    role = {topics["results"]: "results", topics["reply"]: "reply"}
    answers: defaultdict[str | None, list[Answer]] = defaultdict(list)
    dead: defaultdict[tuple[int, int], list[DeadLetterSeen]] = defaultdict(list)
    for s in seen:
        if s.topic == topics["dlq"]:
            letter = read_dead_letter(s)
            source = letter.source if letter else None
            if letter is None or source is None:
                verdict.add(f"{s.topic}@{s.partition}:{s.offset}", "stray-on-dlq",
                            "a dead letter", _show(s))  # fmt: skip
                continue
            verdict.dead_letters += 1
            if source[0] != topics["requests"]:
                verdict.add(f"dead letter of {source}", "stray-dead-letter",
                            f"source {topics['requests']}", source[0])  # fmt: skip
                continue
            dead[source[1:]].append(letter)
            continue
        answer = read_answer(s, role.get(s.topic, s.topic))
        if answer.stored is not None:
            loaded = load_stored(answer.stored, (objects or {}).get(answer.stored.ref.url))
            if isinstance(loaded, str):
                answer.problem = f"stored factors: {loaded}"
            else:
                answer.result = loaded
        verdict.answers += 1
        if answer.status == "ok":
            verdict.ok_answers += 1
        elif answer.status == "error":
            verdict.error_answers += 1
        answers[answer.request_id if isinstance(answer.request_id, str) else None].append(answer)

    by_id: defaultdict[str, list[Sent]] = defaultdict(list)
    for s in sent:
        if s.record.case.request_id is not None:
            by_id[s.record.case.request_id].append(s)
    _judge_answers(verdict, by_id, answers)
    by_source = {(s.partition, s.offset): s for s in sent}
    for where in dead:
        if where not in by_source:
            verdict.add(f"dead letter of {topics['requests']}@{where[0]}:{where[1]}",
                        "stray-dead-letter", "a record of the corpus", "none sent there")  # fmt: skip
    for s in sent:
        letters = dead.get((s.partition, s.offset), [])
        _judge_dead_letter(verdict, s, letters)
        if letters and s.record.case.dead_letter != "none":
            _judge_original(verdict, s, letters[0], objects or {}, originals_stored)
    return verdict


def _judge_answers(
    verdict: Verdict,
    by_id: Mapping[str, list[Sent]],
    answers: Mapping[str | None, list[Answer]],
) -> None:
    for request_id, sends in by_id.items():
        names = "+".join(s.record.name for s in sends)
        expected = sorted(
            f"{s.record.case.code or 'ok'}@{s.record.case.answer_topic}" for s in sends
        )
        got_answers = answers.get(request_id, [])
        got = sorted(f"{a.outcome}@{a.where}" for a in got_answers)
        if got != expected:
            kind = "answer-missing" if not got else "answer"
            verdict.add(names, kind, expected, [*got, *_problems(got_answers)])
        for a in got_answers:
            if a.problem:
                continue
            if a.status == "ok":
                # Only the case that asks for stored factors may get them, and it must.
                owed = {s.record.case.result for s in sends if s.record.case.answer == "ok"}
                got_kind = "stored" if a.stored is not None else "inline"
                if owed and got_kind not in owed:
                    verdict.add(names, "result-kind", f"factors {'/'.join(sorted(owed))}",
                                f"factors {got_kind}")  # fmt: skip
            if a.seen.key != request_id.encode():
                verdict.add(names, "answer-key", f"key {request_id!r}", f"key {a.seen.key!r}")
            if a.status == "error" and a.retryable is not (a.code in RETRYABLE):
                verdict.add(names, "answer-retryable", a.code in RETRYABLE, a.retryable)
        # Each ok answer must be the factors of one of the records that carry its id.
        for a in got_answers:
            if a.result is None:
                continue
            problems = [
                factor_problem(s.record.matrix, s.record.options, a.result)
                for s in sends
                if s.record.case.answer == "ok"
            ]
            if problems and all(problems):
                verdict.add(names, "factors", "A = U diag(S) Vt", problems[0])
    for request_id, got_answers in answers.items():
        if request_id is None or request_id not in by_id:
            for a in got_answers:
                verdict.add(f"answer {request_id!r} on {a.where}", "stray-answer",
                            "no answer for an unknown id", f"{a.outcome} {_show(a.seen)}")  # fmt: skip


def _judge_dead_letter(verdict: Verdict, sent: Sent, letters: list[DeadLetterSeen]) -> None:
    case = sent.record.case
    name = case.name
    if case.dead_letter == "none":
        if letters:
            verdict.add(name, "dead-letter-unexpected", "no dead letter",
                        [d.fields.get("svd-dlq-code") for d in letters])  # fmt: skip
        return
    if len(letters) != 1:
        verdict.add(name, "dead-letter-count", f"1 dead letter ({case.code})", len(letters))
        if not letters:
            return
    letter = letters[0]
    fields = letter.fields
    missing = [h for h in DLQ_REQUIRED if h not in fields]
    if missing:
        verdict.add(name, "dead-letter-headers", "all svd-dlq-* headers", f"missing {missing}")
    if fields.get("svd-dlq-code") != case.code:
        verdict.add(name, "dead-letter-code", case.code, fields.get("svd-dlq-code"))
    rid = fields.get("svd-dlq-request-id")
    if rid != (case.request_id or ""):
        verdict.add(name, "dead-letter-request-id", case.request_id or "(empty)", rid)
    attempts = fields.get("svd-dlq-attempts", "")
    good = attempts.isdecimal() and (
        int(attempts) == 0 if case.attempts == "0" else int(attempts) >= 1
    )
    if not good:
        verdict.add(name, "dead-letter-attempts", case.attempts, attempts)
    original = sent.record.value or b""
    value = letter.seen.value or b""
    want_headers = [(n, v if v is not None else b"") for n, v in sent.record.headers]
    got_headers = [(n, v if v is not None else b"") for n, v in letter.original_headers]
    key = sent.record.key
    if case.dead_letter == "exact":
        headers_ok = got_headers == want_headers
        key_ok = key is None or letter.seen.key == key
    else:  # cut down: each header value and the key to a prefix of at most 1 KiB
        headers_ok = [n for n, _ in got_headers] == [n for n, _ in want_headers] and all(
            w.startswith(g) and len(g) >= min(len(w), TRUNCATED_FIELD_BYTES)
            for (_, g), (_, w) in zip(got_headers, want_headers, strict=True)
        )
        got_key = letter.seen.key or b""
        key_ok = key is None or (
            key.startswith(got_key) and len(got_key) >= min(len(key), TRUNCATED_FIELD_BYTES)
        )
    if not headers_ok:
        verdict.add(name, "dead-letter-original-headers", _brief_headers(want_headers),
                    _brief_headers(got_headers))  # fmt: skip
    if not key_ok:
        verdict.add(name, "dead-letter-key", _short(key), _short(letter.seen.key))
    size = fields.get("svd-dlq-value-bytes")
    if "svd-dlq-value-bytes" in fields and size != str(len(original)):
        verdict.add(name, "dead-letter-value-bytes", len(original), size)
    truncated = fields.get("svd-dlq-truncated")
    if case.dead_letter == "exact":
        if value != original:
            verdict.add(name, "dead-letter-value", f"the original {len(original)} bytes",
                        f"{len(value)} bytes, {'a prefix' if original.startswith(value) else 'different'}")  # fmt: skip
        if "svd-dlq-truncated" in fields and truncated != "false":
            verdict.add(name, "dead-letter-truncated", "false", truncated)
    else:
        if truncated != "true":
            verdict.add(name, "dead-letter-truncated", "true", truncated)
        if not (len(value) < len(original) and original.startswith(value)):
            verdict.add(name, "dead-letter-value", f"a strict prefix of {len(original)} bytes",
                        f"{len(value)} bytes, {'a prefix' if original.startswith(value) else 'different'}")  # fmt: skip


def _judge_original(
    verdict: Verdict,
    sent: Sent,
    letter: DeadLetterSeen,
    objects: Mapping[str, bytes | None],
    required: bool,
) -> None:
    """A dead letter's reference to its whole original: only where it could not hold it, and
    there (with a store) always; the object is exactly the original value."""
    case = sent.record.case
    ref = letter.original_ref
    if case.dead_letter == "exact":
        if ref is not None:
            verdict.add(case.name, "dead-letter-original-ref", "none (it holds its original)", ref)
        return
    if ref is None:
        if required:
            verdict.add(case.name, "dead-letter-original-ref",
                        "a reference to the whole original", "none")  # fmt: skip
        return
    if isinstance(ref, str):
        verdict.add(case.name, "dead-letter-original-ref", "{url, nbytes, sha256}", ref)
        return
    original = sent.record.value or b""
    data = objects.get(ref["url"])
    digest = hashlib.sha256(original).hexdigest()
    if ref["nbytes"] != len(original) or ref["sha256"] != digest:
        verdict.add(case.name, "dead-letter-original-ref",
                    f"nbytes {len(original)}, sha256 {digest}", ref)  # fmt: skip
    if data != original:
        got = "unread" if data is None else f"{len(data)} other bytes"
        verdict.add(case.name, "dead-letter-original", f"{ref['url']}: the original", got)


# ------------------------------------------------------------------------------------ numbers


def factor_problem(
    matrix: np.ndarray[Any, Any] | None, options: Mapping[str, Any], result: codec.DecodedResult
) -> str | None:
    """Why ``result`` is not the SVD the options asked for, or None when it is."""
    if matrix is None:
        return "the corpus has no matrix for this record"
    # Compared at unit scale: the norms of entries near 1e300 overflow a double.
    unit = float(np.max(np.abs(matrix), initial=0.0)) or 1.0
    a = matrix.astype(np.float64) / unit
    m, n = a.shape
    dtype = options.get("dtype") or matrix.dtype.name
    k = options.get("k")
    r = int(k) if k is not None else min(m, n)
    full = bool(options.get("full_matrices", False))
    s = result.s
    if s.dtype.name != dtype:
        return f"s is {s.dtype.name}, expected {dtype}"
    if s.shape != (r,):
        return f"s has shape {s.shape}, expected {(r,)}"
    true_s = np.linalg.svd(a, compute_uv=False)[:r]
    scale = float(true_s[0]) if true_s.size else 0.0
    tol = (5e-3 if dtype == "float32" else 1e-6) * scale
    s64 = s.astype(np.float64) / unit
    if float(np.max(np.abs(s64 - true_s))) > tol:
        return f"s = {s64[:4]} but numpy says {true_s[:4]}"
    if not options.get("compute_uv", True):
        return None if result.u is None and result.vt is None else "u or vt without compute_uv"
    u, vt = result.u, result.vt
    if u is None or vt is None:
        return "u or vt missing"
    want_u, want_vt = ((m, m), (n, n)) if full else ((m, r), (r, n))
    if u.shape != want_u or vt.shape != want_vt:
        return f"u {u.shape}, vt {vt.shape}; expected {want_u}, {want_vt}"
    ur, vr = u[:, :r].astype(np.float64), vt[:r, :].astype(np.float64)
    eps = 5e-3 if dtype == "float32" else 1e-6
    if scale > 0:
        ortho = max(
            float(np.max(np.abs(ur.T @ ur - np.eye(r)))),
            float(np.max(np.abs(vr @ vr.T - np.eye(r)))),
        )
        if ortho > eps * 10:
            return f"U or V not orthonormal (max |Q^T Q - I| = {ortho:.3g})"
    residual = float(np.linalg.norm(a @ vr.T - ur * s64))
    if residual > tol * 10 * np.sqrt(r) + 1e-300:
        return f"||A v - s u|| = {residual:.3g} (scale {scale:.3g})"
    if k is None:
        error = float(np.linalg.norm(ur * s64 @ vr - a))
        if error > tol * 10 * np.sqrt(m * n) + 1e-300:
            return f"||U S Vt - A|| = {error:.3g} (scale {scale:.3g})"
    return None


# ----------------------------------------------------------------------------------- display


def _problems(answers: list[Answer]) -> list[str]:
    return [f"undecodable: {a.problem}" for a in answers if a.problem]


def _short(raw: bytes | None, limit: int = 60) -> str:
    if raw is None:
        return "null"
    text = repr(raw[:limit])
    return text + (f"... ({len(raw)} bytes)" if len(raw) > limit else "")


def _show(seen: Seen) -> str:
    return f"{seen.topic}@{seen.partition}:{seen.offset} key {_short(seen.key)} value {_short(seen.value)}"


def _brief_headers(headers: list[tuple[str, bytes]]) -> str:
    return "[" + ", ".join(f"{n}={_short(v, 24)}" for n, v in headers) + "]"
