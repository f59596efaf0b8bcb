"""How hard searches may use a PACS: query associations at once, C-FINDs per second.

Pure rules; the query governor (services/query_governor.py) reads the shared
counters from the database under a lock, asks these functions, and writes the
answer back in the same transaction, so every user, worker and server process
holds one budget per PACS.

* Concurrency: each open query association holds a **lease** (a database row
  with an expiry, renewed while it is used). A process killed mid-search stops
  renewing; its slot comes back when the lease expires, or at once when a
  process on the same host sees that its pid is gone.
* Rate: C-FIND **slots** are handed out one after another, at most
  ``queries_per_second`` apart, from one pacing cursor per PACS (the time of
  the next free slot). A process reserves a run of slots at once, so it pays
  one database round trip per batch, not per C-FIND.
* Two margins keep the promise at the PACS's end of the wire, not only on
  paper: slots are paced ``PACING_HEADROOM`` slower than the configured rate,
  and a slot is good only until ``SLOT_TOLERANCE`` after its time (a thread
  that wakes up later skips it and takes its next one). Any second at the PACS
  then holds at most the configured number of queries, whatever the jitter.
* A window that closes the PACS closes it to searches too: the window is the
  site's word that the PACS belongs to clinical work then, and a 20,000-MRN
  cohort is the last thing it wants. Jobs wait for the window to open;
  interactive searches are refused with the time of the window's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from mi2b2.domain.windows import GovernanceWindow

PACING_HEADROOM = 0.05  # pace 5% slower than allowed...
# ...so that a slot used up to 25 ms late, and reaching the PACS up to 25 ms after that, still
# leaves every second at the PACS within the rate (late + wire <= headroom x one second).
SLOT_TOLERANCE = timedelta(milliseconds=25)
BATCH_SECONDS = 0.5  # a reservation covers about this much time at the paced rate
UNPACED_BATCH = 256  # slots per reservation when no rate is set (the lease is renewed with each)


@dataclass(frozen=True)
class QueryLimits:
    """What searches may do on one PACS now. ``per_second`` None means no rate cap."""

    window: str
    closed: bool
    max_concurrent: int
    per_second: float | None

    @property
    def interval(self) -> timedelta:
        """Time between two slots, with the headroom."""
        if not self.per_second:
            return timedelta(0)
        return timedelta(seconds=(1 + PACING_HEADROOM) / self.per_second)


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
        return QueryLimits("outside all windows", True, 0, None)
    return QueryLimits("default", False, default_max_concurrent, default_rate)


def may_open_association(limits: QueryLimits, live_leases: int) -> str | None:
    """None if one more query association may open now, else why it must wait."""
    if limits.closed:
        return f"the PACS is closed to queries now (governance window {limits.window!r})"
    if live_leases >= limits.max_concurrent:
        return f"{live_leases} query associations are open, the most this PACS allows now"
    return None


@dataclass(frozen=True)
class SlotRun:
    """``count`` C-FIND slots: the first at ``first``, then one every ``interval``."""

    first: datetime
    interval: timedelta
    count: int

    def at(self, index: int) -> datetime:
        return self.first + self.interval * index

    @property
    def end(self) -> datetime:
        """Where the pacing cursor stands after this run."""
        return self.at(self.count)


def batch_size(limits: QueryLimits, wanted: int | None = None) -> int:
    """How many slots one reservation takes: about BATCH_SECONDS worth, never fewer than one."""
    size = max(1, math.ceil(limits.per_second * BATCH_SECONDS)) if limits.per_second else UNPACED_BATCH
    return min(size, wanted) if wanted else size


def reserve_slots(now: datetime, cursor: datetime | None, limits: QueryLimits, count: int) -> SlotRun:
    """The next ``count`` slots on a PACS whose pacing cursor stands at ``cursor``.

    A cursor in the past is not credit: slots never start before ``now``, so an
    idle PACS does not earn a burst."""
    if count < 1:
        raise ValueError("reserve at least one slot")
    first = now if cursor is None or cursor < now else cursor
    return SlotRun(first, limits.interval, count)


def next_usable(run: SlotRun, index: int, now: datetime) -> tuple[int, timedelta] | None:
    """From slot ``index`` on, the first slot still good at ``now`` and how long to wait for it;
    None when the run is used up. Slots more than SLOT_TOLERANCE in the past are skipped."""
    if run.interval == timedelta(0):
        return (index, timedelta(0)) if index < run.count else None
    while index < run.count:
        slot = run.at(index)
        if now <= slot + SLOT_TOLERANCE:
            return index, max(timedelta(0), slot - now)
        index += 1
    return None


def returned_cursor(cursor: datetime | None, run: SlotRun, used: int, now: datetime) -> datetime | None:
    """Give back the unused tail of a run, if nobody reserved after it: the cursor moves back
    to the first unused slot (never before now, so nothing at the PACS can bunch up)."""
    if cursor is None or cursor != run.end or used >= run.count:
        return cursor
    return max(run.at(used), now)
