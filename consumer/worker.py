"""The job protocol between the parent and a pool worker, and the code that runs in the worker.

A ``Job`` is a list of items (one matrix each) in one shared-memory block, so micro-batching
many small matrices per task is a change of how many items the parent puts in, not of the API.
Parent side: ``prepare_job`` builds the block and the job; ``PreparedJob.outputs`` reads the
factors back. Worker side: ``serve`` is the process's main loop; ``run_job`` does one job.

Messages on the worker's pipe: the worker first sends ``Ready``; then, for each ``Job`` it
receives, exactly one ``JobOutcome`` or ``JobFailure``; ``None`` from the parent means "exit".
Messages are small (the data is in shared memory), so the parent's read, started once the pipe
is readable, does not block the event loop for long; and as the worker holds the only other end
of its pipe, a worker dying mid-message ends that read with EOF rather than hanging it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import numpy.typing as npt
import scipy.sparse
from threadpoolctl import threadpool_limits

from consumer import compute, truncated
from consumer.shm import ArraySpec, AttachedBlock, BlockDescriptor, SegmentCache, ShmBlock

#: Test-only faults a job item may carry; the consumer sets them only when its settings enable
#: test faults. "*_once" fire only on a job's first attempt, so a retry succeeds.
FAULTS = frozenset({"segfault", "kill", "hang", "raise", "segfault_once", "kill_once"})

# Failure kinds, for the parent's mapping to error codes.
KIND_LINALG = "linalg"  # LAPACK did not converge: deterministic, not retryable
KIND_INVALID = "invalid"  # the request cannot be computed: not retryable
KIND_RESOURCES = "resources"  # out of memory: may pass later, retryable
KIND_OVERFLOW = "overflow"  # finite input, factors beyond the dtype: not retryable
KIND_INTERNAL = "internal"  # anything else: a bug, not retryable

_blas_limits: Any = None  # the worker's threadpool limiter, held for the process's life
_blas_threads = 0


class InjectedFault(RuntimeError):
    """Raised by the "raise" test fault."""


class FactorOverflow(ArithmeticError):
    """The factors of a finite matrix are not finite: a singular value exceeds the dtype."""


@dataclass(frozen=True, slots=True)
class JobItem:
    """One matrix of a job: region indexes in the block, and the compute options."""

    a: int
    s: int
    u: int | None
    vt: int | None
    full_matrices: bool = False
    compute_uv: bool = True
    k: int | None = None
    quality: bool = False
    fault: str | None = None
    algorithm: str | None = None  # None or "auto": compute chooses (consumer/truncated.py)
    seed: int = 0  # random starts of the iterative algorithms
    # A sparse matrix (format csr, csc or coo): ``a`` holds its values, ``sparse_index`` the
    # regions of its index arrays, (indices, indptr) or (row, col). Plain values only: what
    # crosses the pipe stays primitive (tests/unit/test_no_pickle.py).
    sparse_format: str | None = None
    sparse_shape: tuple[int, int] | None = None
    sparse_index: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A list of items sharing one block. ``attempt`` counts from 1 across retries."""

    block: BlockDescriptor
    items: tuple[JobItem, ...]
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """What the worker reports about one item; the factors themselves are in the block."""

    driver: str
    algorithm: str
    u_shape: tuple[int, ...] | None
    s_shape: tuple[int, ...]
    vt_shape: tuple[int, ...] | None
    compute_ms: float
    quality: compute.Quality | None


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """A job's result metadata. ``worker_ms`` spans attach to detach, inside the worker."""

    items: tuple[ItemOutcome, ...]
    pid: int
    worker_ms: float
    blas_threads: int


@dataclass(frozen=True, slots=True)
class JobFailure:
    """A job whose compute raised. The worker survives it."""

    kind: str
    error_type: str
    message: str
    retryable: bool
    traceback: str


@dataclass(frozen=True, slots=True)
class Ready:
    """First message of a worker: initialized and waiting for jobs."""

    pid: int
    blas_threads: int


# --- parent side ------------------------------------------------------------------------------


class SparseInput(Protocol):
    """A sparse matrix as decoded (``schemas.sparse.SparseMatrix``); entries may be unsorted
    and repeated (they add up)."""

    @property
    def format(self) -> str: ...  # csr, csc or coo
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def data(self) -> npt.NDArray[Any]: ...
    @property
    def index_arrays(self) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SvdTask:
    """One matrix to decompose, as the consumer asks for it."""

    matrix: npt.NDArray[Any] | SparseInput
    full_matrices: bool = False
    compute_uv: bool = True
    k: int | None = None
    quality: bool = False
    fault: str | None = None
    algorithm: str | None = None
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Outputs:
    """Views of one item's factors in the block: valid until the block is closed."""

    u: npt.NDArray[Any] | None
    s: npt.NDArray[Any]
    vt: npt.NDArray[Any] | None


class PreparedJob:
    """A job and the block it lives in; closing it unlinks the block.

    Use as a context manager around ``pool.run`` and the reading of the outputs, so the block
    is unlinked on every path (including a crash, a timeout or a cancellation).
    """

    def __init__(self, block: ShmBlock, job: Job) -> None:
        self.block = block
        self.job = job

    def with_attempt(self, attempt: int) -> Job:
        """The same job as attempt number ``attempt``, for a retry.

        Reusing the block is safe: workers never write to the input regions, and a retry
        overwrites whatever a crashed attempt left in the output regions.
        """
        return replace(self.job, attempt=attempt)

    def outputs(self, outcome: JobOutcome, index: int = 0) -> Outputs:
        """Read-only views of item ``index``'s factors, shaped as the worker reported."""
        item, reported = self.job.items[index], outcome.items[index]
        return Outputs(
            u=self._view(item.u, reported.u_shape),
            s=_readonly(self.block.array(item.s, reported.s_shape)),
            vt=self._view(item.vt, reported.vt_shape),
        )

    def _view(self, region: int | None, shape: tuple[int, ...] | None) -> npt.NDArray[Any] | None:
        if region is None or shape is None:
            return None
        return _readonly(self.block.array(region, shape))

    def close(self, *, reuse: bool = True) -> None:
        self.block.close(reuse=reuse)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A job that failed may have had its worker killed (timeout, cancellation): a process
        # being killed can still write for a moment, so its segment never serves another job.
        self.close(reuse=exc_type is None)


def prepare_job(
    tasks: Sequence[SvdTask], *, attempt: int = 1, cache: SegmentCache | None = None
) -> PreparedJob:
    """Validate the tasks, lay out one block for all of them and copy the inputs in.

    Invalid options raise ``ValueError`` before any shared memory is allocated. The outputs
    have the input's dtype (in native byte order, as LAPACK needs). With a ``cache`` the block
    reuses an idle segment and closing the job gives it back.
    """
    if not tasks:
        raise ValueError("a job needs at least one task")
    specs: list[ArraySpec] = []
    items: list[JobItem] = []
    for task in tasks:
        items.append(_plan_item(task, specs))
    block = ShmBlock(specs, cache)
    try:
        for task, item in zip(tasks, items, strict=True):
            _copy_in(block, task.matrix, item)
    except BaseException:
        block.close()
        raise
    return PreparedJob(block, Job(block.descriptor, tuple(items), attempt))


def _plan_item(task: SvdTask, specs: list[ArraySpec]) -> JobItem:
    matrix = task.matrix
    if not isinstance(matrix, np.ndarray):
        return _plan_sparse_item(task, matrix, specs)
    if matrix.ndim != 2:
        raise ValueError("expected a 2-D matrix")
    dtype = matrix.dtype.newbyteorder("=")
    if dtype not in compute.SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {matrix.dtype}; expected float32 or float64")
    if task.fault is not None and task.fault not in FAULTS:
        raise ValueError(f"unknown fault {task.fault!r}")
    shapes = compute.output_shapes(
        *matrix.shape, full_matrices=task.full_matrices, compute_uv=task.compute_uv, k=task.k
    )
    truncated.check(matrix.shape, task.k, sparse=False, algorithm=task.algorithm)

    def reserve(shape: tuple[int, ...] | None) -> int | None:
        if shape is None:
            return None
        specs.append(ArraySpec.of(shape, dtype))
        return len(specs) - 1

    a = reserve(matrix.shape)
    s = reserve(shapes.s)
    assert a is not None and s is not None
    return JobItem(
        a=a,
        s=s,
        u=reserve(shapes.u),
        vt=reserve(shapes.vt),
        full_matrices=task.full_matrices,
        compute_uv=task.compute_uv,
        k=task.k,
        quality=task.quality,
        fault=task.fault,
        algorithm=task.algorithm,
        seed=task.seed,
    )


def _plan_sparse_item(task: SvdTask, matrix: SparseInput, specs: list[ArraySpec]) -> JobItem:
    """A sparse matrix goes in as its arrays (values, then the two index arrays), never dense."""
    dtype = matrix.data.dtype.newbyteorder("=")
    if dtype not in compute.SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {matrix.data.dtype}; expected float32 or float64")
    if matrix.format not in ("csr", "csc", "coo"):
        raise ValueError(f"unsupported sparse format {matrix.format!r}")
    if task.fault is not None and task.fault not in FAULTS:
        raise ValueError(f"unknown fault {task.fault!r}")
    m, n = matrix.shape
    shapes = compute.output_shapes(
        m, n, full_matrices=task.full_matrices, compute_uv=task.compute_uv, k=task.k
    )
    truncated.check((m, n), task.k, sparse=True, algorithm=task.algorithm)

    def reserve(shape: tuple[int, ...], of: npt.DTypeLike) -> int:
        specs.append(ArraySpec.of(shape, np.dtype(of).newbyteorder("=")))
        return len(specs) - 1

    a = reserve(matrix.data.shape, dtype)
    first, second = (reserve(x.shape, x.dtype) for x in matrix.index_arrays)
    return JobItem(
        a=a,
        s=reserve(shapes.s, dtype),
        u=None if shapes.u is None else reserve(shapes.u, dtype),
        vt=None if shapes.vt is None else reserve(shapes.vt, dtype),
        compute_uv=task.compute_uv,
        k=task.k,
        quality=task.quality,
        fault=task.fault,
        algorithm=task.algorithm,
        seed=task.seed,
        sparse_format=matrix.format,
        sparse_shape=(m, n),
        sparse_index=(first, second),
    )


def _copy_in(block: ShmBlock, matrix: npt.NDArray[Any] | SparseInput, item: JobItem) -> None:
    if isinstance(matrix, np.ndarray):
        np.copyto(block.array(item.a), matrix)
        return
    assert item.sparse_index is not None
    np.copyto(block.array(item.a), matrix.data)
    for region, array in zip(item.sparse_index, matrix.index_arrays, strict=True):
        np.copyto(block.array(region), array)


def _readonly(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.flags.writeable = False
    return array


# --- worker side ------------------------------------------------------------------------------


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
    """Attach the block, compute every item into its output regions, detach."""
    started = time.perf_counter()
    with AttachedBlock(job.block) as block:
        items = tuple(_run_item(block, item, job.attempt) for item in job.items)
    return JobOutcome(
        items=items,
        pid=os.getpid(),
        worker_ms=(time.perf_counter() - started) * 1000.0,
        blas_threads=_blas_threads,
    )


def _run_item(block: AttachedBlock, item: JobItem, attempt: int) -> ItemOutcome:
    _inject(item.fault, attempt)
    a = _input(block, item)
    started = time.perf_counter()
    factors = compute.svd(
        a,
        full_matrices=item.full_matrices,
        compute_uv=item.compute_uv,
        k=item.k,
        algorithm=item.algorithm,
        seed=item.seed,
    )
    compute_ms = (time.perf_counter() - started) * 1000.0
    # Checked once, here: the input was finite, so a non-finite factor means the matrix's
    # scale overflows its dtype (entries near the dtype's largest number).
    for name, factor in (("s", factors.s), ("u", factors.u), ("vt", factors.vt)):
        if factor is not None and not np.isfinite(factor).all():
            raise FactorOverflow(
                f"the factors are not finite in {factor.dtype}: factor {name} overflows "
                f"(the largest singular value exceeds {np.finfo(factor.dtype).max:.3g}); "
                "scale the matrix down"
            )
    _store(block, item.s, factors.s)
    _store(block, item.u, factors.u)
    _store(block, item.vt, factors.vt)
    quality = None
    if item.quality and factors.u is not None and factors.vt is not None:
        quality = compute.quality(a, factors.u, factors.s, factors.vt)
    return ItemOutcome(
        driver=factors.driver,
        algorithm=factors.algorithm,
        u_shape=None if factors.u is None else factors.u.shape,
        s_shape=factors.s.shape,
        vt_shape=None if factors.vt is None else factors.vt.shape,
        compute_ms=compute_ms,
        quality=quality,
    )


def _input(block: AttachedBlock, item: JobItem) -> Any:
    """The item's matrix: a view of the block, or a scipy.sparse matrix over views of it (the
    worker never writes to them: compute copies a matrix it has to sort or sum)."""
    if item.sparse_format is None or item.sparse_index is None:
        return block.array(item.a)
    data = block.array(item.a)
    first, second = (block.array(region) for region in item.sparse_index)
    shape = item.sparse_shape
    if item.sparse_format == "coo":
        return scipy.sparse.coo_array((data, (first, second)), shape=shape)
    kind = scipy.sparse.csr_array if item.sparse_format == "csr" else scipy.sparse.csc_array
    return kind((data, first, second), shape=shape)


def _store(block: AttachedBlock, region: int | None, value: npt.NDArray[Any] | None) -> None:
    if (region is None) != (value is None):
        raise RuntimeError("factors do not match the regions reserved for them")
    if region is not None and value is not None:
        np.copyto(block.array(region, value.shape), value)


def _jobs(conn: Connection) -> Iterator[Job]:
    while (job := conn.recv()) is not None:
        yield job


def _failure(exc: Exception) -> JobFailure:
    if isinstance(exc, np.linalg.LinAlgError):
        kind, retryable = KIND_LINALG, False
    elif isinstance(exc, ValueError | TypeError):
        kind, retryable = KIND_INVALID, False
    elif isinstance(exc, MemoryError):
        kind, retryable = KIND_RESOURCES, True
    elif isinstance(exc, FactorOverflow):
        kind, retryable = KIND_OVERFLOW, False
    else:
        kind, retryable = KIND_INTERNAL, False
    return JobFailure(
        kind=kind,
        error_type=type(exc).__name__,
        message=str(exc),
        retryable=retryable,
        traceback="".join(traceback.format_exception(exc)),
    )


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
