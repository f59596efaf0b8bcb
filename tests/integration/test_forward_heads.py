"""The forward scheduler at scale, on SQLite and PostgreSQL: a tick reads the heads of each
project's queue to a destination, not the queue; what must end ends a batch per tick; a head
whose patient left the allow-list fails and the next one starts."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.orm import ORMExecuteState

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, CachedStudy, Notification, Request
from mi2b2.config import load_config
from mi2b2.domain.forwarding import FAILING_HEADS, SWEEP_BATCH
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.forward import schedule_forwards
from mi2b2.services.requests import show_request
from mi2b2.testing import FakeClock
from support.site import write_site

NOON = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
XNAT = textwrap.dedent("""
    [[destinations]]
    id = "xnat"
    ae_title = "XNAT"
    host = "127.0.0.1"
    port = 11199
    max_concurrent = 2
""")
NOT_ALLOWED = "999"  # on no allow-list
ALICE = Principal("alice", Role.RESEARCHER)
_serial = iter(range(1, 10**9))


def _ctx(tmp_path: Path, database_url: str, expired_b: bool) -> ServiceContext:
    config = load_config(write_site(tmp_path / "site", database_url=database_url, extra=XNAT, expired_b=expired_b))
    return build_context(config, clock=FakeClock(NOON))


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[ServiceContext]:
    context = _ctx(tmp_path, database_url, expired_b=False)
    yield context
    context.engine.dispose()


def _queue(ctx: ServiceContext, project: str, n: int, patient: str, priority: int = 0) -> list[int]:
    """``n`` forwards queued to xnat, each of a study in the project's cache (from PACS main), as
    `add_forwards` leaves them; newer than any queued before."""
    serials = [next(_serial) for _ in range(n)]
    with transaction(ctx.sessions) as session:
        session.execute(insert(CachedStudy), [dict(
            project_id=project, study_uid=f"1.2.3.{s}", patient_id=patient, pacs_id="main", instance_count=1, bytes=10,
        ) for s in serials])
        session.execute(insert(Request), [dict(
            kind="forward", project_id=project, user_login="alice", destination_id="xnat", patient_id=patient,
            study_uid=f"1.2.3.{s}", accession=f"A{s}", series_uids=[], priority=priority, state="scheduled",
            waiting_reason="waiting for the scheduler", expected_instances=1, expected_bytes=10,
            created_at=NOON - timedelta(days=1) + timedelta(seconds=s), cancel_requested=False,
        ) for s in serials])
        return list(session.execute(select(Request.id).where(Request.study_uid.in_([f"1.2.3.{s}" for s in serials]))
                                    .order_by(Request.id)).scalars())


@dataclass
class Reads:
    statements: int = 0
    rows: int = 0  # rows the tick's queries return
    steps: int = 0  # SQLite only: hundreds of virtual machine steps, the work the database did to answer


@contextmanager
def counting(ctx: ServiceContext) -> Iterator[Reads]:
    reads = Reads()
    on = [True]

    def returned(state: ORMExecuteState) -> Any:
        if not state.is_select:
            return None
        frozen = state.invoke_statement().freeze()
        reads.rows += len(frozen().all())
        return frozen()

    def step() -> int:
        reads.steps += on[0]
        return 0

    def sent(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        reads.statements += 1
        if ctx.engine.dialect.name == "sqlite":
            cursor.connection.set_progress_handler(step, 100)

    event.listen(ctx.sessions, "do_orm_execute", returned)
    event.listen(ctx.engine, "before_cursor_execute", sent)
    try:
        yield reads
    finally:
        on[0] = False
        event.remove(ctx.sessions, "do_orm_execute", returned)
        event.remove(ctx.engine, "before_cursor_execute", sent)


def _tick(ctx: ServiceContext) -> tuple[list[int], Reads]:
    """One tick, counted; what it started goes back to the queue (so the next tick sees the same queue)."""
    with counting(ctx) as reads:
        started = schedule_forwards(ctx, "worker:test")
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id.in_(started)).values(
            state="scheduled", worker=None, started_at=None, attempts=0))
    return started, reads


def test_a_tick_reads_the_same_whatever_the_length_of_the_queue(ctx: ServiceContext) -> None:
    small_alpha = _queue(ctx, "alpha", 20, "000123")
    _queue(ctx, "beta", 20, "B-1")
    started_small, small = _tick(ctx)
    _tick(ctx)  # the round-robin cursor where it will be after each tick (alpha served last)
    started_small, small = _tick(ctx)
    _queue(ctx, "alpha", 3000, "000123")
    _queue(ctx, "beta", 3000, "B-1")
    started_big, big = _tick(ctx)
    assert started_big == started_small and len(started_small) == 2  # the cap; the oldest of each project
    assert small_alpha[0] in started_small
    assert (big.statements, big.rows) == (small.statements, small.rows)
    assert small.rows <= 2 * (2 + FAILING_HEADS) + 10  # the heads, the projects, the destinations
    if ctx.engine.dialect.name == "sqlite":
        assert big.steps < 1.5 * small.steps + 5, (small, big)  # indexed: not one step per queued forward


def test_a_closed_projects_forwards_are_canceled_a_batch_per_tick_and_never_start(
    tmp_path: Path, database_url: str
) -> None:
    ctx = _ctx(tmp_path, database_url, expired_b=True)  # queued while beta's IRB was active
    try:
        beta = _queue(ctx, "beta", SWEEP_BATCH * 2 + 100, "B-1")
        alpha = _queue(ctx, "alpha", 3, "000123")
        canceled_per_tick = []
        started: list[int] = []
        for _ in range(4):
            started += schedule_forwards(ctx, "worker:test")
            with ctx.sessions() as session:
                canceled_per_tick.append(session.scalar(select(func.count()).where(
                    Request.id.in_(beta), Request.state == "canceled")))
        assert canceled_per_tick == [SWEEP_BATCH, 2 * SWEEP_BATCH, 2 * SWEEP_BATCH + 100, 2 * SWEEP_BATCH + 100]
        assert started == alpha[:2]  # alpha's forwards start meanwhile, within the cap
        with ctx.sessions() as session:
            ends = session.execute(select(Request.state, Request.last_error, Request.started_at)
                                   .where(Request.id.in_(beta))).all()
            audited = [json.loads(d) for d in session.execute(
                select(AuditEvent.detail).where(AuditEvent.actor == "scheduler")).scalars()]
            notices = session.scalar(select(func.count()).select_from(Notification).where(
                Notification.project_id == "beta"))
        assert {(state, error, at) for state, error, at in ends} == {
            ("canceled", "canceled: the project's IRB approval has expired", None)}
        assert sorted(a["request"] for a in audited if a["event"] == "canceled") == beta
        assert notices == len(beta)  # each owner told, as when they all ended in one tick
    finally:
        ctx.engine.dispose()


def test_a_head_whose_patient_left_the_allow_list_fails_and_the_next_starts(ctx: ServiceContext) -> None:
    (gone,) = _queue(ctx, "alpha", 1, NOT_ALLOWED, priority=5)
    first, second = _queue(ctx, "alpha", 2, "000123")
    assert schedule_forwards(ctx, "worker:test") == [first, second]
    with ctx.sessions() as session:
        row = session.get_one(Request, gone)
        assert (row.state, row.last_error) == ("failed", "the patient is no longer on the project's IRB allow-list")
        (detail,) = session.execute(select(AuditEvent.detail).where(AuditEvent.actor == "scheduler")).scalars()
    assert json.loads(detail) | {"request": gone, "event": "failed"} == json.loads(detail)


def test_more_heads_failing_than_a_tick_reads_end_over_two_ticks(ctx: ServiceContext) -> None:
    gone = _queue(ctx, "alpha", 2 + FAILING_HEADS + 1, NOT_ALLOWED, priority=5)
    (allowed,) = _queue(ctx, "alpha", 1, "000123")
    assert schedule_forwards(ctx, "worker:test") == []  # the free slots and FAILING_HEADS more: all fail
    # The one not read yet says why it will fail, not that it waits for its turn.
    assert show_request(ctx, ALICE, gone[-1])["waiting_reason"] == (
        "the patient is no longer on the project's IRB allow-list: the forward fails when it reaches the head "
        "of the queue")
    assert show_request(ctx, ALICE, allowed)["waiting_reason"] == "waiting for the scheduler"
    assert schedule_forwards(ctx, "worker:test") == [allowed]
    with ctx.sessions() as session:
        assert set(session.execute(select(Request.state).where(Request.id.in_(gone))).scalars()) == {"failed"}
