"""The pure rules of governed searches: limits by window, leases, and rate buckets."""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from mi2b2.domain.query_governance import (
    GUARD,
    PacerState,
    QueryLimits,
    grant_queries,
    job_held,
    may_open_association,
    pacing_for,
    query_limits_at,
    returned,
)
from mi2b2.domain.windows import GovernanceWindow
from support.proxy import most_within

NOON = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # a Monday
UTC_ZONE = ZoneInfo("UTC")


def test_limits_come_from_the_window_then_the_pacs_defaults() -> None:
    night = GovernanceWindow("night", frozenset(range(7)), time(19), time(7), max_concurrent_queries=8,
                             queries_per_second=100)
    day = GovernanceWindow("day", frozenset(range(7)), time(7), time(19))
    assert query_limits_at([night, day], NOON, UTC_ZONE, 2, 20) == QueryLimits("day", False, 2, 20)
    assert query_limits_at([night, day], NOON.replace(hour=23), UTC_ZONE, 2, 20) == QueryLimits("night", False, 8, 100)
    assert query_limits_at([], NOON, UTC_ZONE, 3, 0) == QueryLimits("default", False, 3, None)  # 0 = no rate cap
    outside = query_limits_at([night], NOON, UTC_ZONE, 2, 20)  # outside every listed window
    assert outside.closed and (outside.max_concurrent, outside.per_second) == (2, 20)


def test_a_closed_window_holds_jobs_not_small_searches_and_waiting_is_in_order() -> None:
    closed = GovernanceWindow("clinical", frozenset(range(7)), time(0), time(0), closed=True, queries_per_second=5)
    limits = query_limits_at([closed], NOON, UTC_ZONE, 2, 20)
    assert "clinical" in (job_held(limits) or "") and limits.per_second == 5
    assert may_open_association(limits, 0) is None
    open_ = QueryLimits("day", False, 2, 20)
    assert job_held(open_) is None
    assert may_open_association(open_, 1) is None
    assert may_open_association(open_, 2) is not None
    assert may_open_association(open_, 1, waiting_ahead=1) is not None  # someone asked first
    assert may_open_association(open_, 0, waiting_ahead=1) is None


@pytest.mark.parametrize("per_second", [0.5, 1, 2, 3, 8, 20, 57.5, 400, 5000])
def test_no_second_holds_more_than_the_rate_whatever_the_delays(per_second: float) -> None:
    """Four associations take grants and send each query at any moment its grant allows,
    then the query reaches the PACS up to GUARD later: no second there sees more than the rate."""
    rng = random.Random(per_second)
    limits = QueryLimits("day", False, 4, per_second)
    state = PacerState(None, 0)
    now = NOON + timedelta(microseconds=rng.randrange(1_000_000))
    arrivals: list[float] = []
    horizon = NOON + timedelta(seconds=30 if per_second >= 1 else 120)
    while now < horizon:
        grant, state = grant_queries(now, state, limits)
        assert grant.count >= 1 and grant.start < grant.deadline and grant.start >= now
        window = (grant.deadline - grant.start).total_seconds()
        for _ in range(grant.count):
            sent = grant.start + timedelta(seconds=rng.uniform(0, window))
            arrivals.append((sent + rng.uniform(0, 1) * GUARD - NOON).total_seconds())
        now = grant.start + timedelta(seconds=rng.uniform(0, window))
    allowed = max(1, int(per_second)) if per_second >= 1 else 1
    assert most_within(arrivals, 1.0) <= allowed
    if per_second < 1:
        assert most_within(arrivals, 1 / per_second) <= 1


@pytest.mark.parametrize("per_second", [3, 8, 20, 57.5, 400, 5000])
def test_the_buckets_use_most_of_the_rate(per_second: float) -> None:
    pacing = pacing_for(per_second)
    usable_rate = pacing.per_bucket / pacing.bucket.total_seconds()
    assert usable_rate <= per_second
    assert usable_rate >= (0.85 if per_second >= 20 else 0.3) * per_second


def test_slow_arrivals_of_a_whole_bucket_still_keep_the_rate() -> None:
    """A query held up on its way (scheduling, the network) for up to one bucket."""
    per_second = 20
    pacing = pacing_for(per_second)
    limits = QueryLimits("day", False, 2, per_second)
    state, now, arrivals = PacerState(None, 0), NOON, []
    rng = random.Random(7)
    while now < NOON + timedelta(seconds=20):
        grant, state = grant_queries(now, state, limits)
        for _ in range(grant.count):
            delay = pacing.bucket * rng.random()
            arrivals.append((grant.start + delay - NOON).total_seconds())
        now = grant.deadline
    assert most_within(arrivals, 1.0) <= per_second


def test_associations_share_a_bucket_and_unused_queries_are_given_back() -> None:
    limits = QueryLimits("day", False, 2, 400)
    pacing = pacing_for(400)
    first, state = grant_queries(NOON, PacerState(None, 0), limits)
    second, state = grant_queries(NOON, state, limits)
    assert first.bucket == second.bucket and first.count + second.count == pacing.per_bucket
    third, after = grant_queries(NOON, state, limits)
    assert third.bucket == first.bucket + 1 and third.start > NOON  # the bucket is full: wait for the next
    given_back = returned(state, second, 5, NOON)
    assert given_back.used == state.used - 5
    assert returned(after, second, 5, NOON) == after  # a later bucket was handed out: nothing to give back
    assert returned(state, second, 5, second.deadline) == state  # too late to use


def test_no_rate_means_large_grants_that_renew_the_lease() -> None:
    grant, state = grant_queries(NOON, PacerState(None, 0), QueryLimits("default", False, 2, None))
    assert grant.count >= 100 and grant.deadline > NOON and state == PacerState(None, 0)
