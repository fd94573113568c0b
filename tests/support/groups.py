"""Consumer-group state as the service logs it: assignments, revocations, pauses."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.support.procs import wait_for
from tests.support.service import ServiceProcess

# "assigned ['svd-requests-x-0', ...]" and "revoked [...]": consumer/rebalance.py, on the service's logger.
_REBALANCE = re.compile(r"consumer\.service: (assigned|revoked) \[([^\]]*)\]([^\n]*)")
_PAUSE = re.compile(r"consumer\.service: (?:in-flight budget full .*: (pausing)|.*: (resuming))")


def _partitions(listed: str) -> set[int]:
    return {int(p.strip().strip("'").rsplit("-", 1)[1]) for p in listed.split(",") if p.strip()}


def owned(service: ServiceProcess) -> set[int]:
    """Partitions of the latest assignment, minus later revocations."""
    held: set[int] = set()
    for kind, listed, _ in _REBALANCE.findall(service.log()):
        held = held | _partitions(listed) if kind == "assigned" else held - _partitions(listed)
    return held


def rebalances(service: ServiceProcess) -> int:
    """How many assigned/revoked lines the service has logged so far."""
    return len(_REBALANCE.findall(service.log()))


def wait_settled(members: list[ServiceProcess], partitions: int, timeout: float = 60.0) -> None:
    """Wait until every member holds partitions, none twice, all of them between them."""

    def settled() -> bool:
        held = [owned(m) for m in members]
        union = set().union(*held)
        return all(held) and sum(map(len, held)) == len(union) == partitions

    wait_for(settled, timeout, f"{len(members)} members to share {partitions} partitions")


_PAUSED_NOTE = re.compile(r"; (\d+) of them paused \(([^)]*)\)")


@dataclass(frozen=True)
class Assignment:
    partitions: set[int]
    paused_before: bool  # the member's pause state when the assignment came, per its log
    paused: int  # how many of the assigned partitions aiokafka held paused right after
    reason: str  # "budget full", "budget open" or "stopping", as the service logged it


def assignments(service: ServiceProcess) -> list[Assignment]:
    """Each assignment, with the pause state the member was in (per its pausing/resuming lines)."""
    out: list[Assignment] = []
    paused = False
    log = service.log()
    events = sorted(
        [(m.start(), "rebalance", m) for m in _REBALANCE.finditer(log)]
        + [(m.start(), "pause", m) for m in _PAUSE.finditer(log)],
        key=lambda e: e[0],
    )
    for _, kind, match in events:
        if kind == "pause":
            paused = match.group(1) is not None
        elif match.group(1) == "assigned":
            note = _PAUSED_NOTE.search(match.group(3))
            assert note is not None, f"no pause state in {match.group(0)!r}"
            out.append(
                Assignment(_partitions(match.group(2)), paused, int(note.group(1)), note.group(2))
            )
    return out
