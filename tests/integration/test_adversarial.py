"""The adversarial corpus (tests/adversarial/corpus.yaml, docs/adversarial-corpus.md) against the
real broker, the real object store and the real service.

Every record is produced with aiokafka's plain producer (one per codec), not the SDK. Then, for
each record: exactly the answers its case says (by request id, on the right topic, with the right
code), its dead letter (by source offset: exact or truncated as the case says, code, request id,
attempts), the numbers of every ok answer; the service alive with a clean log, its group committed
to the end of the requests topic, and valid requests sent afterwards answered correctly.

Waiting is on conditions: the group's commit reaching the end of the requests topic means every
record was answered (the service commits an offset only once its answers were acknowledged), so
the output topics are then read to their ends and judged once.

Stored objects: the objects the records reference (and decoys where an untrusted reference
points) are put in the session's S3 store, under a prefix of this run, and in a directory the
service trusts, before anything is produced. Afterwards the object of every ok stored request is
gone (waited for: the service deletes it once the answer is committed), every other object is
still there, and nothing else is under the run's prefix but the stored results the answers
reference (read and verified by the judge, then deleted as a client would) and the whole originals
that truncated dead letters reference (read and compared with what was sent).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import obstore
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from localkafka import TopicSettings
from tests.adversarial import build
from tests.adversarial.judge import (
    Seen,
    Sent,
    Verdict,
    factor_problem,
    judge,
    read_answer,
    stored_originals,
    stored_results,
)
from tests.support.service import ServiceProcess
from tests.support.tally import committed_offsets, end_offsets

if TYPE_CHECKING:
    from tests.conftest import ObjectStoreEndpoint

pytestmark = pytest.mark.kafka

MIB = 1 << 20
CODEC_TYPES = {"none": None, "gzip": "gzip", "snappy": "snappy", "lz4": "lz4", "zstd": "zstd"}
CORPUS_COMMIT_TIMEOUT = 75.0
AFTER_TIMEOUT = 30.0
DELETE_TIMEOUT = 30.0  # the service deletes an answered request's object after the commit
POOL_SIZE = 2


async def _create_topics(bootstrap: str, wanted: dict[str, tuple[int, int]]) -> None:
    """{name: (partitions, max.message.bytes)}; waits until every partition is visible."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(name, parts, 1, topic_configs={"max.message.bytes": str(limit)})
                for name, (parts, limit) in wanted.items()
            ]
        )
        for topic, code, *message in response.topic_errors:
            assert code == 0, f"creating {topic}: error {code} {message}"
        deadline = time.monotonic() + 30
        while True:
            described = await admin.describe_topics(list(wanted))
            seen = {t["topic"]: len(t["partitions"]) for t in described}
            if all(seen.get(name, 0) >= parts for name, (parts, _) in wanted.items()):
                return
            assert time.monotonic() < deadline, f"topics not visible: {seen}"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def _partitions(bootstrap: str, topics: Sequence[str]) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]


async def _produce(
    bootstrap: str, topic: str, items: Sequence[tuple[str, bytes | None, bytes | None, list[Any]]]
) -> list[tuple[int, int]]:
    """(codec, key, value, headers) each with a plain producer of that codec, in order per codec.
    Returns each record's (partition, offset)."""
    producers: dict[str, AIOKafkaProducer] = {}
    try:
        for codec_name in dict.fromkeys(c for c, *_ in items):
            producers[codec_name] = AIOKafkaProducer(
                bootstrap_servers=bootstrap,
                acks="all",
                compression_type=CODEC_TYPES[codec_name],
                max_request_size=16 * MIB,
                linger_ms=5,
            )
            await producers[codec_name].start()
        futures = []
        for c, key, value, headers in items:
            if key is None and value is None:
                # aiokafka's send() refuses a record with neither key nor value, which Kafka
                # itself (and any other client) allows: send it as a batch of its own.
                batch = producers[c].create_batch()
                batch.append(timestamp=None, key=None, value=None, headers=headers)
                futures.append(await producers[c].send_batch(batch, topic, partition=0))
            else:
                futures.append(await producers[c].send(topic, value, key=key, headers=headers))
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        for p in producers.values():
            await p.stop()


async def _wait_committed_to_end(
    bootstrap: str, group: str, topic: str, timeout: float, service: ServiceProcess
) -> None:
    """Until ``group`` committed every partition of ``topic`` to its end (taken now). A group
    coordinator that is not there yet (a fresh broker) is waited for like the commit; a service
    that exited ends the wait."""
    ends = await end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout
    committed: dict[int, int] | str = {}
    while True:
        if service.proc is None or service.proc.poll() is not None:
            raise AssertionError(f"the service exited; committed {committed}, ends {ends}")
        try:
            committed = await committed_offsets(bootstrap, group, topic)
            if all(committed.get(p, 0) >= end for p, end in ends.items()):
                return
        except KafkaError as exc:
            committed = repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"committed {committed}, short of the ends {ends}, in {timeout:g}s"
            )
        await asyncio.sleep(0.25)


class RunObjects:
    """This run's objects: s3:// ones in the session's bucket under ``run``/, file:// ones under
    ``directory``. Puts them in place, tells which exist, lists what is there, reads, removes."""

    def __init__(self, store: ObjectStoreEndpoint, run: str, directory: Path) -> None:
        self._client = store.client()
        self._bucket = store.bucket
        self.run = run
        self.directory = directory

    def _key(self, url: str) -> str:
        prefix = f"s3://{self._bucket}/"
        assert url.startswith(prefix), f"{url} is not in the session's bucket"
        return url.removeprefix(prefix)

    async def put(self, uploads: Sequence[build.Upload], root: str) -> None:
        """Each upload in place; ``root``, the directory the service trusts, made even if no
        file goes there."""
        files = [u for u in uploads if u.url.startswith("file://")]
        await asyncio.to_thread(self._write, files, Path(root))
        await asyncio.gather(
            *(
                obstore.put_async(self._client, self._key(u.url), u.data)
                for u in uploads
                if not u.url.startswith("file://")
            )
        )

    def _write(self, files: Sequence[build.Upload], root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for upload in files:
            path = Path(upload.url.removeprefix("file://"))
            assert path.is_relative_to(self.directory), upload.url
            path.parent.mkdir(parents=True, exist_ok=True)
            if upload.link is not None:
                os.symlink(upload.link, path)
            else:
                path.write_bytes(upload.data)

    def _files(self) -> set[str]:
        return {
            f"file://{path}"
            for path in self.directory.rglob("*")
            if path.is_symlink() or path.is_file()
        }

    async def exists(self, url: str) -> bool:
        if url.startswith("file://"):
            return await asyncio.to_thread(os.path.lexists, url.removeprefix("file://"))
        try:
            await obstore.head_async(self._client, self._key(url))
        except FileNotFoundError:
            return False
        return True

    async def listing(self) -> set[str]:
        """Every object under the run's prefix and every file or link under its directory."""
        found = {
            f"s3://{self._bucket}/{meta['path']}"
            async for chunk in obstore.list(self._client, prefix=f"{self.run}/")
            for meta in chunk
        }
        return found | await asyncio.to_thread(self._files)

    async def read(self, url: str) -> bytes | None:
        if not url.startswith(f"s3://{self._bucket}/{self.run}/"):
            return None  # not a place this run's service writes to
        try:
            got = await obstore.get_async(self._client, self._key(url))
            return bytes(await got.bytes_async())
        except FileNotFoundError:
            return None

    async def remove(self, urls: Iterable[str]) -> None:
        await asyncio.gather(
            *(obstore.delete_async(self._client, self._key(u)) for u in urls if u.startswith("s3:"))
        )


async def _wait_gone(
    objects: RunObjects, urls: set[str], timeout: float, service: ServiceProcess
) -> set[str]:
    """Until none of ``urls`` exists (the service deleted them), the service exits, or the
    deadline; returns those still there."""
    deadline = time.monotonic() + timeout
    left = set(urls)
    while True:
        left = {u for u in left if await objects.exists(u)}
        alive = service.proc is not None and service.proc.poll() is None
        if not left or not alive or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.2)


class Output:
    """Reads the service's output topics from the beginning, keeping every record."""

    def __init__(
        self, bootstrap: str, topics: Sequence[str], isolation_level: str = "read_uncommitted"
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self.seen: list[Seen] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
            fetch_max_bytes=64 * MIB,
            max_partition_fetch_bytes=64 * MIB,
        )

    async def __aenter__(self) -> Output:
        await self._consumer.start()
        self._consumer.assign(await _partitions(self._bootstrap, self._topics))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=200)
        for records in batch.values():
            for r in records:
                self.seen.append(
                    Seen(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers))
                )

    async def read_to_end(self, timeout: float = 30.0) -> None:
        ends = await self._consumer.end_offsets(list(self._consumer.assignment()))
        deadline = time.monotonic() + timeout
        while True:
            positions = {tp: await self._consumer.position(tp) for tp in ends}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return
            assert time.monotonic() < deadline, f"read {positions}, short of {ends}"
            await self.poll()

    async def wait_for(self, ids: set[str], timeout: float, *, start: int = 0) -> set[str]:
        """Poll until an answer carrying each of ``ids`` arrived (among the records read from
        index ``start`` on); returns the ids still missing at the deadline."""
        deadline = time.monotonic() + timeout
        missing, checked = set(ids), start
        while True:
            for s in self.seen[checked:]:
                missing.discard(read_answer(s, s.topic).request_id)  # type: ignore[arg-type]
            checked = len(self.seen)
            if not missing or time.monotonic() > deadline:
                return missing
            await self.poll()


def _after_requests(
    rng: np.random.Generator,
) -> list[tuple[str, str, np.ndarray, dict[str, Any], bytes, list[Any]]]:
    """Valid requests for after the corpus, one per codec and encoding, built by hand."""
    out = []
    shapes = [((12, 9), "float64"), ((10, 6), "float32"), ((7, 7), "float32"),
              ((20, 4), "float64"), ((5, 11), "float64"), ((9, 9), "float64")]  # fmt: skip
    for i, (codec_name, ((m, n), dtype)) in enumerate(
        zip([*build.CODECS, "none"], shapes, strict=True)
    ):
        matrix = rng.standard_normal((m, n)).astype(dtype)
        request_id = f"after-{i}-{codec_name}"
        options = {"quality": True} if i == 5 else {}
        body = {"schema_version": 1, "request_id": request_id, "options": options,
                "matrix": {"shape": [m, n], "dtype": dtype}}  # fmt: skip
        if i % 2:
            value = matrix.astype(matrix.dtype.newbyteorder("<")).tobytes()
            headers = [
                ("content-type", build.CONTENT_TYPE_BINARY),
                ("svd-meta", orjson.dumps(body)),
            ]
        else:
            body["matrix"]["data"] = [float(x) for x in matrix.reshape(-1)]
            value = orjson.dumps(body)
            headers = [("content-type", build.CONTENT_TYPE_JSON)]
        out.append((request_id, codec_name, matrix, options, value, headers))
    return out


# exactly_once: every answer and dead letter goes through a transaction, which a record the
# broker refuses (a dead letter larger than its topic takes) would abort for good.
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_adversarial_corpus(
    kafka_bootstrap: str,
    topics: TopicSettings,
    object_store: ObjectStoreEndpoint,
    tmp_path: Path,
    guarantee: str,
) -> None:
    started = time.monotonic()
    # This run's own places in the session's store (the bucket is shared): the corpus names them
    # by placeholder, so everything else about its records is the same every run.
    run = f"adv-{uuid.uuid4().hex[:10]}"
    directory = (tmp_path / "objects").resolve()
    where = build.places(object_store.bucket, run, str(directory))
    names = {
        "requests": topics.requests,
        "results": topics.results,
        "dlq": f"{topics.dlq}-small",  # smaller than the largest values: truncated dead letters
        "reply": f"{topics.results}.adv",  # allowed: <results topic>.<suffix>
        "other": f"tenant-b-{topics.results}",  # another tenant's, existing
        **where,
    }
    await _create_topics(
        kafka_bootstrap,
        {
            names["dlq"]: (1, build.DLQ_MESSAGE_BYTES),
            names["reply"]: (2, topics.max_message_bytes),
            names["other"]: (1, topics.max_message_bytes),
        },
    )
    records = build.build_all(names)
    objects = RunObjects(object_store, run, directory)
    uploads = [u for r in records for u in r.uploads]
    await objects.put(uploads, where["root"])
    group = f"g-{topics.requests}"
    service_topics = TopicSettings(
        requests=topics.requests, results=topics.results, dlq=names["dlq"]
    )
    service = ServiceProcess(
        kafka_bootstrap, service_topics, tmp_path / "svc.log", group_id=group,
        pool_size=POOL_SIZE, max_message_bytes=build.SERVICE_MESSAGE_BYTES,
        processing_guarantee=guarantee,
        extra_env={
            **object_store.env,
            "SVD_STORE_URL": where["store"],
            "SVD_STORE_TRUSTED_URLS": f"file://{where['root']}",
        },
    )  # fmt: skip
    # Exactly once is what read_committed readers see.
    isolation = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    verdict = Verdict()
    after = _after_requests(np.random.default_rng(15))
    output_topics = [names["results"], names["reply"], names["other"], names["dlq"]]
    with service:
        await asyncio.to_thread(service.wait_ready, 60)
        async with Output(kafka_bootstrap, output_topics, isolation) as output:
            places = await _produce(
                kafka_bootstrap,
                topics.requests,
                [(r.case.codec, r.key, r.value, r.headers) for r in records],
            )
            sent = [Sent(r, p, o) for r, (p, o) in zip(records, places, strict=True)]
            try:
                await _wait_committed_to_end(
                    kafka_bootstrap, group, topics.requests, CORPUS_COMMIT_TIMEOUT, service
                )
            except AssertionError as exc:
                verdict.add("(service)", "commit", "the corpus committed to the end", exc)
            await output.read_to_end()
            corpus_seen = list(output.seen)

            # Valid requests after the corpus: the service still answers, and answers right.
            await _produce(
                kafka_bootstrap,
                topics.requests,
                [(c, r.encode(), v, h) for r, c, _, _, v, h in after],
            )
            missing = await output.wait_for(
                {r for r, *_ in after},
                AFTER_TIMEOUT if service.proc and service.proc.poll() is None else 0,
                start=len(corpus_seen),
            )
            try:
                await _wait_committed_to_end(kafka_bootstrap, group, topics.requests, 30, service)
            except AssertionError as exc:
                verdict.add("(service)", "commit", "everything committed to the end", exc)
            await output.read_to_end()
            late = output.seen[len(corpus_seen) :]
            # The object of every ok stored request: deleted once its answer was committed.
            deleted = {r.reference for r in records if r.case.answer == "ok" and r.reference}
            not_deleted = await _wait_gone(objects, deleted, DELETE_TIMEOUT, service)
        alive = service.proc is not None and service.proc.poll() is None
        log = service.log()

    # Read stored results as a client would, and the originals dead letters keep, for the judge.
    results = {s.ref.url: await objects.read(s.ref.url) for s in stored_results(corpus_seen)}
    originals = {u: await objects.read(u) for u in stored_originals(corpus_seen, names["dlq"])}
    corpus_verdict = judge(
        sent, corpus_seen, names, {**results, **originals}, originals_stored=True
    )
    verdict.mismatches[:0] = corpus_verdict.mismatches
    for name in ("answers", "ok_answers", "error_answers", "dead_letters"):
        setattr(verdict, name, getattr(corpus_verdict, name))

    after_ids = {r for r, *_ in after}
    for request_id, _, matrix, options, _, _ in after:
        answers = [a for a in (read_answer(s, s.topic) for s in late) if a.request_id == request_id]
        if request_id in missing or len(answers) != 1 or answers[0].result is None:
            verdict.add(request_id, "after-corpus", "one ok answer",
                        [a.outcome for a in answers] or "nothing")  # fmt: skip
            continue
        problem = factor_problem(matrix, options, answers[0].result)
        if problem:
            verdict.add(request_id, "after-corpus-factors", "A = U diag(S) Vt", problem)
    # Anything else that arrived after the corpus was judged is a late (duplicate) answer.
    for s in late:
        a = read_answer(s, s.topic)
        if s.topic == names["dlq"] or a.request_id not in after_ids:
            verdict.add(f"{s.topic}@{s.partition}:{s.offset}", "late-record",
                        "nothing more for the corpus", f"{a.outcome} {a.request_id!r}")  # fmt: skip

    # Every object as the service must leave it, now that it is stopped: an ok request's deleted,
    # everything else kept (a failed request's object stays for its dead letter; decoys where an
    # untrusted reference points are not the service's to touch), nothing else but stored results
    # and the originals of dead letters (which the judge found there).
    by_url = {u.url: r for r in records for u in r.uploads}
    for url in sorted(not_deleted):
        verdict.add(by_url[url].name if url in by_url else url, "object-not-deleted",
                    f"{url} deleted after its ok answer was committed", "still there")  # fmt: skip
    kept = {url for url in by_url if url not in deleted}
    there = await objects.listing()
    for url in sorted(kept - there):
        verdict.add(by_url[url].name, "object-lost", f"{url} kept", "gone")
    for url in sorted(there - kept - set(results) - set(originals) - not_deleted):
        verdict.add(url, "object-stray", "the corpus's objects, stored results and dead letters' "
                    "originals only", "there")  # fmt: skip
    await objects.remove(there)

    # A replaced worker shows as a new pid in the answers: more pids than the pool is a restart.
    pids = set()
    for a in (read_answer(s, s.topic) for s in [*corpus_seen, *late]):
        meta = a.result.meta if a.result else a.stored.meta if a.stored else None
        if meta is not None and meta.worker is not None:
            pids.add(meta.worker.pid)
    if len(pids) > POOL_SIZE:
        verdict.add("(service)", "worker-restart", f"at most {POOL_SIZE} worker pids", sorted(pids))
    if not alive:
        verdict.add(
            "(service)", "process", "alive", f"exited {service.proc and service.proc.returncode}"
        )
    for pattern, what in ((r"Traceback", "traceback"), (r"CRITICAL", "critical"),
                          (r"attempt \d+ failed", "worker retry")):  # fmt: skip
        hits = re.findall(rf".*{pattern}.*", log)
        if hits:
            verdict.add("(service)", f"log-{what}", f"no {what} in the log",
                        f"{len(hits)} lines, e.g. {hits[0][:300]}")  # fmt: skip

    cases = len({r.case.case for r in records})
    summary = (
        f"adversarial corpus ({guarantee}): {len(records)} records ({cases} cases) sent, "
        f"{verdict.answers} answers ({verdict.ok_answers} ok, {verdict.error_answers} errors), "
        f"{verdict.dead_letters} dead letters; {len(uploads)} objects put, "
        f"{len(deleted) - len(not_deleted)}/{len(deleted)} deleted by the service, "
        f"{len(results)} stored results, {len(originals)} dead letters' originals stored; "
        f"{len(verdict.mismatches)} mismatches "
        f"in {time.monotonic() - started:.0f}s"
    )
    print(f"\n{summary}")
    if verdict.mismatches:
        kinds = ", ".join(f"{k} {n}" for k, n in verdict.by_kind().most_common())
        lines = "\n".join(m.line() for m in verdict.mismatches)
        pytest.fail(f"{summary}\nmismatches by kind: {kinds}\n{lines}", pytrace=False)
