"""The answers of ``/health/live`` and ``/health/ready``, for load balancers and monitoring."""

from __future__ import annotations

from typing import Literal

from mi2b2.api.schemas.common import Reply


class Liveness(Reply):
    status: Literal["live"]


class FailedCheck(Reply):
    check: str  # database, migrations, receiver, worker or cache
    reason: str


class ReadinessReply(Reply):
    status: Literal["ready", "not_ready"]
    passed: list[str]
    failed: list[FailedCheck]
