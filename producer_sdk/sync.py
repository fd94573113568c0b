"""SvdClient: the async client for code without an event loop (scripts, Django, Gunicorn sync
workers).

One private event loop in one daemon thread runs one AsyncSvdClient; any number of threads call
into it. Nothing connects until the first call (or ``start()``), so a client made at import time
in a pre-forking server's master costs nothing there; one started before a fork refuses to be
used in the child, which must make its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Literal, TypeVar, overload

import numpy.typing as npt

from producer_sdk._base import BaseSvdClient, ClientStats
from producer_sdk.client import AsyncSvdClient
from producer_sdk.errors import ClientClosed, SvdError, SvdTimeout
from producer_sdk.result import SvdResult
from producer_sdk.settings import ClientSettings
from schemas.headers import Encoding

T = TypeVar("T")

# Extra wait beyond a call's own timeout before giving up on the loop thread itself; the call
# normally ends at its timeout, inside the loop.
_GRACE_S = 30.0


class SvdClient:
    """Thread-safe, blocking SVD client. ``with SvdClient(...) as client: client.svd(a)``."""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        client_factory: Callable[[ClientSettings], BaseSvdClient] = AsyncSvdClient,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = ClientSettings(**overrides)
        elif overrides:
            settings = ClientSettings(**{**settings.model_dump(), **overrides})
        self.settings = settings
        self._factory = client_factory
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: BaseSvdClient | None = None
        self._pid: int | None = None
        self._closed = False
        self._finalizer: weakref.finalize[Any, SvdClient] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> SvdClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> SvdClient:
        """Connect now rather than on the first call. Idempotent."""
        self._running()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Fail pending requests with ClientClosed, disconnect and end the thread. Idempotent."""
        with self._lock:
            self._closed = True
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and self._pid == os.getpid():
            finalizer()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> ClientStats:
        client = self._client
        return client.stats() if client is not None else ClientStats(0, 0, 0, 0, 0, 0, 0, 0, 0)

    def _running(self) -> tuple[asyncio.AbstractEventLoop, BaseSvdClient]:
        with self._lock:
            if self._closed:
                raise ClientClosed()
            if self._pid is not None and self._pid != os.getpid():
                raise RuntimeError(
                    "this SvdClient was started in another process (before a fork); "
                    "create one per process, after forking"
                )
            if self._loop is not None and self._client is not None:
                return self._loop, self._client
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name=f"{self.settings.client_id}-loop", daemon=True
            )
            thread.start()
            client = self._factory(self.settings)
            started = asyncio.run_coroutine_threadsafe(client.start(), loop)
            try:
                started.result(self.settings.start_timeout_s + _GRACE_S)
            except BaseException:
                started.cancel()
                _shutdown(loop, thread, None)
                raise
            self._loop, self._thread, self._client = loop, thread, client
            self._pid = os.getpid()
            # Closes the client at interpreter exit too, so buffered requests are flushed.
            self._finalizer = weakref.finalize(self, _shutdown, loop, thread, client)
            return loop, client

    def _call(self, make: Callable[[BaseSvdClient], Coroutine[Any, Any, T]], wait_s: float) -> T:
        loop, client = self._running()
        if threading.current_thread() is self._thread:
            raise RuntimeError("SvdClient called from its own event loop thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(make(client), loop)
        try:
            return future.result(wait_s + _GRACE_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise SvdTimeout("the client's event loop did not answer in time") from None
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: abandon the request, not the thread
            raise

    def _timeout(self, timeout: float | None) -> float:
        return self.settings.default_timeout_s if timeout is None else timeout

    # -- requests -------------------------------------------------------------------------------

    def svd(
        self,
        matrix: npt.ArrayLike,
        *,
        k: int | None = None,
        full_matrices: bool = False,
        compute_uv: bool = True,
        timeout: float | None = None,
        encoding: Encoding | None = None,
        correlation_id: str | None = None,
    ) -> SvdResult:
        """The SVD of ``matrix``; blocks until the answer or the timeout. Raises SvdError."""
        return self._call(
            lambda c: c.svd(
                matrix,
                k=k,
                full_matrices=full_matrices,
                compute_uv=compute_uv,
                timeout=timeout,
                encoding=encoding,
                correlation_id=correlation_id,
            ),
            self._timeout(timeout),
        )

    def submit(
        self,
        matrix: npt.ArrayLike,
        *,
        k: int | None = None,
        full_matrices: bool = False,
        compute_uv: bool = True,
        timeout: float | None = None,
        encoding: Encoding | None = None,
        correlation_id: str | None = None,
    ) -> concurrent.futures.Future[SvdResult]:
        """Send a request; return a Future of its result.

        Blocks only until the request is admitted (a free slot among ``max_pending``), so a loop
        of submits cannot queue without bound. Cancelling the Future abandons the request.
        """
        handle = self._call(
            lambda c: c.submit(
                matrix,
                k=k,
                full_matrices=full_matrices,
                compute_uv=compute_uv,
                timeout=timeout,
                encoding=encoding,
                correlation_id=correlation_id,
            ),
            self._timeout(timeout),
        )
        loop, _ = self._running()
        out: concurrent.futures.Future[SvdResult] = concurrent.futures.Future()

        def copy(done: asyncio.Future[SvdResult]) -> None:
            if not out.set_running_or_notify_cancel():
                return
            if done.cancelled():
                out.set_exception(ClientClosed("abandoned", request_id=handle.request_id))
            elif (exc := done.exception()) is not None:
                out.set_exception(exc)
            else:
                out.set_result(done.result())

        def abandon(f: concurrent.futures.Future[SvdResult]) -> None:
            if f.cancelled():
                loop.call_soon_threadsafe(handle.cancel)

        loop.call_soon_threadsafe(handle.add_done_callback, copy)
        out.add_done_callback(abandon)
        return out

    @overload
    def svd_many(
        self,
        matrices: Iterable[npt.ArrayLike],
        *,
        concurrency: int | None = ...,
        return_exceptions: Literal[False] = ...,
        **options: Any,
    ) -> list[SvdResult]: ...

    @overload
    def svd_many(
        self,
        matrices: Iterable[npt.ArrayLike],
        *,
        concurrency: int | None = ...,
        return_exceptions: Literal[True],
        **options: Any,
    ) -> list[SvdResult | SvdError]: ...

    def svd_many(
        self,
        matrices: Iterable[npt.ArrayLike],
        *,
        concurrency: int | None = None,
        return_exceptions: bool = False,
        **options: Any,
    ) -> list[SvdResult] | list[SvdResult | SvdError]:
        """Like AsyncSvdClient.svd_many; the input is materialised first (it crosses threads)."""
        items = list(matrices)
        per_request = self._timeout(options.get("timeout"))
        concurrent_n = concurrency or self.settings.batch_concurrency
        rounds = -(-len(items) // max(1, concurrent_n))
        result: list[Any] = self._call(
            lambda c: c.svd_many(
                items,
                concurrency=concurrency,
                return_exceptions=return_exceptions,  # type: ignore[call-overload]
                **options,
            ),
            per_request * max(1, rounds),
        )
        return result


def _shutdown(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: BaseSvdClient | None
) -> None:
    if loop.is_closed():
        return
    if client is not None and thread.is_alive():
        closing = asyncio.run_coroutine_threadsafe(client.close(), loop)
        try:
            closing.result(_GRACE_S)
        except Exception:
            closing.cancel()
    if thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_GRACE_S)
    if not thread.is_alive():
        loop.close()
