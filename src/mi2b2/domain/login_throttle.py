"""How long a login must wait after failed attempts (pure; the clock is passed in).

Failures are counted per (login typed, client address), for logins that exist
and logins that do not alike: a guesser is slowed down on the pairs it tries,
and cannot lock a user out from the user's own address. Delays grow but are
capped, and a day without failures forgets them: never a permanent lockout.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

FREE_ATTEMPTS = 5
FIRST_DELAY = timedelta(seconds=30)
LONGEST_DELAY = timedelta(minutes=15)
FORGET_AFTER = timedelta(days=1)


def login_digest(login: str) -> str:
    """What the failures of a login are kept under: a hash, since people type passwords into the login field."""
    return hashlib.sha256(login.encode("utf-8", "surrogatepass")).hexdigest()


def login_allowed_at(failed_logins: int, last_failure: datetime | None) -> datetime | None:
    """When the next attempt may be made, or None if it may be made now.

    Five free attempts, then 30 s, doubling per further failure, capped at 15 min.
    """
    if failed_logins < FREE_ATTEMPTS or last_failure is None:
        return None
    delay: timedelta = min(FIRST_DELAY * 2 ** min(failed_logins - FREE_ATTEMPTS, 16), LONGEST_DELAY)
    return last_failure + delay


def must_wait(failed_logins: int, last_failure: datetime | None, now: datetime) -> timedelta | None:
    allowed_at = login_allowed_at(failed_logins, last_failure)
    if allowed_at is None or now >= allowed_at:
        return None
    return allowed_at - now
