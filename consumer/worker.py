"""A pool worker process: its main loop, and one job run in it.

The pool (consumer/pool.py) starts these processes; the job protocol is in consumer/jobs.py and
what a worker does with each record in consumer/processing.py. A worker never writes to the
regions of a record; it writes each answer into the room the parent reserved for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from threadpoolctl import threadpool_limits

from consumer import processing
from consumer.jobs import (
    KIND_INTERNAL,
    KIND_RESOURCES,
    ItemOutcome,
    Job,
    JobFailure,
    JobOutcome,
    Ready,
    release_view,
    unpack_headers,
)
from consumer.shm import AttachedBlock

_blas_limits: Any = None  # the worker's threadpool limiter, held for the process's life
_blas_threads = 0


class InjectedFault(RuntimeError):
    """Raised by the "raise" test fault."""


def serve(conn: Connection, blas_threads: int) -> None:
    """Main loop of a pool worker process (the ``Process`` target)."""
    _die_with_parent()
    _release_fork_server()
    init_worker(blas_threads)
    with contextlib.suppress(EOFError, BrokenPipeError), conn:
        conn.send(Ready(os.getpid(), _blas_threads))
        for job in _jobs(conn):
            conn.send(execute(job))
    # EOF or a broken pipe: the parent is gone or closed our pipe, so there is no one to serve.


def init_worker(blas_threads: int) -> None:
    """Once per worker: cap BLAS threads for the worker's whole life, leave Ctrl-C to the parent.

    The parent sizes workers x BLAS threads to the CPUs it may use; without the cap every
    worker's BLAS would start one thread per CPU and they would fight over them.
    """
    global _blas_limits, _blas_threads
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _blas_limits = threadpool_limits(limits=blas_threads)
    _blas_threads = blas_threads


def execute(job: Job) -> JobOutcome | JobFailure:
    """``run_job``, with an exception turned into the ``JobFailure`` reply."""
    try:
        return run_job(job)
    except Exception as exc:
        return _failure(exc)


def run_job(job: Job) -> JobOutcome:
    """Attach the block, answer every item into its room, detach."""
    started = time.perf_counter()
    with AttachedBlock(job.block) as block:
        items = _run_items(block, job)
    return JobOutcome(
        items=items,
        pid=os.getpid(),
        worker_ms=(time.perf_counter() - started) * 1000.0,
        blas_threads=_blas_threads,
    )


def _run_items(block: AttachedBlock, job: Job) -> tuple[ItemOutcome, ...]:
    views: list[memoryview] = []
    try:
        items = []
        for item in job.items:
            value, packed, out = (block.view(r) for r in (item.value, item.headers, item.answer))
            views += (value, packed, out)
            items.append(
                processing.Item(
                    value,
                    unpack_headers(packed),
                    out,
                    timestamp_ms=None if item.timestamp_ms < 0 else item.timestamp_ms,
                    before_compute=_fault(item.fault, job.attempt),
                    origin=item.origin,
                )
            )
        outcomes = processing.answer_all(
            items, context=job.context, dispatched_at=job.dispatched_at
        )
        del items  # their arrays view the block
        return tuple(outcomes)
    finally:  # views of the mapping would keep it from being unmapped
        for view in views:
            release_view(view)


def _fault(fault: str | None, attempt: int) -> Callable[[], None] | None:
    return None if fault is None else lambda: _inject(fault, attempt)


def _failure(exc: Exception) -> JobFailure:
    resources = isinstance(exc, MemoryError)
    return JobFailure(
        kind=KIND_RESOURCES if resources else KIND_INTERNAL,
        error_type=type(exc).__name__,
        message=str(exc),
        retryable=resources,
        traceback="".join(traceback.format_exception(exc)),
    )


def _jobs(conn: Connection) -> Iterator[Job]:
    while (job := conn.recv()) is not None:
        yield job


def _inject(fault: str | None, attempt: int) -> None:
    """Test-only faults; see ``FAULTS``."""
    if fault is None:
        return
    if fault.endswith("_once"):
        if attempt != 1:
            return
        fault = fault.removesuffix("_once")
    if fault == "segfault":
        ctypes.string_at(0)  # a real SIGSEGV, not a Python exception
    elif fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "hang":
        while True:
            time.sleep(3600)
    elif fault == "raise":
        raise InjectedFault("injected fault: raise")
    else:
        raise ValueError(f"unknown fault {fault!r}")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so a hung worker never outlives it.

    With forkserver the parent is the fork server, which exits with the main process. Without
    this, a parent killed by SIGKILL would leave a worker stuck in a long SVD (or a "hang"
    fault) running as an orphan. Best effort: a no-op where prctl is unavailable.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _release_fork_server() -> None:
    """Close this worker's copy of the fork server's "alive" pipe, so the server can exit.

    The fork server exits when every write end of that pipe is closed, and it hands one to each
    process it forks (for children that start processes of their own; workers never do). A
    worker busy in a long SVD, or hung, when the main process was SIGKILLed would otherwise keep
    the server alive, and the server, through PR_SET_PDEATHSIG, the worker: the whole tree and
    its shared memory outlived the service (found by tests/faults/test_consumer_kill.py).
    A no-op under spawn, which has no fork server.
    """
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver  # CPython sets the fd on it in the forked child
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        server._forkserver_alive_fd = None
        with contextlib.suppress(OSError):
            os.close(fd)
