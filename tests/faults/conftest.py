"""The fault suite's report (each test states what it injected and what it counted, in a
"fault-injection counts" section at the end of the run), and a broker of a test's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localkafka import BrokerError, LocalBroker
from tests.conftest import missing
from tests.support.report import CountsReport

_REPORT = CountsReport("faults", "fault-injection counts", verb="injected ")


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str, str], str]:
    """``fault_report(injected, counts)``: one line of the report; returns it."""
    return _REPORT.recorder(request)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _REPORT.summary(terminalreporter)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of this test's own, to stop and restart (the session broker is shared). Its
    free ports are kept across stop() and start() (ports.json in its workdir)."""
    broker = LocalBroker(workdir=tmp_path / "kafka")
    try:
        broker.start(die_with_parent=True)
    except BrokerError as exc:
        missing(f"a second local broker could not start: {exc}")
    try:
        yield broker
    finally:
        broker.destroy()
