"""What the real client and the fake share: the public API, input checks, the pending table.

Only the transport differs (Kafka, or an in-process stand-in for the service), so a call is
accepted, rejected, timed out, abandoned and closed in exactly the same way by both.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Self, overload

import numpy as np
import numpy.typing as npt

from objectstore import PayloadStore, StoreError
from producer_sdk import _wire
from producer_sdk.errors import ClientClosed, SvdError, SvdInvalidRequest, service_error
from producer_sdk.pending import PendingTable, SeenIds
from producer_sdk.result import SvdResult
from producer_sdk.settings import ClientSettings
from schemas import codec
from schemas.codec import EncodedMessage, StoredResult
from schemas.errors import ErrorCode
from schemas.headers import Encoding
from schemas.models import ObjectRef

log = logging.getLogger("producer_sdk")

State = Literal["new", "starting", "open", "closed"]


class SvdHandle:
    """A submitted request: its id, and an awaitable of its result.

    Awaiting raises the request's SvdError. Cancelling a task that awaits the handle abandons the
    request (its answer will be dropped); so does ``cancel()``. An unawaited handle still leaves
    the client's table at its deadline.
    """

    __slots__ = ("_future", "deadline_ms", "request_id")

    def __init__(
        self, request_id: str, deadline_ms: int, future: asyncio.Future[SvdResult]
    ) -> None:
        self.request_id = request_id
        self.deadline_ms = deadline_ms
        self._future = future

    def __await__(self) -> Generator[Any, None, SvdResult]:
        return self._future.__await__()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        return self._future.cancel()

    def add_done_callback(self, callback: Callable[[asyncio.Future[SvdResult]], object]) -> None:
        self._future.add_done_callback(callback)

    def __repr__(self) -> str:
        return f"<SvdHandle {self.request_id} {'done' if self.done() else 'pending'}>"


@dataclass(frozen=True)
class ClientStats:
    """Counters since start; ``pending`` and ``seen_ids`` are current sizes."""

    pending: int
    seen_ids: int
    resolved: int
    duplicates: int
    late: int
    unknown: int
    expired: int
    abandoned: int
    failed: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Outgoing:
    """A request about to leave: its record and the future its answer resolves, and the URL of
    its stored matrix, if any (deleted again when the request is not sent)."""

    request_id: str
    message: EncodedMessage
    future: asyncio.Future[SvdResult]
    stored_url: str | None = None


class BaseSvdClient(ABC):
    def __init__(self, settings: ClientSettings | None = None, **overrides: Any) -> None:
        if settings is None:
            settings = ClientSettings(**overrides)
        elif overrides:
            settings = ClientSettings(**{**settings.model_dump(), **overrides})
        self.settings = settings
        self._pending: PendingTable[SvdResult] | None = None
        self._state: State = "new"
        self._broken: str | None = None
        self._store = PayloadStore(settings.store) if settings.store.enabled else None
        # Fetching stored results and deleting unsent requests' objects, until they end.
        self._store_tasks: set[asyncio.Task[Any]] = set()

    # -- transport: what subclasses provide ------------------------------------------------------

    @abstractmethod
    async def _connect(self) -> None:
        """Be ready to receive answers before returning."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Release everything; must work after a partial _connect."""

    @abstractmethod
    async def _transmit(self, request: Outgoing) -> None:
        """Send the request, or raise the SvdError that says why it was not sent."""

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"start() on a client that is {self._state}")
        self._state = "starting"
        s = self.settings
        self._pending = PendingTable(s.max_pending, SeenIds(s.seen_ids_max, s.seen_ids_ttl_s))
        try:
            await self._connect()
        except BaseException:
            await self._disconnect()
            self._state = "closed"
            raise
        self._state = "open"

    async def close(self) -> None:
        """Fail what is still pending with ClientClosed, then disconnect. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._pending is not None:
            self._pending.fail_all(lambda rid: ClientClosed(request_id=rid))
        await self._disconnect()
        tasks, self._store_tasks = self._store_tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def stats(self) -> ClientStats:
        pending = self._pending
        if pending is None:
            return ClientStats(0, 0, 0, 0, 0, 0, 0, 0, 0)
        return ClientStats(
            pending=len(pending), seen_ids=len(pending.seen), **asdict(pending.stats)
        )

    def _break(self, reason: str) -> None:
        """The transport can no longer deliver answers: fail everything now, refuse new work."""
        self._broken = reason
        if self._pending is not None:
            self._pending.fail_all(
                lambda rid: ClientClosed(f"the client broke: {reason}", request_id=rid)
            )

    def _ready(self) -> PendingTable[SvdResult]:
        if self._broken is not None:
            raise ClientClosed(f"the client broke: {self._broken}")
        if self._state != "open" or self._pending is None:
            raise ClientClosed("the client is not started" if self._state == "new" else "closed")
        return self._pending

    # -- requests -------------------------------------------------------------------------------

    async def svd(
        self,
        matrix: npt.ArrayLike,
        *,
        k: int | None = None,
        full_matrices: bool = False,
        compute_uv: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (also the deadline sent with the request)
        encoding: Encoding | None = None,
        correlation_id: str | None = None,
    ) -> SvdResult:
        """The SVD of ``matrix``, computed by the service. Raises an SvdError subclass."""
        handle = await self.submit(
            matrix,
            k=k,
            full_matrices=full_matrices,
            compute_uv=compute_uv,
            timeout=timeout,
            encoding=encoding,
            correlation_id=correlation_id,
        )
        return await handle

    async def submit(
        self,
        matrix: npt.ArrayLike,
        *,
        k: int | None = None,
        full_matrices: bool = False,
        compute_uv: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (also the deadline sent with the request)
        encoding: Encoding | None = None,
        correlation_id: str | None = None,
    ) -> SvdHandle:
        """Send a request and return its handle without waiting for the answer.

        Invalid input raises SvdInvalidRequest here, before anything is sent. When ``max_pending``
        requests are already waiting, this awaits a free slot (within the timeout).
        """
        self._ready()
        timeout_s = self.settings.default_timeout_s if timeout is None else float(timeout)
        if not timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        loop_deadline = asyncio.get_running_loop().time() + timeout_s
        request_id = _wire.new_request_id()
        created_at_ms = _wire.now_ms()
        deadline_ms = created_at_ms + round(timeout_s * 1000)
        stores = self.settings.stores_payloads
        # Decided from the matrix's size: stored requests are encoded binary, their bytes become
        # the object and their svd-meta the request that references it.
        # What it will weigh on the wire: integers become float64 (``_wire.as_matrix``).
        nbytes = None
        if isinstance(matrix, np.ndarray):
            nbytes = matrix.size * 8 if matrix.dtype.kind in "iub" else matrix.nbytes
        to_store = stores and (nbytes is None or nbytes > self.settings.store_above_bytes)

        def build() -> EncodedMessage:
            return _wire.build_request(
                matrix,
                request_id=request_id,
                k=k,
                full_matrices=full_matrices,
                compute_uv=compute_uv,
                created_at_ms=created_at_ms,
                deadline_ms=deadline_ms,
                encoding=Encoding.BINARY if to_store else (encoding or self.settings.encoding),
                reply_topic=self.settings.reply_topic,
                correlation_id=correlation_id,
                schema_version=2 if stores else 1,
            )

        # Converting a list, copying a big array or printing it as JSON is event-loop time that
        # the caller's other work would wait for.
        small = nbytes is not None and nbytes <= self.settings.offload_bytes
        message = build() if small else await asyncio.to_thread(build)
        stored_url = None
        if to_store and len(message.value) > self.settings.store_above_bytes:
            message, stored_url = await self._store_request(request_id, message)
        try:
            check_size(message, self.settings.max_message_bytes, request_id)
            future = await self._ready().open(request_id, loop_deadline)
        except BaseException:
            self._forget_stored(stored_url)
            raise
        try:
            self._ready()  # the client may have closed while we waited for a slot
            await self._transmit(Outgoing(request_id, message, future, stored_url))
        except SvdError as error:
            self._forget_stored(stored_url)
            if self._pending is not None:
                self._pending.fail(request_id, error)
            raise
        except BaseException:
            self._forget_stored(stored_url)
            future.cancel()  # cancelled while sending: the request is abandoned
            raise
        return SvdHandle(request_id, deadline_ms, future)

    # -- stored payloads ------------------------------------------------------------------------

    async def _store_request(
        self, request_id: str, message: EncodedMessage
    ) -> tuple[EncodedMessage, str]:
        """Put the binary request's value in the store; the request that references it."""
        assert self._store is not None
        try:
            stored = await self._store.write_async(f"requests/{request_id}", [message.value])
        except StoreError as exc:
            raise service_error(
                exc.code, f"the matrix could not be stored: {exc.message}",
                request_id=request_id, retryable=exc.retryable,
            ) from exc  # fmt: skip
        ref = ObjectRef(url=stored.url, nbytes=stored.nbytes, sha256=stored.sha256)
        return codec.to_stored(message, ref), stored.url

    def _forget_stored(self, url: str | None) -> None:
        """A stored request that was not sent: its object is nobody's, delete it."""
        if url is not None and self._store is not None:
            self._background(self._store.delete_async(url), f"delete {url[:80]}")

    def _background(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._store_tasks.add(task)
        task.add_done_callback(self._store_task_done)
        return task

    def _store_task_done(self, task: asyncio.Task[Any]) -> None:
        self._store_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("%s failed: %r", task.get_name(), exc)

    def _resolve_reply(self, request_id: str, outcome: SvdResult | SvdError | StoredResult) -> None:
        """Resolve a pending request; a stored result first has its factors fetched."""
        pending = self._pending
        if pending is None:
            return
        if not isinstance(outcome, StoredResult):
            pending.resolve(request_id, outcome)
            return

        async def fetch() -> None:
            fetched = await _wire.fetch_stored(
                self._store, outcome, delete=self.settings.delete_fetched_results
            )
            if self._pending is not None:
                self._pending.resolve(request_id, fetched)

        self._background(fetch(), f"fetch {request_id}")

    @overload
    async def svd_many(
        self,
        matrices: Iterable[npt.ArrayLike],
        *,
        concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
        **options: Any,
    ) -> list[SvdResult]: ...

    @overload
    async def svd_many(
        self,
        matrices: Iterable[npt.ArrayLike],
        *,
        concurrency: int | None = ...,
        return_exceptions: Literal[True],
        **options: Any,
    ) -> list[SvdResult | SvdError]: ...

    async def svd_many(
        self,
        matrices: Iterable[npt.ArrayLike],
        *,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        **options: Any,
    ) -> list[SvdResult] | list[SvdResult | SvdError]:
        """SVDs of many matrices, at most ``concurrency`` in flight; results in input order.

        ``options`` are those of ``svd()``; each request's timeout starts when it is sent. The
        input is iterated lazily. On the first error (unless ``return_exceptions``) the requests
        still in flight are abandoned and that error is raised.
        """
        return await run_batch(
            self.svd,
            matrices,
            concurrency or self.settings.batch_concurrency,
            return_exceptions,
            options,
        )


def check_size(message: EncodedMessage, max_bytes: int, request_id: str) -> None:
    size = len(message.value) + len(message.key) + sum(len(k) + len(v) for k, v in message.headers)
    if size > max_bytes:
        raise SvdInvalidRequest(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"the request is {size} bytes; the limit is {max_bytes}",
            request_id=request_id,
            retryable=False,
        )


async def run_batch(
    call: Callable[..., Awaitable[SvdResult]],
    matrices: Iterable[npt.ArrayLike],
    concurrency: int,
    return_exceptions: bool,
    options: dict[str, Any],
) -> list[Any]:
    """Bounded-concurrency map of ``call`` over ``matrices``, results in input order."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    results: dict[int, SvdResult | SvdError] = {}
    items = enumerate(matrices)

    async def worker() -> None:
        # One shared iterator: next() runs between awaits, so no two workers take the same item.
        for index, matrix in items:
            try:
                results[index] = await call(matrix, **options)
            except SvdError as exc:
                if not return_exceptions:
                    raise
                results[index] = exc

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [results[i] for i in range(len(results))]
