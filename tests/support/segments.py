"""Shared-memory segments a test may leave behind, and the fixture that says none did."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from consumer.shm import SHM_DIR, segment_prefix


def segments(pid: int | None = None) -> list[str]:
    """The names of the segments process ``pid`` (default: this one) has in /dev/shm."""
    prefix = segment_prefix(pid)
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


@pytest.fixture
def no_leaked_segments() -> Iterator[None]:
    """Fails the test if it left a segment of this process behind."""
    before = segments()
    yield
    assert segments() == before
