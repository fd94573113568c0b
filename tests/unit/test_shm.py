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
from collections.abc import Iterator
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
    ShmAllocationError,
    ShmBlock,
    plan_layout,
    segment_prefix,
)

REPO = Path(__file__).resolve().parents[2]


def _segments(pid: int | None = None) -> list[str]:
    prefix = segment_prefix(pid)
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = _segments()
    yield
    assert _segments() == before


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
        bigger = BlockDescriptor(d.name, d.size + 4096, d.arrays)
        with pytest.raises(ValueError, match="expected"):
            AttachedBlock(bigger)


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
        from consumer.shm import ArraySpec, AttachedBlock, ShmBlock

        def child(descriptor):
            with AttachedBlock(descriptor) as block:
                block.array(0)[:] = 1.0

        if __name__ == "__main__":
            for method in ("forkserver", "spawn"):
                with ShmBlock([ArraySpec.of((16,), np.float64)]) as block:
                    p = multiprocessing.get_context(method).Process(
                        target=child, args=(block.descriptor,))
                    p.start(); p.join(); assert p.exitcode == 0
                    assert block.array(0).sum() == 16.0
            print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr == ""


def test_tracker_unlinks_blocks_of_a_killed_parent(tmp_path: Path) -> None:
    # A parent SIGKILLed while it owns a block: the resource tracker unlinks the segment.
    result = _run_script(
        tmp_path,
        """
        import os, signal, sys, numpy as np
        from consumer.shm import ArraySpec, ShmBlock
        block = ShmBlock([ArraySpec.of((16,), np.float64)])
        print(os.getpid(), block.descriptor.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert result.returncode == -signal.SIGKILL
    pid, name = result.stdout.split()
    assert name.startswith(segment_prefix(int(pid)))
    _wait_until(lambda: not (SHM_DIR / name).exists())
    assert "leaked shared_memory" in result.stderr
