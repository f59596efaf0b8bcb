"""How long a login must wait after failed attempts (pure; the clock is passed in)."""

from __future__ import annotations

from datetime import datetime, timedelta

FREE_ATTEMPTS = 5
FIRST_DELAY = timedelta(seconds=30)
LONGEST_DELAY = timedelta(minutes=15)


def login_allowed_at(failed_logins: int, last_failure: datetime | None) -> datetime | None:
    """When the next attempt may be made, or None if it may be made now.

    Five free attempts, then 30 s, doubling per further failure, capped at 15 min.
    """
    if failed_logins < FREE_ATTEMPTS or last_failure is None:
        return None
    delay = min(FIRST_DELAY * 2 ** (failed_logins - FREE_ATTEMPTS), LONGEST_DELAY)
    return last_failure + delay


def must_wait(failed_logins: int, last_failure: datetime | None, now: datetime) -> timedelta | None:
    allowed_at = login_allowed_at(failed_logins, last_failure)
    if allowed_at is None or now >= allowed_at:
        return None
    return allowed_at - now
