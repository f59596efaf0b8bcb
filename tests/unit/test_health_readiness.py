"""Readiness as a pure decision: which checks failed, and whether the worker's heartbeat is fresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mi2b2.domain.health import CheckOutcome, decide_readiness, worker_heartbeat_problem, worker_stale_after
from support.api_client import faked_pacs_client

NOW = datetime(2026, 12, 5, 1, 0, tzinfo=UTC)


def test_ready_only_when_every_check_passed() -> None:
    decision = decide_readiness([CheckOutcome("database"), CheckOutcome("cache")])
    assert decision.ready and decision.passed == ["database", "cache"] and decision.failed == []


def test_each_failing_check_is_named_with_its_reason() -> None:
    decision = decide_readiness([CheckOutcome("database"), CheckOutcome("worker", "no worker has ever sent a heartbeat"),
                                 CheckOutcome("cache", "read-only")])
    assert not decision.ready
    assert [(f.name, f.reason) for f in decision.failed] == [("worker", "no worker has ever sent a heartbeat"),
                                                               ("cache", "read-only")]
    assert decision.passed == ["database"]


def test_no_checks_is_not_ready() -> None:
    assert not decide_readiness([]).ready


def test_a_heartbeat_is_fresh_until_the_stale_limit() -> None:
    stale_after = worker_stale_after(2.0)
    assert stale_after == timedelta(seconds=30)
    assert worker_heartbeat_problem(NOW - stale_after, NOW, stale_after) is None
    assert "31 s old" in (worker_heartbeat_problem(NOW - timedelta(seconds=31), NOW, stale_after) or "")
    assert "ever sent" in (worker_heartbeat_problem(None, NOW, stale_after) or "")


def test_the_stale_limit_follows_a_slow_poll() -> None:
    assert worker_stale_after(10.0) == timedelta(seconds=100)


def test_live_and_ready_answer_without_a_login(tmp_path: Path) -> None:
    client = faked_pacs_client(tmp_path)
    assert client.get("/health/live").json() == {"status": "live"}
    answer = client.get("/health/ready")
    assert answer.status_code == 503  # no worker runs in this test app
    body = answer.json()
    assert body["status"] == "not_ready" and "worker" in [f["check"] for f in body["failed"]]
    assert {"database", "migrations", "cache"} <= set(body["passed"])
