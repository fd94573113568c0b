"""Reply topics are named by producers the service does not control: check them before use.

The service writes answers with its own credentials, so a reply topic is an order to write
wherever the request says. Allowed: the results topic, and names matching the reply-topic
pattern in full (by default ``<results topic>.<suffix>``, e.g. ``svd-results.web-1``: a
namespace operators grant, so one tenant cannot have answers written into another's topics).
Refused whatever the pattern: the requests topic (an answer there would come back as a
request), the dead-letter topic (an answer among the dead letters) and internal topics
(``__consumer_offsets``, ``__transaction_state``, any name starting with ``_``).

Publishing to a topic that does not exist (or that a pattern forbids) would otherwise be
retried forever, holding the request's in-flight slot and its partition's commit position; a
handful of such records would stall the service. A request whose reply topic is unusable is
answered on the default results topic with an error result and a dead letter instead.

Existence comes from a snapshot of the cluster's metadata, refreshed at most every
``refresh_s`` when an unknown name shows up. It deliberately does not go through the
producer's own metadata lookup, which would add every name it is asked about to the topics
the producer tracks forever.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from consumer.settings import ConsumerSettings

# Stands for the results topic (regex-escaped) in SVD_REPLY_TOPIC_PATTERN, so the default,
# `{results_topic}\..+`, follows a renamed results topic.
RESULTS_TOPIC = "{results_topic}"


class ReplyTopics:
    def __init__(
        self,
        list_topics: Callable[[], Awaitable[set[str]]],
        *,
        allowed: str,
        results: str | None = None,
        refused: Collection[str] = (),
        refresh_s: float = 10.0,
    ) -> None:
        """``allowed``: a regex other names must match in full; ``results``: always allowed;
        ``refused``: never allowed, nor are internal topics, whatever ``allowed`` says."""
        self._list_topics = list_topics
        self._allowed = re.compile(allowed)
        self._results = results
        self._refused = frozenset(refused)
        self._refresh_s = refresh_s
        self._known: set[str] = set()
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(
        cls, settings: ConsumerSettings, list_topics: Callable[[], Awaitable[set[str]]]
    ) -> ReplyTopics:
        results = settings.results_topic
        return cls(
            list_topics,
            allowed=settings.reply_topic_pattern.replace(RESULTS_TOPIC, re.escape(results)),
            results=results,
            refused=(settings.requests_topic, settings.dlq_topic),
        )

    async def problem(self, topic: str) -> str | None:
        """Why ``topic`` cannot take answers, or None when it can."""
        if topic == self._results:
            return None
        if topic in self._refused or topic.startswith("_"):
            return (
                f"reply_topic {topic!r} is not allowed: answers never go to the requests, "
                "dead-letter or internal topics"
            )
        if not self._allowed.fullmatch(topic):
            results = f"be {self._results!r} or " if self._results else ""
            return (
                f"reply_topic {topic!r} is not allowed here: it must {results}match the "
                f"regex {self._allowed.pattern}"
            )
        if topic not in self._known:
            await self._refresh()
        if topic not in self._known:
            return f"reply_topic {topic!r} does not exist"
        return None

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < self._refresh_s:
                return  # a snapshot this recent already said no; don't ask the cluster per record
            self._known = await self._list_topics()
            self._fetched_at = time.monotonic()
