"""Whether this process is ready for traffic: a pure decision over the outcomes of its checks.

The probes live in ``mi2b2.services.health``; here only what their outcomes mean, so that a
unit test can decide readiness with made-up outcomes and a made-up clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class CheckOutcome:
    name: str  # "database", "migrations", "receiver", "worker", "cache"
    reason: str | None = None  # None: the check passed; otherwise why it failed, without patient data or secrets

    @property
    def passed(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Readiness:
    ready: bool
    passed: list[str]
    failed: list[CheckOutcome]


def decide_readiness(outcomes: Sequence[CheckOutcome]) -> Readiness:
    """Ready only when every check passed (and at least one ran)."""
    failed = [outcome for outcome in outcomes if not outcome.passed]
    return Readiness(ready=bool(outcomes) and not failed,
                     passed=[outcome.name for outcome in outcomes if outcome.passed], failed=failed)


def worker_heartbeat_problem(latest_heartbeat: datetime | None, now: datetime, stale_after: timedelta) -> str | None:
    """Why no worker counts as alive, or None when the freshest heartbeat is recent enough."""
    if latest_heartbeat is None:
        return "no worker has ever sent a heartbeat"
    age = now - latest_heartbeat
    if age > stale_after:
        return (f"the freshest worker heartbeat is {age.total_seconds():.0f} s old "
                f"(stale after {stale_after.total_seconds():.0f} s)")
    return None


def worker_stale_after(poll_seconds: float) -> timedelta:
    """A worker is presumed dead after missing several heartbeats (one a poll)."""
    return timedelta(seconds=max(30.0, 10 * poll_seconds))
