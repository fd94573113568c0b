"""consumer.shm: layout, ownership, attach/detach across processes, and no leaks."""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from consumer import shm
from consumer.shm import (
    ALIGNMENT,
    SHM_DIR,
    ArraySpec,
    AttachedBlock,
    BlockDescriptor,
    SegmentCache,
    ShmAllocationError,
    ShmBlock,
    plan_layout,
    segment_prefix,
)

pytestmark = pytest.mark.usefixtures("no_leaked_segments")

REPO = Path(__file__).resolve().parents[2]


def _wait_until(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


def test_plan_layout_aligns_every_region() -> None:
    specs = [
        ArraySpec.of((3, 5), np.float32),
        ArraySpec.of((7,), np.float64),
        ArraySpec.of((1,), "f4"),
    ]
    layouts, size = plan_layout(specs)
    assert [layout.offset for layout in layouts] == [0, 64, 128]
    assert all(layout.offset % ALIGNMENT == 0 for layout in layouts)
    assert layouts[1].nbytes == 56
    assert size == 192
    assert plan_layout([])[1] == 1  # a segment is never empty


def test_block_roundtrip_and_unlink() -> None:
    a = np.arange(12.0).reshape(3, 4)
    with ShmBlock([ArraySpec.of(a.shape, a.dtype), ArraySpec.of((4,), np.float32)]) as block:
        name = block.descriptor.name
        assert name.startswith(segment_prefix())
        assert (SHM_DIR / name).exists()
        np.copyto(block.array(0), a)
        with AttachedBlock(block.descriptor) as attached:
            np.testing.assert_array_equal(attached.array(0), a)
            attached.array(1)[:] = [1, 2, 3, 4]
        np.testing.assert_array_equal(block.array(1), np.array([1, 2, 3, 4], np.float32))
        assert block.array(1, (2,)).tolist() == [1.0, 2.0]  # a shorter output
        with pytest.raises(ValueError, match="does not fit"):
            block.array(1, (5,))
    assert block.closed
    assert not (SHM_DIR / name).exists()
    with pytest.raises(ValueError, match="closed"):
        block.array(0)


def test_close_is_idempotent_and_tolerates_live_views() -> None:
    block = ShmBlock([ArraySpec.of((8,), np.float64)])
    view = block.array(0)
    view[:] = 7.0
    block.close()  # the view keeps the mapping alive, the name is gone already
    block.close()
    assert not (SHM_DIR / block.descriptor.name).exists()
    assert view.sum() == 56.0
    del view


def test_segment_names_skip_leftovers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_counter", itertools.count(10**9))
    leftover = SHM_DIR / f"{segment_prefix()}{10**9}"
    leftover.write_bytes(b"from a killed process with the same pid")
    try:
        with ShmBlock([ArraySpec.of((1,), np.float64)]) as block:
            assert block.descriptor.name == f"{segment_prefix()}{10**9 + 1}"
    finally:
        leftover.unlink()


def test_full_dev_shm_raises_allocation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ShmAllocationError):
        ShmBlock([ArraySpec.of((1024,), np.float64)])
    # and the autouse fixture checks that nothing was left behind


def test_attach_checks_the_size() -> None:
    with ShmBlock([ArraySpec.of((2,), np.float64)]) as block:
        d = block.descriptor
        bigger = BlockDescriptor(d.name, shm.GRANULE + 1, d.arrays)  # past the segment's end
        with pytest.raises(ValueError, match="expected"):
            AttachedBlock(bigger)


def _vector_block(cache: SegmentCache, length: int) -> ShmBlock:
    return ShmBlock([ArraySpec.of((length,), np.float64)], cache)


def test_cache_reuses_a_segment_for_a_block_of_a_similar_size() -> None:
    cache = SegmentCache(max_bytes=4 << 20)
    with _vector_block(cache, 1000) as first:
        first.array(0)[:] = 1.0
        name = first.descriptor.name
    assert cache.idle_names == [name]
    assert (SHM_DIR / name).exists()
    with _vector_block(cache, 900) as second:  # smaller, same granule: the same segment
        assert second.descriptor.name == name
        assert second.descriptor.size == 7232  # the worker maps what the job uses (aligned)
        with AttachedBlock(second.descriptor) as attached:
            attached.array(0)[:] = 2.0
        assert second.array(0).sum() == 1800.0
    assert (cache.created, cache.reused) == (1, 1)
    # A block over twice as small as a segment gets one of its own size, not the big one.
    with _vector_block(cache, 100_000) as big:
        big_name = big.descriptor.name
    with _vector_block(cache, 20_000) as mid:
        assert mid.descriptor.name not in (name, big_name)
    with _vector_block(cache, 10) as tiny:  # the smallest that fits: one granule
        assert tiny.descriptor.name == name
    assert (cache.created, cache.reused) == (3, 2)
    cache.close()
    assert cache.idle_names == []
    # and the autouse fixture checks that close() unlinked them all


def test_cache_never_reuses_a_segment_a_view_still_uses() -> None:
    cache = SegmentCache(max_bytes=1 << 20)
    block = _vector_block(cache, 8)
    view = block.array(0)
    view[:] = 7.0
    block.close()  # a view is alive: the segment must not serve another job
    assert cache.idle_names == []
    assert not (SHM_DIR / block.descriptor.name).exists()
    with _vector_block(cache, 8) as other:
        other.array(0)[:] = 1.0
    assert view.sum() == 56.0  # the stale view still reads its own job's data
    del view
    cache.close()


def test_cache_keeps_within_its_limits_and_evicts_the_oldest() -> None:
    cache = SegmentCache(max_bytes=3 * shm.GRANULE, max_segments=2)
    blocks = [_vector_block(cache, 16) for _ in range(3)]
    names = [b.descriptor.name for b in blocks]
    for block in blocks:
        block.close()
    assert cache.idle_names == names[1:]  # at most 2 kept, the least recently used went
    assert not (SHM_DIR / names[0]).exists()
    with _vector_block(cache, 4 * shm.GRANULE // 8) as too_big:  # over max_bytes on its own
        too_big_name = too_big.descriptor.name
    assert too_big_name not in cache.idle_names
    assert not (SHM_DIR / too_big_name).exists()
    cache.close()
    late = _vector_block(cache, 16)  # given back after close(): destroyed
    late.close()
    assert cache.idle_names == []
    assert not (SHM_DIR / late.descriptor.name).exists()


def test_a_block_closed_without_reuse_is_unlinked() -> None:
    cache = SegmentCache(max_bytes=1 << 20)
    block = _vector_block(cache, 16)
    block.close(reuse=False)  # e.g. its job failed: its worker may have been mid-write
    assert cache.idle_names == []
    assert not (SHM_DIR / block.descriptor.name).exists()


def test_cache_of_zero_bytes_keeps_nothing() -> None:
    cache = SegmentCache(max_bytes=0)
    with _vector_block(cache, 16) as block:
        name = block.descriptor.name
    assert cache.idle_names == []
    assert not (SHM_DIR / name).exists()


def _child_fills(descriptor: BlockDescriptor) -> None:
    with AttachedBlock(descriptor) as block:
        block.array(1)[:] = block.array(0).sum(axis=0)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_worker_process_attaches_and_writes(method: str) -> None:
    a = np.arange(6.0).reshape(2, 3)
    with ShmBlock([ArraySpec.of(a.shape, a.dtype), ArraySpec.of((3,), a.dtype)]) as block:
        np.copyto(block.array(0), a)
        process = multiprocessing.get_context(method).Process(
            target=_child_fills, args=(block.descriptor,)
        )
        process.start()
        process.join(60)
        assert process.exitcode == 0
        process.close()
        np.testing.assert_array_equal(block.array(1), [3.0, 5.0, 7.0])


def _run_script(directory: Path, body: str) -> subprocess.CompletedProcess[str]:
    # A file, not -c: spawned children must be able to import the script's functions.
    # -W default, not error: the tracker swallows warnings that would raise, so they would go
    # unseen; printed, they land on the stderr the tests check.
    script = directory / "script.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-W", "default", str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_resource_tracker_stays_silent(tmp_path: Path) -> None:
    # The tracker is a separate process: its complaints (a KeyError on a double unregister, a
    # "leaked shared_memory" warning) only show on stderr, so run the whole cycle in a script.
    # stderr is read to EOF, which comes when the tracker, the last holder, has exited.
    result = _run_script(
        tmp_path,
        """
        import multiprocessing, numpy as np
        from consumer.shm import ArraySpec, AttachedBlock, SegmentCache, ShmBlock

        def child(descriptor):
            with AttachedBlock(descriptor) as block:
                block.array(0)[:] = 1.0

        if __name__ == "__main__":
            cache = SegmentCache(max_bytes=1 << 20)
            for method in ("forkserver", "spawn"):
                for owner in (None, cache, cache):  # one-off, then cached twice (reused)
                    with ShmBlock([ArraySpec.of((16,), np.float64)], owner) as block:
                        p = multiprocessing.get_context(method).Process(
                            target=child, args=(block.descriptor,))
                        p.start(); p.join(); assert p.exitcode == 0
                        assert block.array(0).sum() == 16.0
            assert cache.reused == 3
            cache.close()
            print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr == ""


@pytest.mark.parametrize("state", ["in use", "idle in the cache"])
def test_tracker_unlinks_blocks_of_a_killed_parent(tmp_path: Path, state: str) -> None:
    # A parent SIGKILLed while it owns a block, or keeps a segment for reuse: the resource
    # tracker unlinks the segment.
    result = _run_script(
        tmp_path,
        f"""
        import os, signal, sys, numpy as np
        from consumer.shm import ArraySpec, SegmentCache, ShmBlock
        cache = SegmentCache(max_bytes=1 << 20)
        block = ShmBlock([ArraySpec.of((16,), np.float64)], cache)
        if {state == "idle in the cache"}:
            block.close()
            assert cache.idle_names == [block.descriptor.name]
        print(os.getpid(), block.descriptor.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert result.returncode == -signal.SIGKILL
    pid, name = result.stdout.split()
    assert name.startswith(segment_prefix(int(pid)))
    _wait_until(lambda: not (SHM_DIR / name).exists())
    assert "leaked shared_memory" in result.stderr


def test_a_failed_job_never_gives_its_segment_back() -> None:
    from consumer.jobs import Record, WorkerContext, prepare_job
    from schemas.limits import DecodeLimits

    context = WorkerContext(DecodeLimits(), instance_id="test", host="here")
    records = [Record(value=b"\0" * 128, headers=[], timestamp_ms=None, answer_bytes=4096)]
    cache = SegmentCache(max_bytes=1 << 20)
    with pytest.raises(RuntimeError), prepare_job(records, context, cache=cache) as job:
        failed = job.block.descriptor.name
        raise RuntimeError("the worker was killed")  # as pool.run raises on a crash or timeout
    assert cache.idle_names == []
    assert not (SHM_DIR / failed).exists()
    with prepare_job(records, context, cache=cache) as job:
        succeeded = job.block.descriptor.name
    assert cache.idle_names == [succeeded]
    cache.close()
