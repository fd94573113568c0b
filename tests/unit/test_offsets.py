"""The commit position never passes a request that is not answered, whatever the finish order."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from consumer.offsets import OffsetTracker

TP = TopicPartition("svd-requests", 0)


def test_out_of_order_completion_commits_only_the_done_prefix() -> None:
    tracker = OffsetTracker()
    ledger = tracker.ledger(TP)
    for offset in (10, 11, 12, 13):
        ledger.begin(offset)
    assert tracker.to_commit() == {TP: 10}
    ledger.finish(12)
    ledger.finish(11)
    assert tracker.to_commit() == {TP: 10}  # 10 still running: 11 and 12 must wait
    ledger.finish(10)
    assert tracker.to_commit() == {TP: 13}
    tracker.committed({TP: 13})
    assert tracker.to_commit() == {}
    ledger.finish(13)
    assert tracker.to_commit() == {TP: 14}


def test_gaps_in_offsets_are_not_waited_for() -> None:
    tracker = OffsetTracker()
    ledger = tracker.ledger(TP)
    ledger.begin(5)
    ledger.begin(9)  # 6..8 compacted away or transaction markers
    ledger.finish(9)
    ledger.finish(5)
    assert tracker.to_commit() == {TP: 10}


def test_a_revoked_ledger_cannot_move_the_new_owners_position() -> None:
    tracker = OffsetTracker()
    old = tracker.ledger(TP)
    old.begin(0)
    tracker.revoke([TP])
    new = tracker.ledger(TP)
    new.begin(0)
    old.finish(0)  # a late result of the previous assignment
    assert tracker.to_commit() == {TP: 0}
    assert new.in_flight == 1


@given(st.permutations(list(range(30))), st.integers(min_value=0, max_value=30))
def test_position_is_the_oldest_unfinished(order: list[int], finished: int) -> None:
    tracker = OffsetTracker()
    ledger = tracker.ledger(TP)
    for offset in range(30):
        ledger.begin(100 + offset)
    done = set(order[:finished])
    for offset in order[:finished]:
        ledger.finish(100 + offset)
    unfinished = [o for o in range(30) if o not in done]
    expected = 100 + (unfinished[0] if unfinished else 30)
    assert ledger.commit_position() == expected
