"""AsyncSvdClient: request-reply over Kafka for asyncio services.

One idempotent producer sends requests; one group-less reader, positioned before the first send,
reads the answers topic and resolves pending requests by id (the record key). Answers whose id is
not pending (other clients', duplicates, late ones) are dropped without being decoded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError

from producer_sdk import _wire
from producer_sdk._base import BaseSvdClient, ClientStats, Outgoing, SvdHandle
from producer_sdk._kafka import TopicMissing, TopicReader, topic_partitions
from producer_sdk._security import connect_failure_reason
from producer_sdk.errors import ClientClosed, SendFailed, SvdError
from producer_sdk.pending import PendingTable
from producer_sdk.result import SvdResult
from producer_sdk.settings import ClientSettings
from schemas.errors import ErrorCode
from schemas.headers import ReceivedHeaders

__all__ = ["AsyncSvdClient", "ClientStartError", "ClientStats", "SvdHandle"]

log = logging.getLogger("producer_sdk")

_FETCH_TIMEOUT_S = 0.5
_READ_RETRY_S = 1.0


class ClientStartError(SvdError):
    """The client could not connect, or a topic it needs does not exist."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        # retryable=False: no connection could be made (credentials, certificates, address);
        # starting again with the same settings fails the same way.
        super().__init__(ErrorCode.INTERNAL, message, retryable=retryable)


class AsyncSvdClient(BaseSvdClient):
    """``async with AsyncSvdClient(bootstrap_servers=...) as client: await client.svd(a)``.

    Settings: a ``ClientSettings``, keyword overrides, or both; unset fields come from
    ``SVD_CLIENT_*`` environment variables.
    """

    def __init__(self, settings: ClientSettings | None = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self._producer: AIOKafkaProducer | None = None
        self._reader: TopicReader | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def _connect(self) -> None:
        s = self.settings
        try:
            async with asyncio.timeout(s.start_timeout_s):
                self._producer = AIOKafkaProducer(
                    bootstrap_servers=s.bootstrap_servers,
                    client_id=f"{s.client_id}-producer",
                    acks="all",
                    enable_idempotence=True,
                    max_request_size=s.max_message_bytes,
                    linger_ms=round(s.linger_s * 1000),
                    max_batch_size=s.batch_bytes,
                    **s.kafka_security(),
                )
                await self._producer.start()
                create = s.reply_topic_partitions if s.create_reply_topic else None
                partitions = await topic_partitions(s, s.answers_topic, create_partitions=create)
                self._reader = TopicReader(s, s.answers_topic, client_suffix="replies")
                await self._reader.start(partitions, "end")
        except TimeoutError as exc:
            raise ClientStartError(
                f"could not start against {s.bootstrap_servers} within {s.start_timeout_s}s"
            ) from exc
        except KafkaConnectionError as exc:
            # aiokafka only logs why; one more connection tells (docs/security.md).
            reason = await connect_failure_reason(s.bootstrap_servers, s.kafka_security())
            raise ClientStartError(
                f"cannot connect to Kafka at {s.bootstrap_servers} over "
                f"{s.describe_security()}: {reason or exc}",
                retryable=False,
            ) from exc
        except (KafkaError, OSError, TopicMissing) as exc:
            raise ClientStartError(f"could not start: {exc!r}") from exc
        self._reader_task = asyncio.create_task(self._read(), name=f"{s.client_id}-replies")

    async def _disconnect(self) -> None:
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        producer, self._producer = self._producer, None
        reader, self._reader = self._reader, None
        if producer is not None:
            await producer.stop()
        if reader is not None:
            await reader.stop()

    async def _transmit(self, request: Outgoing) -> None:
        assert self._producer is not None
        message = request.message
        try:
            # Returns once the record is in the producer's buffer; the broker's ack comes later.
            ack = await self._producer.send(
                self.settings.requests_topic,
                message.value,
                key=message.key,
                headers=message.headers,
            )
        except KafkaError as exc:
            raise _send_error(exc, request.request_id) from exc
        ack.add_done_callback(
            lambda acked: self._on_ack(request.request_id, acked, request.stored_url)
        )

    def _on_ack(
        self, request_id: str, acked: asyncio.Future[Any], stored_url: str | None = None
    ) -> None:
        if acked.cancelled() or acked.exception() is not None:
            self._forget_stored(stored_url)  # not sent: nobody will read or delete it
        pending = self._pending
        if pending is None or request_id not in pending:
            return
        if acked.cancelled():
            pending.fail(request_id, ClientClosed("closed before the request was sent"))
        elif isinstance(exc := acked.exception(), KafkaError):
            pending.fail(request_id, _send_error(exc, request_id))
        elif exc is not None:
            pending.fail(
                request_id, SendFailed(ErrorCode.INTERNAL, repr(exc), request_id=request_id)
            )

    async def _read(self) -> None:
        assert self._reader is not None and self._pending is not None
        reader, pending = self._reader, self._pending
        try:
            while True:
                try:
                    records = await reader.fetch(_FETCH_TIMEOUT_S)
                except KafkaError as exc:
                    log.warning(
                        "reading %s failed (%r); retrying", self.settings.answers_topic, exc
                    )
                    await asyncio.sleep(_READ_RETRY_S)
                    continue
                for record in records:
                    await self._on_reply(pending, record.key, record.value, record.headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A dead reader would leave every request to time out; fail them all now instead.
            log.exception("the reply reader failed; the client is unusable")
            self._break(f"the reply reader failed: {exc!r}")

    async def _on_reply(
        self,
        pending: PendingTable[SvdResult],
        key: bytes | None,
        value: bytes | None,
        headers: ReceivedHeaders,
    ) -> None:
        try:
            request_id = key.decode("ascii") if key else ""
        except UnicodeDecodeError:
            request_id = ""
        if request_id not in pending:
            # Never decoded: on the shared topic most answers are other clients'.
            pending.classify(request_id)
            return
        body = value or b""
        if len(body) > self.settings.offload_bytes:
            outcome = await asyncio.to_thread(_wire.decode_answer, body, headers, request_id)
        else:
            outcome = _wire.decode_answer(body, headers, request_id)
        self._resolve_reply(request_id, outcome)


def _send_error(exc: KafkaError, request_id: str) -> SendFailed:
    if isinstance(exc, MessageSizeTooLargeError):
        return SendFailed(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"Kafka refused the request: {exc!r}",
            request_id=request_id,
            retryable=False,
        )
    return SendFailed(
        ErrorCode.INTERNAL,
        f"Kafka did not take the request: {exc!r}",
        request_id=request_id,
        retryable=True,
    )
