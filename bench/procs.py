"""Child processes the benchmark starts, and the memory of a process tree sampled from /proc.

Every child is started with ``PR_SET_PDEATHSIG`` so that a benchmark killed outright (SIGKILL,
no ``finally``) still takes its consumer, Redis and Celery down with it; the normal path stops
them in order through ``Children``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the benchmark process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr in ``log_path``; it dies with us."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """``sig``, wait up to ``timeout``, then SIGKILL. Idempotent."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


class Children:
    """The processes started so far, stopped in reverse order by ``stop_all`` (idempotent)."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []

    def add(self, stopper: Callable[[], None]) -> None:
        self._stops.append(stopper)

    def stop_all(self) -> None:
        while self._stops:
            stopper = self._stops.pop()
            try:
                stopper()
            except Exception as exc:  # keep stopping the others
                print(f"bench: error while stopping a child: {exc!r}", file=sys.stderr)


# --- memory of a process tree ------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (forkserver, pool workers, resource tracker)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name is parenthesised and may contain spaces: split after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _kib(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class TreeMemory:
    """Peaks of the summed RSS and PSS of a process tree, sampled in a thread.

    RSS counts a shared-memory page once in every process that maps it; PSS splits it between
    them, so the summed PSS is what the tree really occupies. Both are reported.
    """

    pid: int
    interval_s: float = 0.2
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_processes: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> None:
        pids = descendants(self.pid)
        rss = sum(_kib(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids)
        pss = sum(_kib(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss * 1024)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss * 1024)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


# --- CPU time of the processes sharing the machine ---------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


@dataclass
class CpuSplit:
    """Where the machine's CPU went between ``start()`` and ``stop()``: the consumer's own
    process, its workers (every other descendant), the broker, this benchmark process, and the
    object store when the run uses the one the benchmark started (``store_pid``)."""

    consumer_pid: int
    broker_pid: int | None
    cpus: int
    store_pid: int | None = None

    def _now(self) -> dict[str, float]:
        tree = descendants(self.consumer_pid)
        now = {
            "consumer": cpu_seconds(self.consumer_pid),
            "workers": sum(cpu_seconds(p) for p in tree if p != self.consumer_pid),
            "broker": cpu_seconds(self.broker_pid) if self.broker_pid else 0.0,
            "bench": sum(os.times()[:2]),
        }
        if self.store_pid:
            now["store"] = cpu_seconds(self.store_pid)
        return now

    def start(self) -> None:
        self._started = time.monotonic()
        self._first = self._now()

    def stop(self) -> dict[str, float]:
        """Each part's share of cpus x the wall time, and the wall time."""
        last = self._now()
        wall = max(1e-3, time.monotonic() - self._started)
        shares = {k: (last[k] - self._first[k]) / (wall * self.cpus) for k in last}
        return {**shares, "seconds": wall}


def wait_for(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s: {what}")
        time.sleep(step)
