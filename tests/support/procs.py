"""Look at a running service from the outside, through /proc: its process tree, pool workers, memory.

The service runs the pool with the forkserver start method, so its tree is::

    python -m consumer run            (the service: asyncio loop, aiokafka, the budget)
    ├── resource_tracker              (unlinks leaked shared memory if the service dies)
    └── forkserver                    (preloaded numpy/scipy)
        ├── worker                    (one per pool slot; forked, so same cmdline as the server)
        └── worker

Linux only, like the service's shared memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20

_FORKSERVER = b"multiprocessing.forkserver"
_RESOURCE_TRACKER = b"multiprocessing.resource_tracker"


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (any of its threads may have forked them)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(children(child))
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def forkserver_of(service_pid: int) -> int | None:
    return next((c for c in children(service_pid) if _FORKSERVER in cmdline(c)), None)


def pool_workers(service_pid: int) -> list[int]:
    """Live pool workers: the fork server's children (the service forks nothing else there)."""
    server = forkserver_of(service_pid)
    return [] if server is None else [p for p in children(server) if alive(p)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(condition: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(interval)


def wait_for_pool(service_pid: int, size: int, timeout: float = 60.0) -> list[int]:
    """Wait until exactly ``size`` workers are alive; return their pids."""
    workers: list[int] = []

    def full() -> bool:
        nonlocal workers
        workers = pool_workers(service_pid)
        return len(workers) == size

    wait_for(full, timeout, f"{size} pool workers under {service_pid} (last saw {workers})")
    return workers


def wait_busy(pid: int, cpu: float, timeout: float = 60.0) -> None:
    """Wait until worker ``pid`` has burnt ``cpu`` more seconds: it is inside a computation."""
    start = cpu_seconds(pid)
    wait_for(lambda: cpu_seconds(pid) - start >= cpu, timeout, f"worker {pid} busy for {cpu}s")


def busy_worker(service_pid: int, cpu: float = 0.3, timeout: float = 60.0) -> int:
    """The pool worker that burns ``cpu`` seconds first from now: the one computing a task."""
    start = {pid: cpu_seconds(pid) for pid in pool_workers(service_pid)}
    found: list[int] = []

    def one_busy() -> bool:
        for pid in pool_workers(service_pid):
            if cpu_seconds(pid) - start.setdefault(pid, cpu_seconds(pid)) >= cpu:
                found.append(pid)
                return True
        return False

    wait_for(one_busy, timeout, f"a pool worker of {service_pid} busy for {cpu}s")
    return found[0]


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def shm_segments(service_pid: int) -> list[str]:
    """The service's shared-memory blocks still in /dev/shm (see consumer.shm.segment_prefix)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"svd-{service_pid}-*"))


# --- memory -------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS): counts every page mapped, shared ones in each process again."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: a page shared by N processes counts 1/N in each, so the sum over a
    process tree is its real footprint (shared memory blocks and forked library pages once)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class TreeMemory:
    processes: int
    rss: int  # sum of VmRSS: the conservative figure (shared pages counted per process)
    pss: int  # sum of Pss: the real footprint

    def describe(self) -> str:
        return f"{self.processes} processes, RSS {self.rss / MIB:.0f} MiB, PSS {self.pss / MIB:.0f} MiB"


def tree_memory(pid: int) -> TreeMemory:
    tree = [pid, *descendants(pid)]
    return TreeMemory(len(tree), sum(map(rss_bytes, tree)), sum(map(pss_bytes, tree)))


@dataclass
class MemorySampler:
    """Samples ``tree_memory(pid)`` every ``interval`` seconds in a thread; keeps the peaks."""

    pid: int
    interval: float = 0.1
    samples: int = 0
    peak_rss: TreeMemory | None = None
    peak_pss: TreeMemory | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sample = tree_memory(self.pid)
            if sample.rss == 0:  # the service is gone
                continue
            self.samples += 1
            if self.peak_rss is None or sample.rss > self.peak_rss.rss:
                self.peak_rss = sample
            if self.peak_pss is None or sample.pss > self.peak_pss.pss:
                self.peak_pss = sample
