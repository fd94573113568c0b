"""Fixtures for the unit tests."""

from tests.support.segments import no_leaked_segments

__all__ = ["no_leaked_segments"]
