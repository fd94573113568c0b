"""consumer.allocator: large buffers from the heap, and trims that give freed ones back.

Run in a child process: the allocator settings are process-wide, and pytest's own memory should
not depend on them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str) -> list[int]:
    """Run ``script`` in a fresh interpreter; the integers it prints."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [int(word) for word in result.stdout.split()]


def test_large_buffers_come_from_the_heap_and_trims_give_them_back() -> None:
    before, after = _run(
        """
        from consumer import allocator

        assert allocator.tune()
        buffers = [bytearray(2 << 20) for _ in range(64)]  # 128 MiB on the heap, touched
        del buffers[:-1]  # the top one stays: the freed ones are below it, out of a top trim's reach
        before = allocator.resident_bytes()
        assert allocator.release_free_memory()
        print(before >> 20, allocator.resident_bytes() >> 20)
        """
    )
    # Freed but kept by the heap until the trim: over 100 MiB; given back by it.
    assert before - after > 100, (before, after)


def test_the_trimmer_trims_growth_no_request_holds_and_only_that() -> None:
    trims, released_mib = _run(
        """
        from consumer import allocator

        allocator.tune()
        trimmer = allocator.HeapTrimmer(keep_bytes=32 << 20)
        small = [bytearray(2 << 20) for _ in range(8)]  # 16 MiB: within the allowance
        del small[:-1]
        assert not trimmer.check()
        big = [bytearray(2 << 20) for _ in range(64)]  # 128 MiB more, freed below a live top
        del big[:-1]
        # Still held by requests in flight (as the service counts them): not trimmed.
        assert not trimmer.check(live_bytes=256 << 20)
        before = allocator.resident_bytes()
        assert trimmer.check()  # held by nothing: trimmed
        after = allocator.resident_bytes()
        assert not trimmer.check()  # and the allowance counts from there
        print(trimmer.trims, (before - after) >> 20)
        """
    )
    assert trims == 1
    assert released_mib > 100
