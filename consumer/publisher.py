"""Publishing answers: acks=all, retried until the broker acknowledges.

An answer that is not acknowledged is never counted as done, so its offset is never committed:
a crash before the acknowledgement redelivers the request instead of losing it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAuthorizationFailedError

from consumer.retry import Backoff
from schemas.codec import EncodedMessage
from schemas.errors import ErrorCode

log = logging.getLogger(__name__)


# Refusals retrying cannot help, and the code an answer refused so is given.
REFUSALS: dict[type[KafkaError], ErrorCode] = {
    MessageSizeTooLargeError: ErrorCode.LIMIT_EXCEEDED,
    TopicAuthorizationFailedError: ErrorCode.INVALID_SCHEMA,
}


def refusal_code(exc: BaseException) -> ErrorCode | None:
    """The error code for a refusal that is final (``REFUSALS``), or None when a retry may pass."""
    return next((code for kind, code in REFUSALS.items() if isinstance(exc, kind)), None)


class PublishRejected(Exception):
    """The broker refused the message for good (too large, or the topic is not ours to write);
    retrying cannot help."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class Publisher:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        on_retry: Callable[[], None] = lambda: None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._producer = producer
        self._on_retry = on_retry
        self._backoff = Backoff(backoff_s, max_backoff_s)

    async def publish(
        self, topic: str, message: EncodedMessage, *, context: dict[str, object]
    ) -> None:
        """Return once the broker has acknowledged ``message``; retry transient failures forever.

        Only cancellation (a hard stop) ends the retries; the request is then redelivered.
        """
        delays = self._backoff.delays()
        while True:
            try:
                ack = await self._producer.send(
                    topic, message.value, key=message.key, headers=message.headers
                )
                await ack
                return
            except KafkaError as exc:
                code = refusal_code(exc)
                if code is not None:
                    raise PublishRejected(
                        f"{topic} refused {len(message.value)} bytes: {exc!r}", code
                    ) from exc
                self._on_retry()
                delay = next(delays)
                log.warning(
                    "publish to %s failed (%r); retrying in %.1fs",
                    topic, exc, delay, extra=context,
                )  # fmt: skip
                await asyncio.sleep(delay)
