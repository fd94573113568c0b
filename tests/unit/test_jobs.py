"""The parent's side of a job (consumer/jobs.py): each record copied into one block once, its
headers packed beside it, and the block given back only when the last answer in it is done.

The worker's side of the same block is tested in test_processing.py (one record's pass) and
test_pool.py (whole jobs in real worker processes).
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.jobs import (
    Answered,
    JobItem,
    PreparedJob,
    Record,
    WorkerContext,
    pack_headers,
    prepare_job,
    release_view,
    unpack_headers,
)
from consumer.shm import SHM_DIR, SegmentCache
from schemas.limits import DecodeLimits

pytestmark = pytest.mark.usefixtures("no_leaked_segments")

CONTEXT = WorkerContext(DecodeLimits(), instance_id="test", host="here")


# --- headers ------------------------------------------------------------------------------------

HEADERS = [
    ("content-type", b"application/vnd.svd.binary"),
    ("svd-meta", b'{"request_id": "r-1"}'),
    ("x-null", None),  # Kafka headers may have a null value: it stays null, not b""
    ("x-empty", b""),
    ("名前", "ünïcødé".encode()),  # non-ASCII names, in UTF-8 on the wire
    ("x-\udcff-undecodable", b"\x00\xff"),  # a name that was not UTF-8 (surrogate-escaped)
    ("content-type", b"repeated names stay, in order"),
]


def test_headers_survive_packing() -> None:
    packed = pack_headers(HEADERS)
    assert unpack_headers(memoryview(packed)) == HEADERS
    assert unpack_headers(memoryview(pack_headers([]))) == []


@given(
    st.lists(
        st.tuples(st.text(max_size=20), st.one_of(st.none(), st.binary(max_size=40))),
        max_size=8,
    )
)
def test_any_headers_survive_packing(headers: list[tuple[str, bytes | None]]) -> None:
    assert unpack_headers(memoryview(pack_headers(headers))) == headers


def test_a_record_is_copied_into_its_block_once_with_its_headers() -> None:
    records = [
        Record(value=b"\x01" * 100, headers=HEADERS, timestamp_ms=1234, answer_bytes=5000),
        Record(value=b"", headers=[], timestamp_ms=None, answer_bytes=1, fault="kill"),
    ]
    with prepare_job(records, CONTEXT, attempt=2, dispatched_at=5.0) as prepared:
        job = prepared.job
        assert (job.attempt, job.dispatched_at, job.context) == (2, 5.0, CONTEXT)
        for record, item in zip(records, job.items, strict=True):
            with prepared.block.view(item.value) as value:
                assert bytes(value) == record.value
            with prepared.block.view(item.headers) as packed:
                assert unpack_headers(packed) == list(record.headers)
            layout = job.block.arrays[item.answer]
            assert layout.nbytes == record.answer_bytes  # the room the parent reserved
            assert item.fault == record.fault
        assert [item.timestamp_ms for item in job.items] == [1234, -1]  # -1: no timestamp


def test_a_job_needs_a_record() -> None:
    with pytest.raises(ValueError, match="at least one"):
        prepare_job([], CONTEXT)


def test_job_items_stay_plain_values() -> None:
    # What crosses the worker's pipe (tests/unit/test_no_pickle.py): no new types.
    hints = typing.get_type_hints(JobItem)
    for field in dataclasses.fields(JobItem):
        leaves = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        assert leaves <= {int, str, type(None)}, field.name


# --- the block's life: held by the answers still being published --------------------------------


def _job(cache: SegmentCache, items: int = 1) -> PreparedJob:
    record = Record(value=b"\x02" * 64, headers=[], timestamp_ms=None, answer_bytes=256)
    return prepare_job([record] * items, CONTEXT, cache=cache)


def _answered(value_bytes: int) -> Answered:
    return Answered(
        request_id="r-1", reply_topic=None, created_at_ms=None, value_bytes=value_bytes,
        headers=(), compute_ms=0.0, queue_wait_ms=0.0,
    )  # fmt: skip


def test_the_block_goes_back_to_the_cache_only_after_the_last_release() -> None:
    cache = SegmentCache(max_bytes=1 << 20)
    with _job(cache, items=2) as prepared:
        name = prepared.block.descriptor.name
        prepared.hold()  # two answers, published after the job's ``with`` ended
        prepared.hold()
        answers = [prepared.answer(i, _answered(10)) for i in range(2)]
        prepared.block.write(prepared.job.items[1].answer, b"answer two")
    assert cache.idle_names == []  # still held: its answers live in it
    assert bytes(answers[1]) == b"answer two"
    release_view(answers[0])
    prepared.release()
    assert cache.idle_names == []  # one answer still being published
    assert bytes(answers[1]) == b"answer two"
    release_view(answers[1])
    prepared.release()
    assert cache.idle_names == [name]  # the last release gave it back, for the next job
    with _job(cache) as reused:
        assert reused.block.descriptor.name == name
    assert cache.reused == 1
    cache.close()


def test_a_block_nobody_holds_goes_back_when_its_job_ends() -> None:
    cache = SegmentCache(max_bytes=1 << 20)
    with _job(cache) as prepared:
        name = prepared.block.descriptor.name
    assert cache.idle_names == [name]
    cache.close()


def test_a_view_still_alive_makes_the_segment_be_destroyed_not_reused() -> None:
    cache = SegmentCache(max_bytes=1 << 20)
    with _job(cache) as prepared:
        name = prepared.block.descriptor.name
        prepared.hold()
        view = prepared.answer(0, _answered(8))
        prepared.block.write(prepared.job.items[0].answer, b"mine....")
        # Someone kept a view derived from the answer (an array over it, say): releasing the
        # answer's view cannot end the export, so the segment must never serve another job.
        derived = np.frombuffer(view, dtype=np.uint8)
    release_view(view)  # does not raise, though the derived array keeps the buffer exported
    prepared.release()
    assert cache.idle_names == []
    assert not (SHM_DIR / name).exists()  # destroyed: its name is gone
    with _job(cache) as other:
        assert other.block.descriptor.name != name
        other.block.write(other.job.items[0].answer, b"theirs..")
    assert bytes(derived) == b"mine...."  # the stale view still reads its own job's answer
    del derived
    cache.close()


def test_a_failed_job_never_gives_its_segment_back_even_after_its_holders_are_done() -> None:
    cache = SegmentCache(max_bytes=1 << 20)
    with pytest.raises(RuntimeError), _job(cache) as prepared:
        prepared.hold()
        name = prepared.block.descriptor.name
        raise RuntimeError("the worker was killed")  # as pool.run raises on a crash or timeout
    assert (SHM_DIR / name).exists()  # still held
    prepared.release()
    assert cache.idle_names == []
    assert not (SHM_DIR / name).exists()
    cache.close()
