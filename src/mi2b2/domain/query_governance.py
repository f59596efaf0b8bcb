"""How hard searches may use a PACS: query associations at once, C-FINDs per second.

Pure rules; the query governor (services/query_governor.py) reads the shared
counters from the database under a lock, asks these functions, and writes the
answer back in the same transaction, so every user, worker and server process
holds one budget per PACS.

* Concurrency: each open query association holds a **lease** (a database row
  with an expiry, renewed while it is used). A process killed mid-search stops
  renewing; its slot comes back when the lease expires, or at once when a
  process on the same host sees that its pid is gone. Searches waiting for a
  lease are served in the order they asked.
* Rate: time is cut into **buckets** (at most 20 a second) and each bucket may
  hold ``per_bucket`` queries, so few that any one second (which overlaps at
  most one bucket more than it holds), even with a query held up on the wire
  for a whole bucket, sees no more than ``queries_per_second``.
  Several associations share a bucket, so together they can use the whole rate
  even when one association alone is slower than it. A process takes a part of
  a bucket in one database round trip and spends it without asking again.
* A query is sent only in the first part of its bucket (``GUARD`` before its
  end), so that it reaches the PACS inside the same bucket: the promise holds
  at the PACS's end of the wire, not only on our side.
* A window that closes the PACS (or the time outside every listed window)
  holds **search jobs** until it opens: the window is the site's word that the
  PACS belongs to clinical work then, and a 20,000-MRN cohort is the last thing
  it wants. Interactive searches, and the one look-up a retrieval request needs
  before it is queued, still run then, within the query limits (the window's,
  or the PACS's defaults): a researcher can search and queue retrievals during
  the day, and the retrievals wait for the night.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from mi2b2.domain.windows import GovernanceWindow

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # buckets are counted from here, the same in every process
MAX_BUCKETS_PER_SECOND = 20
GUARD = timedelta(milliseconds=15)  # no query is sent this close to its bucket's end
LOW_RATE_USABLE = timedelta(milliseconds=100)
UNPACED_BATCH = 256  # queries per grant when no rate is set (the lease is renewed with each grant)
UNPACED_RENEWAL = timedelta(seconds=10)


@dataclass(frozen=True)
class QueryLimits:
    """What searches may do on one PACS now. ``per_second`` None means no rate cap."""

    window: str
    closed: bool
    max_concurrent: int
    per_second: float | None


def query_limits_at(
    windows: Sequence[GovernanceWindow], now: datetime, zone: ZoneInfo,
    default_max_concurrent: int, default_per_second: float,
) -> QueryLimits:
    """The first matching window wins, as for retrievals; a window that names no query
    limits takes the PACS's defaults; outside every listed window the PACS is closed."""
    default_rate = default_per_second or None  # 0 = no cap
    local = now.astimezone(zone)
    for window in windows:
        if window.contains(local):
            rate = window.queries_per_second if window.queries_per_second is not None else default_rate
            return QueryLimits(window.name or "window", window.closed,
                               window.max_concurrent_queries or default_max_concurrent, rate or None)
    if windows:
        return QueryLimits("outside all windows", True, default_max_concurrent, default_rate)
    return QueryLimits("default", False, default_max_concurrent, default_rate)


def may_open_association(limits: QueryLimits, open_now: int, waiting_ahead: int = 0) -> str | None:
    """None if one more query association may open now, else why it must wait.

    Searches are served in the order they asked: one that has others waiting
    ahead of it waits too, so a job that gives its association back between
    batches cannot take it again before an interactive search that was waiting."""
    if open_now >= limits.max_concurrent:
        return f"{open_now} query associations are open, the most this PACS allows now"
    if open_now + waiting_ahead >= limits.max_concurrent:
        return f"{waiting_ahead} searches are waiting ahead for this PACS's {limits.max_concurrent} query associations"
    return None


def job_held(limits: QueryLimits) -> str | None:
    """None if search jobs may run now, else why they wait."""
    if limits.closed:
        return (f"the PACS is closed now (governance window {limits.window!r}): search jobs wait until it opens; "
                "small searches still run")
    return None


@dataclass(frozen=True)
class Pacing:
    bucket: timedelta  # length of one bucket
    per_bucket: int  # queries one bucket may hold
    usable: timedelta  # queries are sent only in the first `usable` of their bucket


def pacing_for(per_second: float) -> Pacing:
    """Buckets for a rate. A half-open second overlaps at most m + 1 buckets of 1/m s;
    m + 2 buckets' worth of queries must fit in the rate, so that a query held up
    on its way to the PACS by as much as a whole bucket still cannot make any
    second there exceed the rate. Below 3 per second: one query per bucket, sent
    in its first LOW_RATE_USABLE, buckets so long that two queries are always more
    than a second (or 1/rate) and LOW_RATE_USABLE apart."""
    if per_second >= 3:
        # As many buckets as use the most of the rate (ties: the finer).
        buckets = max(range(1, MAX_BUCKETS_PER_SECOND + 1), key=lambda m: (m * math.floor(per_second / (m + 2)), m))
        bucket = timedelta(seconds=1 / buckets)
        return Pacing(bucket, math.floor(per_second / (buckets + 2)), bucket - GUARD)
    bucket = timedelta(seconds=max(1.0, 1 / per_second)) + 2 * LOW_RATE_USABLE
    return Pacing(bucket, 1, LOW_RATE_USABLE)


@dataclass(frozen=True)
class Grant:
    """``count`` queries that may be sent from ``start`` until ``deadline`` (never after)."""

    start: datetime
    deadline: datetime
    count: int
    bucket: int | None  # None when no rate is set


@dataclass(frozen=True)
class PacerState:
    """The shared counter of one PACS: the latest bucket handed out and how full it is."""

    bucket: int | None
    used: int


def grant_queries(now: datetime, state: PacerState, limits: QueryLimits) -> tuple[Grant, PacerState]:
    """The next queries one association may send, and the counter after handing them out.

    One association takes its share of a bucket (the bucket split among the
    associations allowed at once), so the others find room in the same bucket."""
    if not limits.per_second:
        return Grant(now, now + UNPACED_RENEWAL, UNPACED_BATCH, None), state
    pacing = pacing_for(limits.per_second)
    index = (now - EPOCH) // pacing.bucket
    if now >= _bucket_start(index, pacing) + pacing.usable:
        index += 1
    used = 0
    if state.bucket is not None and state.bucket >= index:
        index, used = state.bucket, state.used
    if used >= pacing.per_bucket:
        index, used = index + 1, 0
    share = max(1, math.ceil(pacing.per_bucket / max(1, limits.max_concurrent)))
    count = min(share, pacing.per_bucket - used)
    start = _bucket_start(index, pacing)
    return Grant(max(start, now), start + pacing.usable, count, index), PacerState(index, used + count)


def returned(state: PacerState, grant: Grant, unused: int, now: datetime) -> PacerState:
    """Give back what a grant did not use, while its bucket is still the latest and open."""
    if grant.bucket is None or unused <= 0 or state.bucket != grant.bucket or now >= grant.deadline:
        return state
    return PacerState(state.bucket, max(0, state.used - unused))


def _bucket_start(index: int, pacing: Pacing) -> datetime:
    return EPOCH + pacing.bucket * index
