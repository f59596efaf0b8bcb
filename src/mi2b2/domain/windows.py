"""Governance windows: when, and how hard, mi2b2 may use a PACS.

A window is a set of weekdays and a local time range that may wrap midnight
(19:00-07:00 belongs to the day it starts on). The first window that matches
wins, so sites list exceptions before the general rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class GovernanceWindow:
    name: str
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time  # equal to start means the whole day
    closed: bool = False
    max_concurrent: int | None = None
    studies_per_minute: int | None = None
    studies_per_hour: int | None = None
    max_concurrent_queries: int | None = None  # searches: see domain/query_governance.py
    queries_per_second: float | None = None  # 0 = no cap

    def contains(self, local: datetime) -> bool:
        clock = local.time().replace(tzinfo=None)
        if self.start == self.end:
            return local.weekday() in self.days
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= clock < self.end
        # Wraps midnight: the early-morning part belongs to the previous day's window.
        if clock >= self.start:
            return local.weekday() in self.days
        if clock < self.end:
            return (local - timedelta(days=1)).weekday() in self.days
        return False


@dataclass(frozen=True)
class Limits:
    """What the PACS allows right now. ``closed`` means nothing may start."""

    window: str
    closed: bool
    max_concurrent: int
    studies_per_minute: int | None
    studies_per_hour: int | None


def limits_at(
    windows: tuple[GovernanceWindow, ...] | list[GovernanceWindow],
    now: datetime,
    zone: ZoneInfo,
    default_max_concurrent: int,
) -> Limits:
    local = now.astimezone(zone)
    for window in windows:
        if window.contains(local):
            return Limits(
                window=window.name or "window",
                closed=window.closed,
                max_concurrent=window.max_concurrent or default_max_concurrent,
                studies_per_minute=window.studies_per_minute,
                studies_per_hour=window.studies_per_hour,
            )
    if windows:
        # Sites that list windows mean "only then": outside all of them the PACS is closed.
        return Limits("outside all windows", True, 0, None, None)
    return Limits("default", False, default_max_concurrent, None, None)
