"""A suite's counts report: each test records one line of what it did and what it counted.

Each line is printed when recorded (visible with ``-s``) and repeated in a section of its own at
the end of the run, so CI logs show them without ``-s``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


class CountsReport:
    def __init__(self, tag: str, title: str, *, verb: str = "") -> None:
        self._tag = tag  # printed before each line: [faults], [cluster]
        self._title = title  # the end-of-run section's title
        self._verb = verb  # between the test's name and what it did, e.g. "injected "
        self._lines: list[str] = []

    def recorder(self, request: pytest.FixtureRequest) -> Callable[[str, str], str]:
        """``record(what, counts)`` records and prints one line; returns it, for assertions."""

        def record(what: str, counts: str) -> str:
            line = f"{request.node.name}: {self._verb}{what} | {counts}"
            self._lines.append(line)
            print(f"\n[{self._tag}] {line}")
            return line

        return record

    def summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self._lines:
            terminalreporter.section(self._title)
            for line in self._lines:
                terminalreporter.write_line(line)
