"""The only place that reads the wall clock.

Everything else takes ``now`` as an argument or a ``Clock`` object, so tests
drive time by hand (see ``mi2b2.testing.FakeClock``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Timer(Protocol):
    """Real elapsed time, for waits on real things: the database, the receiver, a PACS.

    A `Clock` is also a Timer, but the two are kept apart in the service context:
    a test may run the scheduler's clock faster than the wall (see
    ``mi2b2.testing.ScaledClock``) while the database and the network keep their
    own pace, and a unit test passes a fake for both so that nothing sleeps."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin."""
        ...

    def sleep(self, seconds: float) -> None:
        ...


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC datetime."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, for measuring durations."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time (a fake clock just moves on)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def as_utc(value: datetime) -> datetime:
    """Databases hand back naive datetimes (SQLite); we only ever store UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
