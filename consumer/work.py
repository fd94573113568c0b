"""Run one decoded request on the pool: shared memory in and out, retries after worker crashes.

A crashed worker (segfault, OOM kill) says nothing about the request, so it is retried with
backoff up to ``max_attempts``. A timeout, a LAPACK failure or invalid options are properties of
the request: they are answered at once, never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from consumer.batch import Batcher, BatchFailed
from consumer.metrics import Metrics
from consumer.pool import TaskFailed, TaskTimeout, WorkerCrashed, WorkerPool
from consumer.settings import ConsumerSettings
from consumer.shm import SegmentCache, ShmAllocationError
from consumer.truncated import seed_from
from consumer.worker import (
    KIND_INVALID,
    KIND_LINALG,
    KIND_OVERFLOW,
    KIND_RESOURCES,
    ItemOutcome,
    Outputs,
    SvdTask,
    prepare_job,
)
from schemas import codec
from schemas.errors import ContractError, ErrorCode, SvdServiceError
from schemas.headers import header_value
from schemas.models import SvdResultMeta, Timings, WorkerInfo

if TYPE_CHECKING:
    from consumer.handler import Prepared

log = logging.getLogger(__name__)

Encoded = codec.EncodedMessage

# Test-only: names a fault for the worker to inject (see consumer.worker.FAULTS). Honoured only
# when the service runs with SVD_ENABLE_TEST_FAULTS=true.
TEST_FAULT_HEADER = "svd-test-fault"
# Test-only: the fault that raises in this process instead, as a bug on the request path would.
PARENT_FAULT = "parent_raise"

# What a failed task's kind says about the request; any other kind is the service's fault.
# KIND_INVALID is the compute module refusing its input, which the decoder checks first: were
# one to get through, the same request would fail the same way again, so it is not INTERNAL
# (retryable).
_FAILURE_CODES = {
    KIND_LINALG: ErrorCode.SVD_FAILED,
    KIND_OVERFLOW: ErrorCode.RESULT_OVERFLOW,
    KIND_INVALID: ErrorCode.INVALID_SCHEMA,
}


class ComputeFailed(Exception):
    def __init__(self, error: SvdServiceError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


class Computer:
    def __init__(self, settings: ConsumerSettings, pool: WorkerPool, metrics: Metrics) -> None:
        self._settings = settings
        self._pool = pool
        # Idle segments for the next jobs: a few per worker, as a batch is read back while the
        # next is prepared and request sizes vary.
        self.segments = SegmentCache(settings.shm_cache_bytes, max_segments=4 * pool.size)
        self._batcher: Batcher[Encoded] = Batcher(
            pool,
            max_items=settings.batch_max_items,
            item_max_bytes=settings.batch_item_max_bytes,
            timeout_s=settings.task_timeout_s,
            cache=self.segments,
        )
        self._metrics = metrics

    def close(self) -> None:
        """Unlink the idle segments; blocks still in use are unlinked when they end."""
        self.segments.close()

    async def compute(self, prepared: Prepared, host: str) -> codec.EncodedMessage:
        """The encoded result message, or ``ComputeFailed`` carrying the error to answer with."""
        request = prepared.request
        assert request is not None
        options = request.meta.options
        fault = self._fault(prepared)
        if fault == PARENT_FAULT:
            raise RuntimeError(f"injected fault: {PARENT_FAULT}")
        matrix = request.matrix
        if options.dtype is not None and matrix.dtype.name != options.dtype:
            matrix = matrix.astype(options.dtype)
        task = SvdTask(
            matrix=matrix,
            full_matrices=options.full_matrices,
            compute_uv=options.compute_uv,
            k=options.k,
            quality=options.quality,
            fault=fault,
            algorithm=options.algorithm,
            seed=seed_from(request.meta.request_id),  # the same request, the same factors
        )
        attempts = self._settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await self._attempt(prepared, task, attempt, host)
            except WorkerCrashed as exc:
                if attempt == attempts:
                    raise ComputeFailed(
                        SvdServiceError(
                            ErrorCode.WORKER_CRASHED,
                            f"the worker died on each of {attempts} attempts (last: {exc})",
                        ),
                        attempt,
                    ) from exc
                await self._backoff(prepared, attempt, exc)
            except TaskFailed as exc:
                if exc.kind == KIND_RESOURCES and attempt < attempts:
                    await self._backoff(prepared, attempt, exc)
                    continue
                code = _FAILURE_CODES.get(exc.kind, ErrorCode.INTERNAL)
                raise ComputeFailed(SvdServiceError(code, exc.message), attempt) from exc
            except TaskTimeout as exc:
                raise ComputeFailed(
                    SvdServiceError(
                        ErrorCode.TIMEOUT,
                        f"compute exceeded the {self._settings.task_timeout_s:g}s task limit",
                    ),
                    attempt,
                ) from exc
            except ShmAllocationError as exc:  # /dev/shm full: other requests will free it
                if attempt < attempts:
                    await self._backoff(prepared, attempt, exc)
                    continue
                raise ComputeFailed(
                    SvdServiceError(ErrorCode.INTERNAL, f"no shared memory: {exc}", retryable=True),
                    attempt,
                ) from exc
            except ValueError as exc:  # options the matrix cannot satisfy, e.g. k > min(m, n)
                raise ComputeFailed(
                    SvdServiceError(ErrorCode.INVALID_SCHEMA, str(exc)), attempt
                ) from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(
        self, prepared: Prepared, task: SvdTask, attempt: int, host: str
    ) -> codec.EncodedMessage:
        request = prepared.request
        assert request is not None
        encoding = request.reply_encoding

        def finish(item: ItemOutcome, outputs: Outputs, pid: int, dispatched: float) -> Encoded:
            meta = self._result_meta(prepared, item, pid, dispatched, host)
            # Encoding copies the factors out of shared memory, so the block can go right after.
            return codec.encode_result(meta, outputs.u, outputs.s, outputs.vt, encoding)

        if attempt == 1 and self._batcher.accepts(task):
            try:
                return await self._batcher.run(task, finish)
            except BatchFailed as exc:
                # The whole batch failed (a crash, a timeout, one bad item): this request now
                # runs on its own, so only the item at fault fails (consumer/batch.py).
                log.info("%s; running the request alone", exc, extra=prepared.context)
        with prepare_job([task], attempt=attempt, cache=self.segments) as job:
            dispatched = time.time()
            outcome = await self._pool.run(job.job, timeout=self._settings.task_timeout_s)
            return finish(outcome.items[0], job.outputs(outcome), outcome.pid, dispatched)

    def _result_meta(
        self, prepared: Prepared, item: ItemOutcome, pid: int, dispatched: float, host: str
    ) -> SvdResultMeta:
        request = prepared.request
        assert request is not None
        created = prepared.created_at
        queue_wait = max(0.0, dispatched - created)
        self._metrics.queue_wait.observe(queue_wait)
        self._metrics.compute.observe(item.compute_ms / 1000)
        quality = (
            {
                "reconstruction_error": item.quality.reconstruction,
                "orthogonality_error": item.quality.orthogonality,
            }
            if item.quality is not None
            else None
        )
        return SvdResultMeta.model_validate(
            {
                "request_id": request.meta.request_id,
                "timings": Timings(
                    queue_wait_ms=queue_wait * 1000,
                    compute_ms=item.compute_ms,
                    total_ms=max(0.0, time.time() - created) * 1000,
                ),
                "worker": WorkerInfo(instance_id=self._settings.instance_id, host=host, pid=pid),
                "quality": quality,
                "algorithm": item.algorithm,
                "driver": item.driver,
                "correlation_id": request.meta.correlation_id,
                "traceparent": request.meta.traceparent,
            }
        )

    async def _backoff(self, prepared: Prepared, attempt: int, exc: Exception) -> None:
        delay = self._settings.retry_backoff_s * 2 ** (attempt - 1)
        self._metrics.retried.inc()
        log.warning(
            "attempt %d failed (%s); retrying in %.2fs", attempt, exc, delay,
            extra={**prepared.context, "attempt": attempt},
        )  # fmt: skip
        await asyncio.sleep(delay)

    def _fault(self, prepared: Prepared) -> str | None:
        if not self._settings.enable_test_faults:
            return None
        try:
            raw = header_value(list(prepared.record.headers), TEST_FAULT_HEADER, max_bytes=64)
        except ContractError:
            return None
        return raw.decode("ascii", "replace") if raw else None
