"""The consumer service: fetch, admit within the budget, pause when full, commit what is done.

The loop reads at a glance: poll, admit each record or hand it back, repeat. Per-request work
lives in ``handler.py``, offsets in ``offsets.py``, the budget in ``flow.py``, the pool in
``pool.py``; the Kafka clients are built in ``kafka_clients.py``, rebalances handled in
``rebalance.py``, offsets committed in ``commits.py``. Shutdown is two-phase: stop taking work
and drain up to a deadline, commit, then cancel what is left (it will be redelivered) and close
what ``_start`` opened, newest first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from consumer import admission, allocator
from consumer.admission import Ticket
from consumer.broker_events import POLL_INTERVAL_S, BrokerEvents
from consumer.claims import Claims
from consumer.commits import Committer
from consumer.cpu import available_cpus, blas_threads_per_worker
from consumer.dispatch import Dispatcher, limits_from
from consumer.flow import Budget, InFlight
from consumer.handler import RequestHandler
from consumer.http import MetricsServer
from consumer.kafka_clients import KafkaClients
from consumer.lag import BrokerContact, LagMonitor
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, PartitionLedger
from consumer.pool import WorkerPool
from consumer.publisher import Publisher
from consumer.rebalance import Rebalance
from consumer.reply_topics import ReplyTopics
from consumer.settings import ConsumerSettings
from consumer.tasks import TaskSet
from consumer.topic_limits import read_topic_limits
from consumer.transactions import TransactionalOutbox
from consumer.unreadable import UNREADABLE_ERRORS, UnreadableReader
from objectstore import PayloadStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Summary:
    received: int
    answered: int
    in_flight_at_stop: int
    cancelled: int
    seconds: float


class SvdService:
    def __init__(self, settings: ConsumerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        cpus = available_cpus()
        self.pool_size = settings.pool_size or cpus
        self.blas_threads = settings.blas_threads or blas_threads_per_worker(cpus, self.pool_size)
        self.inflight = InFlight(
            Budget(
                max_requests=settings.max_inflight,
                max_bytes=settings.max_inflight_bytes,
                resume_ratio=settings.resume_ratio,
            )
        )
        self.offsets = OffsetTracker()
        # Fetched records that did not fit the budget yet, per partition in offset order.
        self._held: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        # Bumped by each revocation: records fetched before it are stale (see _admit).
        self._generation = 0
        # Per partition, one past the newest offset aiokafka handed us (admitted or held): where
        # reading resumes after a fetch that failed on an unreadable record.
        self._received_up_to: dict[TopicPartition, int] = {}
        self._unreadable: UnreadableReader
        self.paused = False
        self.ready = asyncio.Event()  # joined the group with the pool up
        self.broker = BrokerContact(settings.ready_broker_window_s)
        self._outbox: TransactionalOutbox | None = None
        self._limits = limits_from(settings)
        self._store_results_above = (
            settings.store_results_above_bytes if settings.store.enabled else None
        )
        self._stopping = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._requests = TaskSet(on_fatal=self._fatal)
        self._background = TaskSet(on_fatal=self._fatal)
        self._broker_events = BrokerEvents(self.metrics, tasks=self._background)
        self._store = PayloadStore(settings.store) if settings.store.enabled else None
        self._claims = Claims(self._store, self._background, self.metrics)
        self._fatal_error: BaseException | None = None
        self._received = 0
        self._answered = 0
        # What _start opened, each pushed before it starts; _shutdown closes them newest first.
        self._exit = AsyncExitStack()
        self._after_pool = ExitStack()  # closed right after the pool (see _start)
        # Built here so readiness can ask it; its workers start in _start.
        self.pool = WorkerPool(
            self.pool_size,
            self.blas_threads,
            on_worker_started=lambda pid: self.metrics.workers_alive.inc(),
            on_worker_exited=lambda pid, code: self.metrics.workers_alive.dec(),
        )
        self._rebalance: Rebalance | None = None  # once _start has a consumer
        self._consumer: AIOKafkaConsumer
        self._producer: AIOKafkaProducer
        self._committer: Committer
        self._lag: LagMonitor
        self._handler: RequestHandler
        self._dispatcher: Dispatcher

    # -- control -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """First SIGTERM/SIGINT: stop fetching and drain. A second one stops at once."""
        if self._stopping.is_set():
            log.warning("second stop signal: abandoning the drain")
            self._hard_stop.set()
        self._stopping.set()

    def _fenced(self, tp: TopicPartition) -> None:
        """Another instance took over with our transactional id: stop, never write twice."""
        log.critical("fenced on %s-%d: stopping this instance", tp.topic, tp.partition)
        self._stopping.set()

    def _fatal(self, exc: BaseException | None, name: str) -> None:
        if self._stopping.is_set():
            return
        log.critical("background task %s ended (%r); stopping the service", name, exc)
        self._fatal_error = exc or RuntimeError(f"{name} ended")
        self._stopping.set()

    # -- run -----------------------------------------------------------------------------------
    async def run(self) -> Summary:
        started = time.monotonic()
        try:
            await self._start()
            await self._consume()
        finally:
            summary = await self._shutdown(started)
        if self._fatal_error is not None:
            raise RuntimeError("the service stopped after a fatal error") from self._fatal_error
        return summary

    async def _start(self) -> None:
        s = self.settings
        m = self.metrics
        # Each close goes on the exit stack before its start, so a start that fails half way is
        # closed too.
        if s.metrics_port != 0:  # first, so /healthz answers while the pool starts
            http = MetricsServer(
                m.registry, self.readiness, host=s.metrics_host, port=max(s.metrics_port, 0)
            )
            self._exit.push_async_callback(http.close)  # last: scrapes see the drain to its end
            host, port = await http.start()
            log.info("metrics on http://%s:%d (/metrics, /healthz, /readyz)", host, port)
        # What the pool's jobs use (the dispatcher's shared-memory segments) closes after the
        # workers are gone.
        self._exit.callback(self._after_pool.close)
        self._exit.push_async_callback(self.pool.close, timeout=5.0)
        await self.pool.start()
        m.pool_size.set(self.pool_size)
        # Read at scrape time, in this process: no hook needed on every dispatch.
        m.workers_busy.set_function(lambda: self.pool.workers_alive - self.pool.idle_workers)
        m.inflight_requests.set_function(lambda: self.inflight.requests)
        m.inflight_bytes.set_function(lambda: self.inflight.bytes)
        m.ready.set_function(lambda: float(all(self.readiness().values())))
        m.inflight_requests_limit.set(self.inflight.budget.max_requests)
        m.inflight_bytes_limit.set(self.inflight.budget.max_bytes)
        clients = KafkaClients(s)
        # Before the first client starts, so a bootstrap failure is reported too; the watcher
        # task (below) detaches it when the shutdown cancels it, before the clients close.
        self._broker_events.attach()
        self._exit.callback(self._broker_events.close)
        self._producer = clients.answers_producer()
        self._broker_events.watch_producer(self._producer, [s.results_topic, s.dlq_topic])
        self._exit.push_async_callback(self._producer.stop)
        await self._producer.start()
        consumer = clients.requests_consumer()
        self._broker_events.watch_consumer(
            consumer, [s.requests_topic], s.group_id, s.group_instance_id
        )
        self._exit.push_async_callback(consumer.stop)
        if s.processing_guarantee == "exactly_once":
            self._outbox = TransactionalOutbox(
                s.group_id,
                s.transactional_id_prefix or s.group_id,
                clients.transactional_producer,
                on_fenced=self._fenced,
            )
            # Pushed after the consumer's stop so it closes first; it only has to exist before
            # the consumer starts (its producers start with the first assignment).
            self._exit.push_async_callback(self._outbox.close_all)
        consumer.subscribe([s.requests_topic], listener=self._attach(consumer))
        await consumer.start()
        self._unreadable = UnreadableReader(
            self._consumer,
            poll_timeout_ms=int(s.poll_timeout_s * 1000),
            max_records=s.max_inflight,
            max_bytes=s.fetch_max_bytes,
        )
        self.broker.ok()
        publisher = Publisher(self._producer, on_retry=m.publish_retries.inc)
        self._dispatcher = Dispatcher(s, self.pool, m, self.inflight)
        self._after_pool.callback(self._dispatcher.close)
        reply_topics = ReplyTopics.from_settings(s, self._list_topics)
        topic_limits = await read_topic_limits(clients.admin(), [s.results_topic, s.dlq_topic])
        log.info("output topics take records up to %s bytes", topic_limits or "unknown")
        self._handler = RequestHandler(
            s, self._dispatcher, publisher, m, self._outbox, reply_topics, topic_limits,
            claims=self._claims, store=self._store,
        )  # fmt: skip
        self._background.spawn(
            self._committer.every(s.commit_interval_s), name="committer", critical=True
        )
        self._background.spawn(self._lag.run(s.lag_interval_s), name="lag", critical=True)
        # Not critical: operators lose the broker event lines, never the service.
        self._background.spawn(self._broker_events.run(POLL_INTERVAL_S), name="broker-events")
        if s.allocator_trim_interval_s > 0:
            self._background.spawn(
                self._trim_every(s.allocator_trim_interval_s), name="allocator", critical=True
            )
        log.info(
            "consuming %s as %s in group %s: pool %d x %d BLAS threads, in-flight %d requests / %d MiB",
            s.requests_topic, s.instance_id, s.group_id, self.pool_size, self.blas_threads,
            self.inflight.budget.max_requests, self.inflight.budget.max_bytes >> 20,
        )  # fmt: skip
        # Everything allocated so far lives as long as the service: the collector need not
        # walk it again each time the request path's short-lived objects trigger a full
        # collection, which cost the loop a large share of its CPU at small sizes
        # (`make profile`). Young collections stay at CPython's pace: cycles hold answer
        # buffers until collected (tests/faults/test_backlog_memory.py).
        gc.freeze()

    async def _consume(self) -> None:
        poll_ms = int(self.settings.poll_timeout_s * 1000)
        while not self._stopping.is_set():
            if self.paused:
                await self._wait_for_room()
            if self._held and not self.paused:
                await self._admit_held()  # before anything newer, so offsets begin in order
                continue
            try:
                batch = await self._consumer.getmany(timeout_ms=poll_ms)
            except UNREADABLE_ERRORS as exc:
                await self._read_past_unreadable(exc)
                continue
            if batch:
                await self._admit_batch(batch)
            if not self.ready.is_set() and self._consumer.assignment():
                self.ready.set()

    async def _admit_held(self) -> None:
        """Admit the records fetched earlier that did not fit, before fetching more.

        They are kept here rather than handed back to Kafka with a seek: a seek or a pause
        makes aiokafka drop what it has fetched ahead, to be fetched, CRC-checked and skipped
        through again, and at 32x32 those re-fetches took most of the loop's time
        (docs/performance.md). Under a steady load a release comes within milliseconds; when
        none comes within a poll timeout the service is saturated and pauses, as before (and
        the paused getmany keeps the member in its group).
        """
        held, self._held = self._held, {}
        await self._admit_batch(held)
        if not self._held:
            return
        before = self.inflight.requests
        await self.inflight.wait_for_release(self.settings.poll_timeout_s)
        if self.inflight.requests >= before:
            self._pause()

    async def _wait_for_room(self) -> None:
        # getmany must still be called while paused, or the member leaves its group once
        # max.poll.interval passes (aiokafka #720, #848); so the wait is bounded by a poll.
        if not self.inflight.below_low_watermark():
            await self.inflight.wait_for_release(self.settings.poll_timeout_s)
        if self.inflight.below_low_watermark():
            self._resume()

    async def _read_past_unreadable(self, exc: Exception) -> None:
        """A fetch failed on a record that cannot be read (consumer/unreadable.py): read each
        partition alone, admitting what it holds in order, unreadable offsets included."""
        log.warning(
            "a fetch failed on a record that cannot be read (%r); reading partition by "
            "partition to dead-letter it and move on",
            exc,
        )
        generation = self._generation

        def current() -> bool:  # no rebalance since: every position restarts from the commits
            return generation == self._generation

        # Partitions with held records were not fetched (the loop admits those first).
        tps = self._consumer.assignment() - set(self._held)
        try:
            await self._unreadable.rewind(tps, self._received_up_to, current)
            for tp in sorted(tps):
                if not current() or self._held:
                    return  # the rest were rewound: the normal fetch reads them once held clears
                records = await self._unreadable.read(tp)
                if not current():
                    return
                # Admitted or held in order: read records are never dropped (their position
                # has moved past them).
                await self._admit_batch({tp: records}, generation)
        except IllegalStateError as exc:  # revoked between two calls: its next owner reads it
            log.info("a partition was revoked while reading past an unreadable record: %r", exc)

    async def _admit_batch(
        self,
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        generation: int | None = None,
    ) -> None:
        full = False
        if generation is None:
            generation = self._generation
        for tp, records in batch.items():
            if records and generation == self._generation and tp in self._consumer.assignment():
                # max(): held records come back through here after newer ones were received.
                newest = records[-1].offset + 1
                self._received_up_to[tp] = max(self._received_up_to.get(tp, newest), newest)
            for index, record in enumerate(records):
                if not full and await self._admit(tp, record, generation):
                    continue
                # No room: hold this record and the rest of the partition, in order, for
                # _admit_held (no seek: see there).
                full = True
                if tp in self._consumer.assignment():
                    self._held[tp] = records[index:]
                break

    async def _admit(
        self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes], generation: int
    ) -> bool:
        """Start work on ``record`` if the budget has room; False hands it back.

        O(1) in the record's matrix: it is priced from its size and headers, and decoded by a
        worker (consumer/admission.py). ``generation`` is the one its batch was fetched in. A
        revocation since (while reading past an unreadable record) makes the record stale,
        even if the partition came straight back: the new assignment fetches it again from the
        last commit, and beginning both copies would begin an offset twice
        (tests/faults/test_rebalance_race.py). So it is dropped.
        """
        if generation != self._generation or tp not in self._consumer.assignment():
            return True
        if self.inflight.requests >= self.inflight.budget.max_requests:
            return False
        ticket = admission.price(
            record, self._limits, test_faults=self.settings.enable_test_faults,
            store_results_above=self._store_results_above,
        )  # fmt: skip
        if not self.inflight.fits(ticket.cost):
            return False
        ledger = self.offsets.ledger(tp)
        ledger.begin(record.offset)
        self.inflight.admit(ticket.cost)
        self._received += 1
        self.metrics.received.inc()
        self.metrics.payload.observe(ticket.value_bytes)
        self._requests.spawn(
            self._handle(ticket, ledger),
            name=f"request {tp.topic}-{tp.partition}@{record.offset}",
        )
        return True

    async def _handle(self, ticket: Ticket, ledger: PartitionLedger) -> None:
        try:
            await self._handler.handle(ticket, ledger)  # answers even its own failures
            self._answered += 1
        finally:
            self.inflight.release(ticket.cost)  # repriced, maybe, by the dispatcher

    async def _list_topics(self) -> set[str]:
        metadata = await self._producer.client.fetch_all_metadata()
        return set(metadata.topics())

    # -- backpressure --------------------------------------------------------------------------
    def _pause(self) -> None:
        assigned = self._consumer.assignment()
        self._consumer.pause(*assigned)
        if not self.paused:
            log.info(
                "in-flight budget full (%d requests, %d bytes): pausing %d partitions",
                self.inflight.requests, self.inflight.bytes, len(assigned),
            )  # fmt: skip
        self.paused = True
        self.metrics.paused_partitions.set(len(self._consumer.paused()))

    def _resume(self) -> None:
        self._consumer.resume(*self._consumer.assignment())
        self.paused = False
        self.metrics.paused_partitions.set(0)
        log.info("in-flight below the low watermark: resuming")

    # -- the group (consumer/rebalance.py, consumer/commits.py) ---------------------------------
    def _attach(self, consumer: AIOKafkaConsumer) -> Rebalance:
        """Read with ``consumer``; commits, lag and the rebalance listener act through it."""
        self._consumer = consumer
        self._committer = Committer(
            consumer, self.offsets, self.broker, transactional=self._outbox is not None,
            claims=self._claims,
        )  # fmt: skip
        self._lag = LagMonitor(
            consumer, self.offsets, self.metrics, self.broker,
            pool_size=self.pool_size, timeout_s=self.settings.ready_broker_window_s / 2,
        )  # fmt: skip
        self._rebalance = Rebalance(
            consumer,
            self,
            offsets=self.offsets,
            inflight=self.inflight,
            committer=self._committer,
            outbox=self._outbox,
            lag=self._lag,
            metrics=self.metrics,
            wait_s=min(self.settings.drain_timeout_s, self.settings.session_timeout_s),
        )
        return self._rebalance

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def forget_fetched(self, revoked: set[TopicPartition]) -> None:
        """On revocation: see consumer/rebalance.py's ``Intake``."""
        if revoked:  # eager rebalancing: every position restarts from the last commit
            self._generation += 1  # so what was fetched before is stale from here on
        for tp in revoked:
            # Never begun, so never committed past: the next owner reads them again.
            self._held.pop(tp, None)
            self._received_up_to.pop(tp, None)

    async def _trim_every(self, interval_s: float) -> None:
        # Large buffers come from the heap (consumer/allocator.py); this gives freed ones back.
        trimmer = allocator.HeapTrimmer(self.settings.allocator_keep_bytes)
        while True:
            await asyncio.sleep(interval_s)
            # Reference cycles (aiokafka's, and a failed request's traceback) can hold answer
            # buffers until a full collection: collected first, their pages are trimmed too.
            trimmer.check(live_bytes=self.inflight.bytes, before_trim=gc.collect)

    # -- shutdown ------------------------------------------------------------------------------
    async def _shutdown(self, started: float) -> Summary:
        in_flight = len(self._requests)
        remaining = cancelled = 0
        try:
            if self._rebalance is not None:  # a consumer was made: there may be work to drain
                remaining, cancelled = await self._drain(self._rebalance)
        finally:
            try:
                await self._exit.aclose()  # every close runs, even after one fails
            except Exception:
                log.exception("error while closing; carrying on with shutdown")
        summary = Summary(
            self._received, self._answered, in_flight, cancelled, time.monotonic() - started
        )
        budget = self.inflight.budget
        log.info(
            "stopped after %.1fs: received %d, answered %d, in flight at stop %d, drained %d, "
            "cancelled %d (redelivered on restart); peak in flight %d/%d requests, %d/%d bytes",
            summary.seconds, summary.received, summary.answered, in_flight, in_flight - remaining,
            cancelled, self.inflight.peak_requests, budget.max_requests, self.inflight.peak_bytes,
            budget.max_bytes,
        )  # fmt: skip
        return summary

    async def _drain(self, rebalance: Rebalance) -> tuple[int, int]:
        """Stop fetching, wait for the requests (bounded), commit, cancel what is left (it is
        redelivered). Returns how many were left after the wait and how many were cancelled."""
        self._consumer.pause(*self._consumer.assignment())
        keepalive = asyncio.create_task(self._poll_while_draining())
        try:
            remaining = await self._requests.wait(
                self.settings.drain_timeout_s, stop_early=self._hard_stop
            )
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
        rebalance.closing = True
        await self._background.cancel_all()
        await self._committer.commit()
        return remaining, await self._requests.cancel_all()

    async def _poll_while_draining(self) -> None:
        """Keep calling getmany, every partition paused, for as long as the drain lasts.

        Nothing is returned (paused partitions give nothing), but aiokafka counts the calls:
        without them the member leaves its group once the drain outlasts max.poll.interval (one
        slow SVD is enough), and another member computes and answers the drained requests again
        before their offsets can be committed (tests/faults/test_slow_svd.py).
        """
        poll_ms = int(self.settings.poll_timeout_s * 1000)
        while True:
            try:
                # Whatever a rebalance might hand back unpaused is dropped, never admitted: the
                # commit position comes from the ledgers, so it is read again by its next owner.
                await self._consumer.getmany(timeout_ms=poll_ms)
            except KafkaError as exc:  # broker trouble: the drain goes on, and so do we
                log.debug("poll while draining failed: %r", exc)
                await asyncio.sleep(self.settings.poll_timeout_s)

    # -- readiness -----------------------------------------------------------------------------
    def readiness(self) -> dict[str, bool]:
        """/readyz's checks by name; ready when all pass (docs/operations.md).

        ``group``: holds an assignment from the group, even an empty one: a spare member in a
        group with more members than partitions is ready, it takes partitions over at the next
        rebalance. False from a revocation to the next assignment (a rebalance). ``pool``: a
        worker is up. ``broker``: a broker call succeeded within ready_broker_window_s.
        ``running``: not draining for a stop.
        """
        return {
            "group": self._rebalance is not None and self._rebalance.joined,
            "pool": self.pool.workers_alive > 0,
            "broker": self.broker.reachable(),
            "running": not self._stopping.is_set(),
        }
