"""Run one admitted record on the pool: batched when small, retried after worker crashes.

A crashed worker (segfault, OOM kill) says nothing about the request, so it is retried with
backoff up to ``max_attempts``; so is a worker out of memory. A timeout is a property of the
request: it is answered at once. Everything the worker finds about the request itself (it does
not decode, LAPACK fails, the factors overflow) comes back as the item's ``Refused`` outcome.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from consumer.admission import PARENT_FAULT, Ticket
from consumer.batch import Batcher, BatchFailed, Delivery, run_job
from consumer.flow import InFlight
from consumer.jobs import KIND_RESOURCES, Answered, NeedsRoom, Record, Refused, WorkerContext
from consumer.metrics import Metrics
from consumer.pool import TaskFailed, TaskTimeout, WorkerCrashed, WorkerPool
from consumer.retry import Backoff
from consumer.settings import ConsumerSettings
from consumer.shm import SegmentCache, ShmAllocationError
from schemas import codec
from schemas.errors import ErrorCode, SvdServiceError
from schemas.limits import DecodeLimits

log = logging.getLogger(__name__)


def limits_from(settings: ConsumerSettings) -> DecodeLimits:
    return DecodeLimits(
        max_rows=settings.max_rows,
        max_cols=settings.max_cols,
        max_elements=settings.max_elements,
        max_matrix_bytes=settings.max_matrix_bytes,
        max_nnz=settings.max_nnz,
        max_message_bytes=settings.max_message_bytes,
        # Refuse up front a request whose factors could not be published (headers need room).
        max_result_bytes=settings.max_message_bytes - 64 * 1024,
        max_stored_result_bytes=settings.max_stored_result_bytes
        if settings.store.enabled
        else None,
    )


class Dispatcher:
    """Runs tickets on the pool; one ``Delivery`` per ticket, whatever happens to the worker."""

    def __init__(
        self, settings: ConsumerSettings, pool: WorkerPool, metrics: Metrics, inflight: InFlight
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._inflight = inflight
        self._backoff = Backoff(settings.retry_backoff_s)
        self._context = WorkerContext(
            limits=limits_from(settings),
            instance_id=settings.instance_id,
            host=socket.gethostname(),
            store=settings.store if settings.store.enabled else None,
            store_results_above=settings.store_results_above_bytes,
        )
        # An unreachable store is waited for (store_outage_s), not counted against the
        # request's attempts: it says nothing about the request.
        self._store_backoff = Backoff(settings.retry_backoff_s, max_s=5.0)
        # Idle segments for the next jobs: a few per worker, as a batch is read back while the
        # next is prepared and request sizes vary.
        self.segments = SegmentCache(settings.shm_cache_bytes, max_segments=4 * pool.size)
        self._batcher = Batcher(
            pool,
            self._context,
            max_items=settings.batch_max_items,
            item_max_bytes=settings.batch_item_max_bytes,
            timeout_s=settings.task_timeout_s,
            cache=self.segments,
        )

    def close(self) -> None:
        """Unlink the idle segments; blocks still in use are unlinked when they end."""
        self.segments.close()

    async def run(self, ticket: Ticket) -> tuple[Delivery, int]:
        """The ticket's delivery and the compute attempts it took."""
        if ticket.fault == PARENT_FAULT:
            raise RuntimeError(f"injected fault: {PARENT_FAULT}")
        attempts = self._settings.max_attempts
        attempt = 1
        store_failures = 0
        store_since: float | None = None
        while True:
            why: object
            try:
                delivery = await self._attempt(ticket, attempt)
            except WorkerCrashed as exc:
                if attempt == attempts:
                    message = f"the worker died on each of {attempts} attempts (last: {exc})"
                    return self._refused(ticket, ErrorCode.WORKER_CRASHED, message), attempt
                why = exc
            except TaskFailed as exc:  # the job failed as a whole, not the request
                if exc.kind != KIND_RESOURCES or attempt == attempts:
                    return self._refused(ticket, ErrorCode.INTERNAL, exc.message), attempt
                why = exc
            except TaskTimeout:
                limit = self._settings.task_timeout_s
                message = f"compute exceeded the {limit:g}s task limit"
                return self._refused(ticket, ErrorCode.TIMEOUT, message), attempt
            except ShmAllocationError as exc:  # /dev/shm full: other requests will free it
                if attempt == attempts:
                    message = f"no shared memory: {exc}"
                    refused = self._refused(ticket, ErrorCode.INTERNAL, message, retryable=True)
                    return refused, attempt
                why = exc
            else:
                outcome = delivery.outcome
                if isinstance(outcome, NeedsRoom):  # computed nothing: not an attempt
                    if outcome.answer_bytes <= ticket.answer_bytes:  # would ask again forever
                        message = f"the worker asked for {outcome.answer_bytes} bytes it had"
                        return self._refused(ticket, ErrorCode.INTERNAL, message), attempt
                    ticket.reprice(outcome.answer_bytes, self._inflight)
                    continue
                if isinstance(outcome, Refused) and outcome.code == ErrorCode.STORE_UNAVAILABLE:
                    now = time.monotonic()
                    store_since = now if store_since is None else store_since
                    if now - store_since < self._settings.store_outage_s:
                        delivery.release()
                        store_failures += 1
                        await self._wait_for_store(ticket, store_failures, outcome.message)
                        continue
                    self._observe(delivery)
                    return delivery, attempt
                if not (isinstance(outcome, Refused) and outcome.again and attempt < attempts):
                    self._observe(delivery)
                    return delivery, attempt
                delivery.release()
                why = outcome.message
            await self._retry(ticket, attempt, why)
            attempt += 1

    async def _attempt(self, ticket: Ticket, attempt: int) -> Delivery:
        record = Record(
            value=ticket.record.value or b"",
            headers=ticket.record.headers,
            timestamp_ms=ticket.record.timestamp or None,
            answer_bytes=ticket.answer_bytes,
            fault=ticket.fault,
            sparse=ticket.sparse,
            stored_bytes=ticket.stored_bytes,
            origin=f"{ticket.record.topic}/{ticket.record.partition}/{ticket.record.offset}",
        )
        if attempt == 1 and self._batcher.accepts(record):
            try:
                return await self._batcher.run(record)
            except BatchFailed as exc:
                # The whole batch failed (a crash, a timeout): this request now runs on its
                # own, so only the item at fault fails (consumer/batch.py).
                log.info("%s; running the request alone", exc, extra=ticket.context)
        (delivery,) = await run_job(
            self._pool, [record], self._context,
            timeout_s=self._settings.task_timeout_s, attempt=attempt, cache=self.segments,
        )  # fmt: skip
        return delivery

    def _refused(
        self, ticket: Ticket, code: ErrorCode, message: str, *, retryable: bool | None = None
    ) -> Delivery:
        """A failure of the job, not of the request: the worker could not say whose request it
        was, so its id and reply topic are read from the record, as for one that did not
        decode."""
        err = SvdServiceError(code, message, retryable=retryable)
        record = ticket.record
        value, headers = record.value or b"", list(record.headers)
        outcome = Refused(
            code=str(err.code),
            message=err.message,
            retryable=err.retryable,
            request_id=codec.recover_request_id(value, headers, record.key),
            reply_topic=codec.recover_reply_topic(value, headers),
            created_at_ms=None,
            computed=True,
        )
        return Delivery(outcome, pid=0)

    def _observe(self, delivery: Delivery) -> None:
        outcome = delivery.outcome
        if isinstance(outcome, Refused) and outcome.code == ErrorCode.EXPIRED:
            self._metrics.expired.inc()
        if not isinstance(outcome, Answered):
            return
        self._metrics.queue_wait.observe(outcome.queue_wait_ms / 1000)
        self._metrics.compute.observe(outcome.compute_ms / 1000)

    async def _wait_for_store(self, ticket: Ticket, failures: int, why: str) -> None:
        delay = self._store_backoff.delay(failures)
        self._metrics.retried.inc()
        # Once per outage and then every tenth try, not at every retry of every request.
        log_at = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
        log.log(
            log_at, "the object store failed (%s); retrying in %.2fs (try %d, for up to %gs)",
            why, delay, failures, self._settings.store_outage_s, extra=ticket.context,
        )  # fmt: skip
        await asyncio.sleep(delay)

    async def _retry(self, ticket: Ticket, attempt: int, why: object) -> None:
        delay = self._backoff.delay(attempt)
        self._metrics.retried.inc()
        log.warning(
            "attempt %d failed (%s); retrying in %.2fs", attempt, why, delay,
            extra={**ticket.context, "attempt": attempt},
        )  # fmt: skip
        await asyncio.sleep(delay)
