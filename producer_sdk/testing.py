"""An in-memory stand-in for AsyncSvdClient, for unit-testing apps without Kafka.

``FakeSvdClient`` is the real client with the transport swapped: the same input checks, the same
pending table (timeouts, ``max_pending`` backpressure, cancellation), the same codec on both legs.
Where the real client sends a record to Kafka, the fake hands it to an in-process "service" that
decodes it with the service's limits, honours its deadline, computes with numpy and encodes the
answer, which is decoded exactly as a Kafka reply would be. tests/sdk_contract runs one suite
against both.

Test controls: ``latency`` (seconds before each answer), ``pause()``/``resume()`` (hold answers,
e.g. to force a timeout), ``fail_next(code)`` (answer the next request with an error result),
``duplicate_answers`` (deliver every answer twice, as at-least-once redelivery can), and
``requests`` (the metadata of the last requests received).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import deque
from typing import Any

import numpy as np

from producer_sdk import _wire
from producer_sdk._base import BaseSvdClient, Outgoing
from producer_sdk.settings import ClientSettings
from schemas import codec
from schemas.errors import ContractError, ErrorCode, SvdServiceError
from schemas.limits import DecodeLimits
from schemas.models import ErrorResult, SvdRequestMeta, SvdResultMeta, Timings, WorkerInfo

__all__ = ["FakeSvdClient"]

_FAKE_BOOTSTRAP = "fake:0"


class FakeSvdClient(BaseSvdClient):
    """Same API and errors as AsyncSvdClient; no Kafka. Not thread-safe (one event loop)."""

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        limits: DecodeLimits | None = None,
        latency: float = 0.0,
        duplicate_answers: bool = False,
        keep_requests: int = 1000,
        **overrides: Any,
    ) -> None:
        if settings is None and "bootstrap_servers" not in overrides:
            overrides["bootstrap_servers"] = _FAKE_BOOTSTRAP
        super().__init__(settings, **overrides)
        self.limits = limits or DecodeLimits()
        self.latency = latency
        self.duplicate_answers = duplicate_answers
        self.requests: deque[SvdRequestMeta] = deque(maxlen=keep_requests)
        self._injected: deque[SvdServiceError] = deque()
        self._running = asyncio.Event()
        self._running.set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- test controls --------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold every answer until ``resume()``; requests still time out on their deadline."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def fail_next(
        self,
        code: ErrorCode,
        message: str = "injected by FakeSvdClient",
        *,
        retryable: bool | None = None,
    ) -> None:
        """Answer the next request (whatever it is) with this error result."""
        self._injected.append(SvdServiceError(code, message, retryable=retryable))

    # -- transport ------------------------------------------------------------------------------

    async def _connect(self) -> None:
        return None

    async def _disconnect(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _transmit(self, request: Outgoing) -> None:
        task = asyncio.create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: Outgoing) -> None:
        received_ms = time.time() * 1000
        if self.latency > 0:
            await asyncio.sleep(self.latency)  # the service's simulated queueing and compute
        await self._running.wait()
        injected = self._injected.popleft() if self._injected else None
        reply = await asyncio.to_thread(self._answer, request.message, received_ms, injected)
        for _ in range(2 if self.duplicate_answers else 1):
            if self._pending is None:
                return
            outcome = _wire.decode_answer(reply.value, reply.headers, request.request_id)
            self._resolve_reply(request.request_id, outcome)

    # -- the service's side ---------------------------------------------------------------------

    def _answer(
        self, message: codec.EncodedMessage, received_ms: float, injected: SvdServiceError | None
    ) -> codec.EncodedMessage:
        try:
            decoded = codec.decode_request(message.value, message.headers, self.limits)
        except ContractError as err:
            request_id = err.request_id or codec.recover_request_id(message.value, message.headers)
            return codec.encode_error(ErrorResult.from_exception(err, request_id=request_id))
        meta = decoded.meta
        self.requests.append(meta)
        if decoded.stored is not None:  # read from the client's own store, as the service would
            ref = decoded.stored
            try:
                if self._store is None:
                    raise ContractError(ErrorCode.UNTRUSTED_REFERENCE, "the fake has no store")
                data = self._store.read(ref.url, ref.nbytes, ref.sha256, meta.request_id)
                decoded = codec.load_stored_request(decoded, data, self.limits)
            except ContractError as err:
                return codec.encode_error(
                    ErrorResult.from_exception(err, request_id=meta.request_id)
                )
            self._store.delete(ref.url)
        error = injected
        if error is None and meta.deadline_ms is not None and _wire.now_ms() > meta.deadline_ms:
            error = SvdServiceError(ErrorCode.EXPIRED, f"deadline {meta.deadline_ms} ms passed")
        if error is not None:
            return codec.encode_error(
                ErrorResult.from_exception(
                    error, request_id=meta.request_id, correlation_id=meta.correlation_id
                )
            )
        started = time.time() * 1000
        try:
            matrix = decoded.matrix
            assert matrix is not None  # loaded above when stored
            dense = matrix if isinstance(matrix, np.ndarray) else matrix.toarray()
            u, s, vt = _svd(dense, meta)
        except np.linalg.LinAlgError as exc:
            failed = SvdServiceError(ErrorCode.SVD_FAILED, f"SVD did not converge: {exc}")
            return codec.encode_error(
                ErrorResult.from_exception(
                    failed, request_id=meta.request_id, correlation_id=meta.correlation_id
                )
            )
        done = time.time() * 1000
        result = SvdResultMeta(
            schema_version=meta.schema_version,
            request_id=meta.request_id,
            timings=Timings(
                queue_wait_ms=max(0.0, started - received_ms),
                compute_ms=done - started,
                total_ms=max(0.0, done - received_ms),
            ),
            worker=WorkerInfo(instance_id="fake", host=socket.gethostname(), pid=os.getpid()),
            algorithm="numpy.linalg.svd",
            correlation_id=meta.correlation_id,
        )
        return codec.encode_result(result, u, s, vt, decoded.reply_encoding)


def _svd(
    matrix: np.ndarray[Any, Any], meta: SvdRequestMeta
) -> tuple[np.ndarray[Any, Any] | None, np.ndarray[Any, Any], np.ndarray[Any, Any] | None]:
    a = matrix.astype(meta.compute_dtype)
    opts = meta.options
    if not opts.compute_uv:
        s = np.linalg.svd(a, compute_uv=False)
        return None, s[: opts.k] if opts.k else s, None
    u, s, vt = np.linalg.svd(a, full_matrices=opts.full_matrices)
    if opts.k:
        u, s, vt = u[:, : opts.k], s[: opts.k], vt[: opts.k]
    return u, s, vt
