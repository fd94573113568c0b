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

Existence comes from a snapshot of the cluster's topic list. A name is refused only by a
snapshot taken after it was asked about: its producer created the topic before sending the
request, so such a snapshot has it. (With a snapshot that could be seconds old, a reply topic
created just before its first request was answered "does not exist" on the results topic, where
its requester never looks.) Snapshots are taken at most every ``refresh_s``; checks waiting
meanwhile share the next one, so a flood of unknown names costs one listing per interval. It
deliberately does not go through the producer's own metadata lookup, which would add every
name it is asked about to the topics the producer tracks forever.
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
        refresh_s: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``allowed``: a regex other names must match in full; ``results``: always allowed;
        ``refused``: never allowed, nor are internal topics, whatever ``allowed`` says."""
        self._list_topics = list_topics
        self._allowed = re.compile(allowed)
        self._results = results
        self._refused = frozenset(refused)
        self._refresh_s = refresh_s
        self._sleep = sleep
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
            await self._snapshot_since(time.monotonic())
        if topic not in self._known:
            return f"reply_topic {topic!r} does not exist"
        return None

    async def _snapshot_since(self, asked: float) -> None:
        """Make ``_known`` a listing started after ``asked``, at most one every ``refresh_s``."""
        async with self._lock:
            if self._fetched_at >= asked:
                return  # taken while this check waited for the lock: it answers it
            wait = self._fetched_at + self._refresh_s - time.monotonic()
            if wait > 0:
                await self._sleep(wait)
            started = time.monotonic()
            self._known = await self._list_topics()
            self._fetched_at = started
