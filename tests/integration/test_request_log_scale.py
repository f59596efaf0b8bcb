"""The queue at scale, on SQLite and PostgreSQL: a tick writes nothing on requests that did
not change (their reasons are derived when read), and the request log pages by keyset with
server-side filters and counts per state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import QueueReason, Request
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, InvalidInput
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.requests import RequestFilter, list_requests, request_page, show_request
from mi2b2.services.scheduler import schedule_once
from mi2b2.testing import FakeClock
from support.site import always_window, load_site, pacs_block

ALICE = Principal("alice", Role.RESEARCHER)
CAROL = Principal("carol", Role.RESEARCHER)  # not in alpha
NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
CAP_TWO = always_window(max_concurrent=2)


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    config = load_site(tmp_path, database_url=database_url, pacs_blocks=pacs_block("main", "PACS", 11113, CAP_TWO))
    context = build_context(config, clock=FakeClock(NOON))
    yield context
    context.engine.dispose()


def _queue(ctx: ServiceContext, n: int, **values: object) -> list[int]:
    rows = [dict(kind="retrieve", project_id="alpha", user_login="alice", pacs_id="main", patient_id="000123",
                 study_uid=f"1.2.3.{i}", accession=f"A{i}", series_uids=[], priority=0, state="scheduled",
                 waiting_reason="waiting for the scheduler", expected_instances=1, expected_bytes=1000,
                 created_at=NOON - timedelta(minutes=n - i), cancel_requested=False) | values for i in range(n)]
    with transaction(ctx.sessions) as session:
        session.execute(insert(Request), rows)
        return list(session.execute(select(Request.id).order_by(Request.id)).scalars())


def test_a_tick_starts_the_oldest_and_writes_nothing_on_the_rest(ctx: ServiceContext) -> None:
    ids = _queue(ctx, 50)
    started = schedule_once(ctx, "worker:test").started
    assert started == ids[:2]  # the two oldest: the cap is two
    with ctx.sessions() as session:
        stored = dict(session.execute(select(Request.id, Request.waiting_reason).where(Request.id.in_(ids[2:]))).all())
        reasons = session.execute(select(QueueReason.project_id, QueueReason.reason)
                                  .where(QueueReason.pacs_id == "main")).all()
    assert set(stored.values()) == {"waiting for the scheduler"}  # not rewritten by the tick
    assert ("alpha", "PACS busy: 2 of 2 retrievals active (always)") in reasons
    assert len(reasons) == len({project for project, _ in reasons})  # one row per project and PACS
    shown = {row["id"]: row["waiting_reason"] for row in list_requests(ctx, ALICE, "alpha")}
    assert shown[ids[10]] == "PACS busy: 2 of 2 retrievals active (always)"
    assert shown[ids[0]] is None  # processing
    assert show_request(ctx, ALICE, ids[10])["waiting_reason"] == shown[ids[10]]


def test_a_request_holding_itself_back_says_so_when_read(ctx: ServiceContext) -> None:
    (due_later,) = _queue(ctx, 1, not_before=NOON + timedelta(minutes=5))
    schedule_once(ctx, "worker:test")
    assert show_request(ctx, ALICE, due_later)["waiting_reason"] == \
        "retry after a transient failure, not before 2026-11-23 12:05:00 UTC"


def test_pages_by_keyset_with_filters_and_counts_per_state(ctx: ServiceContext) -> None:
    ids = _queue(ctx, 25)
    with transaction(ctx.sessions) as session:
        for request_id in ids[:5]:
            session.get_one(Request, request_id).state = "failed"
    seen: list[int] = []
    before = None
    while True:
        page = request_page(ctx, ALICE, "alpha", RequestFilter(states=("scheduled",)), before=before, limit=7)
        assert page.state_counts == {"scheduled": 20, "failed": 5} and page.total == 20
        seen += [row["id"] for row in page.rows]
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == sorted(ids[5:], reverse=True)  # every scheduled request once, newest first
    assert request_page(ctx, ALICE, "alpha", RequestFilter(users=("nobody",))).rows == []
    one = request_page(ctx, ALICE, "alpha", RequestFilter(patient_id="000123", kinds=("retrieve",)), limit=1)
    assert len(one.rows) == 1 and one.total == 25


def test_the_request_log_refuses_strangers_and_unknown_filters(ctx: ServiceContext) -> None:
    with pytest.raises(AccessDenied):
        request_page(ctx, CAROL, "alpha")
    with pytest.raises(InvalidInput, match="unknown request state 'lost'"):
        request_page(ctx, ALICE, "alpha", RequestFilter(states=("lost",)))
    with pytest.raises(InvalidInput, match="unknown request kind"):
        request_page(ctx, ALICE, "alpha", RequestFilter(kinds=("teleport",)))
    with pytest.raises(InvalidInput):
        request_page(ctx, ALICE, "alpha", limit=0)
