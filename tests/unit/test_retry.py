"""The one backoff policy: exponential growth up to a cap, and no surprise on a long outage."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.retry import Backoff

# Far past what a float power can hold, and past what an int can even be converted to.
HUGE_FAILURES = (10**6, 10**400)


def test_delays_start_at_first_and_double_up_to_the_cap() -> None:
    backoff = Backoff(first_s=0.5, max_s=30.0)
    assert list(itertools.islice(backoff.delays(), 9)) == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0,
    ]  # fmt: skip


def test_delay_counts_failures_from_one() -> None:
    backoff = Backoff(first_s=0.2, max_s=5.0)
    assert backoff.delay(1) == 0.2
    assert backoff.delay(2) == 0.4
    assert list(itertools.islice(backoff.delays(), 20)) == [backoff.delay(n) for n in range(1, 21)]


def test_factor_sets_the_growth() -> None:
    assert list(itertools.islice(Backoff(1.0, factor=3.0).delays(), 4)) == [1.0, 3.0, 9.0, 27.0]
    assert list(itertools.islice(Backoff(1.5, factor=1.0).delays(), 3)) == [1.5, 1.5, 1.5]


def test_without_a_cap_delays_keep_growing() -> None:
    backoff = Backoff(first_s=1.0)
    assert backoff.delay(11) == 1024.0
    assert backoff.delay(HUGE_FAILURES[0]) == math.inf


def test_a_first_delay_above_the_cap_is_capped() -> None:
    assert Backoff(first_s=10.0, max_s=1.0).delay(1) == 1.0


@given(
    first=st.floats(min_value=0.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=1000.0),
)
def test_same_series_as_the_hand_written_doubling_loops(first: float, cap: float) -> None:
    """The loops ``Backoff`` replaced: start at ``first``, then ``min(delay * 2, cap)``."""
    if first > cap:  # those loops slept the first delay uncapped; no caller configures that
        return
    expected, delay = [], first
    for _ in range(40):
        expected.append(delay)
        delay = min(delay * 2, cap)
    assert list(itertools.islice(Backoff(first, cap).delays(), 40)) == expected


@pytest.mark.parametrize("failures", HUGE_FAILURES)
def test_a_long_outage_neither_raises_nor_leaves_the_policy(failures: int) -> None:
    assert Backoff(first_s=0.5, max_s=30.0).delay(failures) == 30.0
    assert Backoff(first_s=1e-300, max_s=7.0).delay(failures) == 7.0
    assert Backoff(first_s=1e-300).delay(failures) == math.inf
    # Nothing grows here, so an overflowing power must not turn the delay into the cap.
    assert Backoff(first_s=0.0, max_s=5.0).delay(failures) == 0.0
    assert Backoff(first_s=0.2, max_s=5.0, factor=1.0).delay(failures) == 0.2


def test_growth_does_not_stop_at_a_fixed_number_of_failures() -> None:
    backoff = Backoff(first_s=1.0, max_s=10.0, factor=1.001)
    assert backoff.delay(1025) < 3.0
    assert backoff.delay(5000) == 10.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first_s": -0.1},
        {"first_s": 1.0, "max_s": -1.0},
        {"first_s": 1.0, "factor": 0.5},
        {"first_s": math.nan},
        {"first_s": 1.0, "max_s": math.nan},
        {"first_s": 1.0, "factor": math.nan},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="a backoff needs"):
        Backoff(**kwargs)


@pytest.mark.parametrize("failures", [0, -1])
def test_failures_count_from_one(failures: int) -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        Backoff(first_s=1.0).delay(failures)


def test_zero_is_a_valid_policy_for_tests() -> None:
    assert list(itertools.islice(Backoff(0.0, 0.0).delays(), 3)) == [0.0, 0.0, 0.0]


async def test_sleep_waits_the_delay_and_returns_it() -> None:
    backoff = Backoff(first_s=0.02, max_s=0.05)
    loop = asyncio.get_running_loop()
    since = loop.time()
    assert await backoff.sleep(2) == 0.04
    # The loop may run a timer up to its clock resolution early.
    assert loop.time() - since >= 0.04 - 0.001
    assert await backoff.sleep(9) == 0.05
