"""Producer-named reply topics are checked before use, without asking the cluster per record."""

from __future__ import annotations

from consumer.reply_topics import ReplyTopics


class Cluster:
    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self.calls = 0

    async def list_topics(self) -> set[str]:
        self.calls += 1
        return set(self.topics)


async def test_existing_topics_pass_and_missing_ones_are_named() -> None:
    cluster = Cluster({"svd-results", "team-a.replies"})
    topics = ReplyTopics(cluster.list_topics)
    assert await topics.problem("team-a.replies") is None
    problem = await topics.problem("no-such-topic")
    assert problem is not None and "does not exist" in problem


async def test_a_flood_of_unknown_names_asks_the_cluster_once_per_refresh() -> None:
    cluster = Cluster({"svd-results"})
    topics = ReplyTopics(cluster.list_topics, refresh_s=3600)
    for i in range(100):
        assert await topics.problem(f"random-{i}") is not None
    assert cluster.calls == 1


async def test_a_topic_created_later_is_found_after_the_refresh_interval() -> None:
    cluster = Cluster(set())
    topics = ReplyTopics(cluster.list_topics, refresh_s=0.0)
    assert await topics.problem("later") is not None
    cluster.topics.add("later")
    assert await topics.problem("later") is None


async def test_the_pattern_is_enforced_before_any_lookup() -> None:
    cluster = Cluster({"other-team.private"})
    topics = ReplyTopics(cluster.list_topics, allowed=r"replies\..+")
    problem = await topics.problem("other-team.private")
    assert problem is not None and "not allowed" in problem
    assert cluster.calls == 0
