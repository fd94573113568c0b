"""WorkerPool: a fixed number of long-lived worker processes behind an asyncio API.

Why not ``concurrent.futures.ProcessPoolExecutor``: one dead worker marks the whole executor
broken, failing every queued and running task, and a single hung task cannot be killed. Here
each worker has its own duplex pipe, and a crash, a timeout or a cancellation costs only the
task on that worker: the worker is killed if needed, reaped, and replaced at once.

Waiting for a reply without blocking the event loop: the loop watches the pipe's fd
(``add_reader``) and the process sentinel at the same time. No thread per task, so a hung worker
pins no thread; a dead worker is noticed the moment it dies, not at a poll interval; and
cancelling a wait is just removing a reader. The sentinel is watched for the worker's whole
life, so a worker that dies while idle is replaced too.

Start method: forkserver (default) or spawn, never fork: the parent runs an event loop and
threads, and forking those is unsafe. With forkserver the server preloads numpy, scipy and the
worker code once, so a replacement worker is a plain fork of a warm process.

Workers are started on the loop's thread, on purpose: a worker asks the kernel to kill it when
the thread that forked it ends (``PR_SET_PDEATHSIG``), and with spawn that thread is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Self

from consumer import worker
from consumer.jobs import Job, JobFailure, JobOutcome, Ready
from consumer.retry import Backoff
from consumer.tasks import TaskSet

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for a new worker to import numpy/scipy and say Ready
RESTART_BACKOFF = Backoff(first_s=0.5, max_s=30.0)  # between failed (re)starts of a worker slot
EXIT_GRACE = 2.0  # after SIGTERM (or a seen EOF), how long to wait for the exit status
REAP_TIMEOUT = 10.0  # after SIGKILL; only a process stuck in the kernel takes longer


class PoolError(Exception):
    """Base of the pool's errors."""


class PoolClosed(PoolError):
    """The pool is closing or closed; no new task is accepted."""


class PoolUnavailable(PoolError):
    """No worker is alive and starting one failed (retried in the background)."""


class WorkerStartError(PoolError):
    """A worker process could not be started or did not report Ready in time."""


class TaskError(PoolError):
    """A task did not produce a result. Only this task is affected; the pool carries on.

    ``retryable`` is a hint for the caller's policy: would the same job, sent again, likely
    succeed?
    """

    retryable = False

    def __init__(self, message: str, *, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class TaskTimeout(TaskError):
    """The task ran past its timeout; its worker was killed and replaced.

    Not retryable by default: the same input will most likely take as long again.
    """

    def __init__(self, timeout: float, *, pid: int) -> None:
        super().__init__(f"task exceeded {timeout:g}s on worker {pid}", pid=pid)
        self.timeout = timeout


class WorkerCrashed(TaskError):
    """The worker died during the task (``exitcode`` < 0: killed by signal ``-exitcode``).

    Retryable: the usual causes (OOM killer, a node under pressure) are transient.
    """

    retryable = True

    def __init__(self, exitcode: int | None, *, pid: int) -> None:
        self.exitcode = exitcode
        self.signal = _signal_of(exitcode)
        cause = f"signal {self.signal.name}" if self.signal else f"exit code {exitcode}"
        super().__init__(f"worker {pid} died during the task ({cause})", pid=pid)


class TaskFailed(TaskError):
    """The compute raised in the worker; the worker is fine and keeps serving.

    ``kind`` is one of ``consumer.jobs.KIND_*``; ``error_type`` the exception's class name.
    The worker's traceback is the ``__cause__`` (a ``RemoteTraceback``).
    """

    def __init__(self, failure: JobFailure, *, pid: int) -> None:
        super().__init__(f"{failure.error_type}: {failure.message}", pid=pid)
        self.kind = failure.kind
        self.error_type = failure.error_type
        self.message = failure.message
        self.retryable = failure.retryable


class RemoteTraceback(Exception):
    """A traceback formatted in the worker, chained under ``TaskFailed`` for the logs."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


class _WorkerExited(Exception):
    """The worker's pipe reached EOF or its process ended before a reply."""


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(
        self, process: BaseProcess, conn: Connection, exited: asyncio.Future[None]
    ) -> None:
        self.process = process
        self.conn = conn
        self.pid: int = process.pid or 0
        self.exited = exited  # resolved by the sentinel watcher when the process ends
        self.reaper: asyncio.Task[None] | None = None  # set once the worker is retired

    def __repr__(self) -> str:
        return f"<worker {self.pid}>"


class WorkerPool:
    """``size`` long-lived worker processes, each capped at ``blas_threads`` BLAS threads.

    ``run`` waits for an idle worker, so callers beyond ``size`` simply wait (no queue grows
    beyond the callers themselves). Hooks run in the parent, for metrics: ``on_worker_started``
    right after a process starts (before it reports Ready), ``on_worker_exited`` once it has
    been reaped, so every started pid gets exactly one exited call.
    """

    def __init__(
        self,
        size: int,
        blas_threads: int,
        *,
        mp_context: str = "forkserver",
        start_timeout: float = START_TIMEOUT,
        close_timeout: float = 10.0,
        on_worker_started: Callable[[int], None] | None = None,
        on_worker_exited: Callable[[int, int | None], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if blas_threads < 1:
            raise ValueError(f"blas_threads must be >= 1, got {blas_threads}")
        self._size = size
        self._blas_threads = blas_threads
        self._ctx = _context(mp_context)
        self._start_timeout = start_timeout
        self._close_timeout = close_timeout
        self._on_started = on_worker_started
        self._on_exited = on_worker_exited
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: set[_Worker] = set()  # Ready and not retired: idle or busy
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._replacements = TaskSet()
        self._reapers = TaskSet()
        self._start_error: BaseException | None = None
        self._closing = False
        self._closed: asyncio.Future[None] | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def workers_alive(self) -> int:
        """Workers that are up and Ready (idle or busy); less than ``size`` while replacing."""
        return len(self._workers)

    @property
    def idle_workers(self) -> int:
        return len(self._idle)

    @property
    def last_start_error(self) -> BaseException | None:
        """Why the latest (re)start failed; None once a worker started since."""
        return self._start_error

    async def start(self) -> None:
        """Start all workers and wait until each is Ready.

        If one fails, the others are stopped too and ``WorkerStartError`` is raised.
        """
        if self._closing:
            raise PoolClosed("the pool is closed")
        if self._loop is not None:
            raise RuntimeError("pool already started")
        self._loop = asyncio.get_running_loop()
        if self._ctx.get_start_method() == "forkserver":
            # Only effective before the fork server starts; harmless afterwards.
            self._ctx.set_forkserver_preload(["consumer.worker"])
        starts = [self._start_worker() for _ in range(self._size)]
        try:
            results = await asyncio.gather(*starts, return_exceptions=True)
        except BaseException:
            await self.close(timeout=0)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close(timeout=0)
            raise errors[0]

    async def run(self, job: Job, timeout: float | None = None) -> JobOutcome:  # noqa: ASYNC109
        """Run ``job`` on the next idle worker and return its outcome.

        ``timeout`` (seconds, None: no limit) counts from dispatch, not from the wait for a
        worker. Raises ``TaskTimeout``, ``WorkerCrashed`` or ``TaskFailed`` for this task
        only; ``PoolClosed``/``PoolUnavailable`` when no worker can take it. Cancelling
        ``run`` kills and replaces the worker, whose eventual result would be stale.

        The timeout is a parameter rather than left to ``asyncio.timeout`` around the call
        (which also works: it cancels, so the worker is killed) to give the caller a typed
        ``TaskTimeout`` that says which worker, distinct from its own deadlines.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        member = await self._acquire()
        try:
            reply = await self._exchange(member, job, timeout)
        except BaseException:
            self._discard(member)
            raise
        self._release(member)
        if isinstance(reply, JobFailure):
            raise TaskFailed(reply, pid=member.pid) from RemoteTraceback(reply.traceback)
        return reply

    async def close(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop accepting tasks, let running tasks finish and workers exit, within ``timeout``.

        Then SIGTERM, then SIGKILL the stragglers; returns once every worker is reaped.
        Idempotent; concurrent calls wait for the first one.
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        loop = self._loop or asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._closing = True
        try:
            await self._shutdown(timeout)
        finally:
            self._closed.set_result(None)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(self._close_timeout)

    # --- getting and returning workers -----------------------------------------------------

    async def _acquire(self) -> _Worker:
        while True:
            self._check_usable()
            if self._idle:
                return self._idle.popleft()
            waiter = self._running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were handed a wake-up we can no longer use
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _check_usable(self) -> None:
        if self._closing:
            raise PoolClosed("the pool is closed")
        if self._loop is None:
            raise PoolError("the pool is not started")
        if not self._workers and self._start_error is not None:
            raise PoolUnavailable("no worker is alive and starting one failed") from (
                self._start_error
            )

    def _release(self, member: _Worker) -> None:
        """A worker that is Ready for a task."""
        if member.exited.done():  # died after its reply: the sentinel saw it busy
            self._discard(member)
            return
        self._workers.add(member)
        self._idle.append(member)
        if self._closing:
            _request_exit(member)
        else:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- talking to a worker ---------------------------------------------------------------

    async def _exchange(
        self, member: _Worker, job: Job, limit: float | None
    ) -> JobOutcome | JobFailure:
        try:
            member.conn.send(job)
            reply = await self._receive(member, limit)
        except TimeoutError as exc:  # first: TimeoutError is an OSError
            raise TaskTimeout(limit or 0.0, pid=member.pid) from exc
        except (_WorkerExited, OSError) as exc:  # EOF, or a broken pipe on send
            raise await self._death_error(member) from exc
        if not isinstance(reply, JobOutcome | JobFailure):
            raise PoolError(f"worker {member.pid} sent an unexpected {type(reply).__name__}")
        return reply

    async def _receive(self, member: _Worker, limit: float | None) -> object:
        """The worker's next message; ``_WorkerExited`` if it died, ``TimeoutError``."""
        loop = self._running_loop()
        fd = member.conn.fileno()
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, readable)
        try:
            done, _ = await asyncio.wait(
                (readable, member.exited), timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            loop.remove_reader(fd)
            readable.cancel()
        if not done:
            raise TimeoutError
        # A reply sent just before the process ended still counts, hence poll() first.
        try:
            if member.conn.poll():
                return member.conn.recv()
        except (EOFError, OSError) as exc:
            raise _WorkerExited from exc
        raise _WorkerExited

    async def _death_error(self, member: _Worker) -> PoolError:
        if self._closing:  # close() stopped it (and may have reaped it already)
            return PoolClosed(f"worker {member.pid} was stopped by close()")
        # EOF on the pipe can come a moment before the exit status; wait for it, briefly.
        await asyncio.wait((member.exited,), timeout=EXIT_GRACE)
        return WorkerCrashed(member.process.exitcode, pid=member.pid)

    # --- starting, replacing, reaping ------------------------------------------------------

    async def _start_worker(self) -> None:
        """Start a worker process and, once it is Ready, put it in the pool."""
        loop = self._running_loop()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker.serve,
            args=(child_conn, self._blas_threads),
            name="svd-worker",
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:
            parent_conn.close()
            raise WorkerStartError(f"cannot start a worker process: {exc}") from exc
        finally:
            child_conn.close()  # the child has its copy; ours would hide the child's EOF
        member = _Worker(process, parent_conn, loop.create_future())
        loop.add_reader(process.sentinel, self._on_sentinel, member)
        _call_hook(self._on_started, member.pid)
        try:
            hello = await self._receive(member, self._start_timeout)
            if not isinstance(hello, Ready):
                raise WorkerStartError(f"worker {member.pid} sent {type(hello).__name__}")
        except (_WorkerExited, TimeoutError) as exc:
            self._retire(member)
            await asyncio.wait((member.exited,), timeout=EXIT_GRACE)
            raise WorkerStartError(
                f"worker {member.pid} did not become ready (exit code {member.process.exitcode})"
            ) from exc
        except BaseException:
            self._retire(member)
            raise
        log.debug("worker %d ready with %d BLAS threads", hello.pid, hello.blas_threads)
        self._release(member)

    def _on_sentinel(self, member: _Worker) -> None:
        """The process ended. Whoever is using the worker reacts; an idle one is replaced."""
        self._running_loop().remove_reader(member.process.sentinel)
        if not member.exited.done():
            member.exited.set_result(None)
        if member in self._idle:
            self._idle.remove(member)
            self._discard(member)

    def _discard(self, member: _Worker) -> None:
        """Take a worker out of the pool for good, and start its replacement."""
        if member.reaper is not None:
            return
        self._workers.discard(member)
        self._retire(member)
        if not self._closing:
            self._replacements.spawn(self._replace(), name=f"replace worker {member.pid}")

    def _retire(self, member: _Worker) -> None:
        """Kill (unless it already ended) and reap, in the background. Idempotent."""
        if member.reaper is not None:
            return
        if member.process.exitcode is None:
            member.process.kill()
        member.reaper = self._reapers.spawn(self._reap(member), name=f"reap worker {member.pid}")

    async def _reap(self, member: _Worker) -> None:
        await asyncio.wait((member.exited,), timeout=REAP_TIMEOUT)
        process = member.process
        if process.exitcode is None:
            # With spawn the sentinel can fire a moment before the process is waitable.
            await asyncio.to_thread(process.join, REAP_TIMEOUT)
        exitcode = process.exitcode
        self._running_loop().remove_reader(process.sentinel)
        member.conn.close()
        if exitcode is None:
            log.error("worker %d did not exit after SIGKILL", member.pid)
        else:
            process.close()
        _call_hook(self._on_exited, member.pid, exitcode)

    async def _replace(self) -> None:
        """Start one worker; on failure record why and retry with backoff, never hot."""
        delays = RESTART_BACKOFF.delays()
        while True:
            try:
                await self._start_worker()
            except Exception as exc:
                self._start_error = exc
                delay = next(delays)
                log.error("starting a replacement worker failed; retrying in %.1fs", delay)
                self._wake_all()  # with no live worker, waiters now raise PoolUnavailable
                await asyncio.sleep(delay)
                continue
            self._start_error = None
            return

    # --- closing ---------------------------------------------------------------------------

    async def _shutdown(self, grace: float) -> None:
        self._wake_all()  # waiters raise PoolClosed
        await self._replacements.cancel_all()
        for member in list(self._idle):
            _request_exit(member)
        # Busy workers get their exit request when their task ends (see _release).
        members = list(self._workers)
        running = await _wait_exited(members, grace)
        for member in running:
            member.process.terminate()
        await _wait_exited(running, EXIT_GRACE)
        for member in members:
            self._workers.discard(member)
            self._retire(member)  # reaps; SIGKILL first for whatever ignored SIGTERM
        await self._reapers.wait()
        self._idle.clear()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise PoolError("the pool is not started")
        return self._loop


def _context(name: str) -> ForkServerContext | SpawnContext:
    if name == "forkserver":
        return multiprocessing.get_context("forkserver")
    if name == "spawn":
        return multiprocessing.get_context("spawn")
    raise ValueError(f"mp_context must be 'forkserver' or 'spawn' (never 'fork'), got {name!r}")


def _request_exit(member: _Worker) -> None:
    with contextlib.suppress(OSError):
        member.conn.send(None)


async def _wait_exited(members: Iterable[_Worker], limit: float) -> list[_Worker]:
    """Wait up to ``limit`` seconds for the workers to end; return those still running."""
    pending = [m.exited for m in members if not m.exited.done()]
    if pending and limit > 0:
        await asyncio.wait(pending, timeout=limit)
    return [m for m in members if not m.exited.done()]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _signal_of(exitcode: int | None) -> signal.Signals | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode)
    except ValueError:
        return None


def _call_hook(hook: Callable[..., None] | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        # Metrics must never take the pool down.
        log.exception("pool lifecycle hook %r failed", hook)
