"""Reply topics are named by producers the service does not control: check them before use.

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
from collections.abc import Awaitable, Callable


class ReplyTopics:
    def __init__(
        self,
        list_topics: Callable[[], Awaitable[set[str]]],
        *,
        allowed: str = ".*",
        refresh_s: float = 10.0,
    ) -> None:
        self._list_topics = list_topics
        self._allowed = re.compile(allowed)
        self._refresh_s = refresh_s
        self._known: set[str] = set()
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def problem(self, topic: str) -> str | None:
        """Why ``topic`` cannot take answers, or None when it can."""
        if not self._allowed.fullmatch(topic):
            return f"reply_topic {topic!r} is not allowed here (it must match {self._allowed.pattern!r})"
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
