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

SCRIPT = textwrap.dedent(
    """
    import os
    from consumer import allocator

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    assert allocator.tune()
    buffers = [bytearray(2 << 20) for _ in range(64)]  # 128 MiB on the heap, touched
    del buffers[:-1]  # the top one stays: the freed ones sit below it, out of a top trim's reach
    before = rss_mib()
    assert allocator.release_free_memory()
    after = rss_mib()
    print(round(before), round(after))
    """
)


def test_large_buffers_come_from_the_heap_and_trims_give_them_back() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    # Freed but kept by the heap until the trim: over 100 MiB; given back by it.
    assert before - after > 100, (before, after)


TRIMMER_SCRIPT = textwrap.dedent(
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


def test_the_trimmer_trims_growth_no_request_holds_and_only_that() -> None:
    result = subprocess.run(
        [sys.executable, "-c", TRIMMER_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    trims, released_mib = map(int, result.stdout.split())
    assert trims == 1
    assert released_mib > 100
