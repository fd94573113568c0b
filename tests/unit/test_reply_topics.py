"""Producer-named reply topics are checked before use, without asking the cluster per record:
answers go to the results topic or its ``<results>.<suffix>`` namespace, never to the
requests, dead-letter or internal topics."""

from __future__ import annotations

import asyncio

import pytest

from consumer.reply_topics import ReplyTopics
from consumer.settings import ConsumerSettings

INTERNAL = ("__consumer_offsets", "__transaction_state", "_schemas")


class Cluster:
    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self.calls = 0

    async def list_topics(self) -> set[str]:
        self.calls += 1
        await asyncio.sleep(0)  # a round trip: other checks run meanwhile
        return set(self.topics)


def everything(**settings: str) -> Cluster:
    """A cluster holding every topic the tests name, so only the rules can refuse one."""
    s = ConsumerSettings(**settings)
    named = {"svd-requests", "svd-dlq", "svd-results.web-1", "replies.web-1", *INTERNAL}
    mine = {s.requests_topic, s.results_topic, s.dlq_topic, f"{s.results_topic}.web-1"}
    return Cluster(named | mine | {"other-team.private"})


def service(cluster: Cluster, **settings: str) -> ReplyTopics:
    return ReplyTopics.from_settings(ConsumerSettings(**settings), cluster.list_topics)


async def test_the_results_topic_and_its_dotted_names_are_allowed_by_default() -> None:
    cluster = everything()
    topics = service(cluster)
    assert await topics.problem("svd-results") is None
    assert await topics.problem("svd-results.web-1") is None


async def test_the_default_follows_a_renamed_results_topic() -> None:
    cluster = everything(results_topic="team.answers")
    topics = service(cluster, results_topic="team.answers")
    assert await topics.problem("team.answers") is None
    assert await topics.problem("team.answers.web-1") is None
    # The dot in the name is literal, not "any character".
    assert await topics.problem("team-answers.web-1") is not None
    assert await topics.problem("svd-results.web-1") is not None


@pytest.mark.parametrize(
    "topic",
    [
        "other-team.private",
        "svd-results.",
        "svd-results-web-1",
        "svd-resultsX.web-1",
        "x.svd-results.a",
    ],
)
async def test_other_names_are_refused_without_asking_the_cluster(topic: str) -> None:
    cluster = everything()
    topics = service(cluster)
    problem = await topics.problem(topic)
    assert problem is not None and "not allowed" in problem
    assert cluster.calls == 0


@pytest.mark.parametrize("pattern", [".*", r"{results_topic}\..+|svd-.*|_.*"])
@pytest.mark.parametrize("topic", ["svd-requests", "svd-dlq", *INTERNAL])
async def test_requests_dlq_and_internal_topics_are_refused_whatever_the_pattern(
    pattern: str, topic: str
) -> None:
    cluster = everything()
    topics = service(cluster, reply_topic_pattern=pattern)
    problem = await topics.problem(topic)
    assert problem is not None and "never go to the requests, dead-letter or internal" in problem
    assert cluster.calls == 0


async def test_renamed_requests_and_dlq_topics_are_the_ones_refused() -> None:
    names = {"requests_topic": "jobs.in", "dlq_topic": "jobs.dead", "results_topic": "jobs"}
    cluster = everything(**names)
    topics = service(cluster, reply_topic_pattern=".*", **names)
    assert await topics.problem("jobs.in") is not None
    assert await topics.problem("jobs.dead") is not None
    assert await topics.problem("svd-requests") is None  # someone else's topic of that name


async def test_a_widened_pattern_allows_more_names() -> None:
    cluster = everything()
    topics = service(cluster, reply_topic_pattern=r"{results_topic}\..+|replies\..+")
    assert await topics.problem("replies.web-1") is None
    assert await topics.problem("svd-results.web-1") is None
    assert await topics.problem("other-team.private") is not None


async def test_an_empty_pattern_allows_the_results_topic_only() -> None:
    cluster = everything()
    topics = service(cluster, reply_topic_pattern="")
    assert await topics.problem("svd-results") is None
    assert await topics.problem("svd-results.web-1") is not None


async def test_allowed_names_that_do_not_exist_are_refused() -> None:
    cluster = Cluster({"svd-results", "svd-results.web-1"})
    topics = service(cluster)
    assert await topics.problem("svd-results.web-1") is None
    problem = await topics.problem("svd-results.no-such-topic")
    assert problem is not None and "does not exist" in problem


async def test_a_flood_of_unknown_names_shares_one_listing() -> None:
    cluster = Cluster({"svd-results"})
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    topics = ReplyTopics(cluster.list_topics, allowed=".*", refresh_s=3600, sleep=sleep)
    problems = await asyncio.gather(*(topics.problem(f"random-{i}") for i in range(100)))
    assert all(p is not None and "does not exist" in p for p in problems)
    # The first check's listing, then one for the 99 asked while it was under way.
    assert cluster.calls == 2 and len(waits) == 1


async def test_unknown_names_one_after_another_ask_at_most_once_per_interval() -> None:
    cluster = Cluster({"svd-results"})
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)  # no real wait: the listing right after it stands for it

    topics = ReplyTopics(cluster.list_topics, allowed=".*", refresh_s=5.0, sleep=sleep)
    for i in range(4):
        assert await topics.problem(f"random-{i}") is not None
    assert cluster.calls == 4
    assert len(waits) == 3 and all(4.0 < w <= 5.0 for w in waits), waits


async def test_a_topic_created_just_before_its_first_request_is_found() -> None:
    # The race of issue #19: the SDK creates its reply topic, then sends; a snapshot taken a
    # moment before the creation must not answer "does not exist".
    cluster = Cluster({"svd-results"})
    topics = ReplyTopics(cluster.list_topics, allowed=".*", refresh_s=0.0)
    assert await topics.problem("other") is not None  # a snapshot is taken now
    cluster.topics.add("svd-results.web-7")  # created after it
    assert await topics.problem("svd-results.web-7") is None
    assert await topics.problem("svd-results.web-7") is None  # known now: no listing
    assert cluster.calls == 2


def test_a_pattern_that_is_no_regex_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="reply_topic_pattern is not a valid regex"):
        ConsumerSettings(reply_topic_pattern="svd-results.(")
