"""The fault suite's report: each test states what it injected and what it counted.

Each line is printed when recorded (visible with ``-s``) and repeated in a "fault-injection
counts" section at the end of the run, so CI logs show them without ``-s``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_LINES: list[str] = []


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str, str], str]:
    """``fault_report(injected, counts)`` records and prints one line; returns it, for assertion
    messages."""

    def record(injected: str, counts: str) -> str:
        line = f"{request.node.name}: injected {injected} | {counts}"
        _LINES.append(line)
        print(f"\n[faults] {line}")
        return line

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("fault-injection counts")
        for line in _LINES:
            terminalreporter.write_line(line)
