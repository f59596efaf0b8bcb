"""Requests and the database side of the scheduler, on SQLite and PostgreSQL,
with a fake clock and a fake C-FIND (the PACS itself is exercised elsewhere)."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, CachedStudy, Notification, Request, Worker
from mi2b2.domain.principal import Principal, Role
from mi2b2.domain.request_states import IllegalTransition, RequestState
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.request_rows import mark_ended
from mi2b2.services.requests import (
    StudyPick,
    add_requests,
    cancel_requests,
    list_requests,
    retry_requests,
    set_priority,
)
from mi2b2.services.retrieval import fail_unexpectedly
from mi2b2.services.scheduler import pacs_states, requeue_orphans, schedule_once
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import load_site, pacs_block

ALICE = Principal("alice", Role.RESEARCHER)  # alpha lead
BOB = Principal("bob", Role.RESEARCHER)  # alpha member
DAVE = Principal("dave", Role.RESEARCHER)  # no project
MONDAY_NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

STUDIES = [
    {"PatientID": "000123", "StudyInstanceUID": "1.1", "AccessionNumber": "A1", "NumberOfStudyRelatedInstances": "10"},
    {"PatientID": "77", "StudyInstanceUID": "1.2", "AccessionNumber": "A2", "NumberOfStudyRelatedInstances": "4"},
    {"PatientID": "OFFLIST", "StudyInstanceUID": "1.9", "AccessionNumber": "A9", "NumberOfStudyRelatedInstances": "1"},
]
WORKDAY = """
    [[institutions.departments.pacs.windows]]
    name = "office hours"
    days = "mon-fri"
    start = 08:00:00
    end = 18:00:00
    max_concurrent = 1
"""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY_NOON)


@pytest.fixture
def ctx(tmp_path: Path, database_url: str, clock: FakeClock) -> ServiceContext:
    config = load_site(tmp_path, database_url=database_url, pacs_blocks=pacs_block("main", "PACS", 11113, WORKDAY))
    context = build_context(config, clock=clock, open_find=lambda _c, _p: FakeFindSession(STUDIES))
    yield context
    context.engine.dispose()


def _audit(ctx: ServiceContext, action: str) -> list[AuditEvent]:
    with ctx.sessions() as session:
        return list(session.execute(select(AuditEvent).where(AuditEvent.action == action)).scalars())


def test_add_checks_the_patient_with_the_pacs_and_refuses_off_list(ctx: ServiceContext) -> None:
    report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.9"), StudyPick("1.7")])
    assert len(report.created) == 1 and report.not_permitted == ["1.9"] and report.not_found == ["1.7"]
    (row,) = list_requests(ctx, ALICE, "alpha")
    assert (row["patient_id"], row["accession"], row["expected_instances"], row["state"]) == ("000123", "A1", 10, "scheduled")
    denied = [e for e in _audit(ctx, "denied") if e.study_uid == "1.9"]
    assert denied and denied[0].patient_id == "OFFLIST"
    again = add_requests(ctx, BOB, "alpha", "main", [StudyPick("1.1")])
    assert again.created == [] and again.already_queued == ["1.1"]


def test_bad_requests_get_clear_errors(ctx: ServiceContext) -> None:
    with pytest.raises(InvalidInput, match="not a DICOM UID"):
        add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2.x")])
    with pytest.raises(InvalidInput, match="priority 12 is out of range"):
        add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1")], priority=12)
    with pytest.raises(AccessDenied, match="not a member"):
        add_requests(ctx, DAVE, "alpha", "main", [StudyPick("1.1")])
    with pytest.raises(AccessDenied, match="expired"):
        add_requests(ctx, ALICE, "beta", "main", [StudyPick("1.1")])
    with pytest.raises(NotFound, match="no request 999"):
        cancel_requests(ctx, ALICE, [999])


def test_window_cap_and_waiting_reasons(ctx: ServiceContext, clock: FakeClock) -> None:
    ids = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.2")]).created
    clock.set(MONDAY_NOON.replace(hour=19))
    assert schedule_once(ctx, "w1").started == []
    assert {r["waiting_reason"] for r in list_requests(ctx, ALICE, "alpha")} == {"PACS closed now (outside all windows)"}
    clock.set(MONDAY_NOON)
    assert schedule_once(ctx, "w1").started == [ids[0]]
    assert schedule_once(ctx, "w2").started == []  # a second worker sees the same cap
    waiting = {r["id"]: r for r in list_requests(ctx, ALICE, "alpha")}[ids[1]]
    assert waiting["waiting_reason"] == "PACS busy: 1 of 1 retrievals active (office hours)"
    (state,) = pacs_states(ctx)
    assert (state.active, state.starts_last_minute, state.queued, state.limits.window) == (1, 1, 1, "office hours")


def test_a_retrieval_the_pacs_has_finished_sending_frees_its_slot(ctx: ServiceContext, clock: FakeClock) -> None:
    first, second = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.2")]).created
    assert schedule_once(ctx, "w1").started == [first]
    assert schedule_once(ctx, "w1").started == []  # max_concurrent = 1
    # The C-MOVE has answered; the first request still waits for its last instances to be counted.
    with transaction(ctx.sessions) as session:
        session.get_one(Request, first).pacs_done_at = clock.now()
    assert schedule_once(ctx, "w1").started == [second]
    with ctx.sessions() as session:
        assert [session.get_one(Request, i).state for i in (first, second)] == ["processing", "processing"]
    (state,) = pacs_states(ctx)
    assert state.active == 1  # only the second loads the PACS
    # A retry starts afresh: the new attempt holds the slot until its PACS is done again.
    with transaction(ctx.sessions) as session:
        row = session.get_one(Request, first)
        row.state, row.ended_at = "failed", clock.now()
    with transaction(ctx.sessions) as session:
        session.get_one(Request, second).pacs_done_at = clock.now()
    retry_requests(ctx, ALICE, [first])
    assert schedule_once(ctx, "w1").started == [first]
    with ctx.sessions() as session:
        assert session.get_one(Request, first).pacs_done_at is None
    (state,) = pacs_states(ctx)
    assert state.active == 1


def test_priority_then_age_and_who_may_change_what(ctx: ServiceContext) -> None:
    first = add_requests(ctx, BOB, "alpha", "main", [StudyPick("1.1")]).created[0]
    second = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2")]).created[0]
    with pytest.raises(AccessDenied, match="belongs to alice"):
        set_priority(ctx, BOB, [second], 5)
    set_priority(ctx, ALICE, [second], 5)  # her own
    assert schedule_once(ctx, "w").started == [second]
    with pytest.raises(InvalidInput, match="only scheduled ones"):
        set_priority(ctx, ALICE, [second], 1)
    cancel_requests(ctx, ALICE, [first])  # a lead may cancel a member's request
    with pytest.raises(InvalidInput, match="a processing request cannot be retried"):
        retry_requests(ctx, ALICE, [second])
    with ctx.sessions() as session:
        assert session.get_one(Request, first).state == "canceled"
        assert session.get_one(Request, second).state == "processing"
    assert retry_requests(ctx, BOB, [first]) == [first]  # canceled is not final: retry queues it again
    with ctx.sessions() as session:
        assert session.get_one(Request, first).state == "scheduled"
    cancel_requests(ctx, BOB, [first])
    # Asked for again meanwhile: the old request may not fetch the same study a second time.
    (again,) = add_requests(ctx, BOB, "alpha", "main", [StudyPick("1.1")]).created
    with pytest.raises(InvalidInput, match=f"request {first}: its study is already being fetched"):
        retry_requests(ctx, BOB, [first])
    # ...and once that one has brought the whole study into the cache, there is nothing to fetch.
    with transaction(ctx.sessions) as session:
        session.get_one(Request, again).state = "completed"
        session.add(CachedStudy(project_id="alpha", study_uid="1.1", patient_id="000123"))
    with pytest.raises(InvalidInput, match=f"request {first}: its study is already in the project's cache"):
        retry_requests(ctx, BOB, [first])
    cancel_requests(ctx, ALICE, [second])
    with ctx.sessions() as session:
        assert session.get_one(Request, second).cancel_requested  # the running worker sends C-CANCEL


def test_irb_expiry_cancels_queued_requests_audited_and_notified(ctx: ServiceContext, clock: FakeClock) -> None:
    ids = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.2")]).created
    clock.set(datetime(2100, 1, 4, 12, 0, tzinfo=UTC))  # a Monday after alpha's IRB expired
    result = schedule_once(ctx, "w")
    assert result.started == [] and set(result.canceled) == set(ids)
    rows = {r["id"]: r for r in list_requests(ctx, ALICE, "alpha")}
    assert {r["state"] for r in rows.values()} == {"canceled"}
    assert {r["last_error"] for r in rows.values()} == {"canceled: the project's IRB approval has expired"}
    events = [e for e in _audit(ctx, "retrieve") if '"event":"canceled"' in e.detail]
    assert {e.study_uid for e in events} == {"1.1", "1.2"} and {e.actor for e in events} == {"scheduler"}


def test_patient_removed_from_the_list_is_held(ctx: ServiceContext) -> None:
    (request_id,) = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2")]).created
    with transaction(ctx.sessions) as session:
        session.execute(Request.__table__.update().values(patient_id="NOT-LISTED"))
    assert schedule_once(ctx, "w").started == []
    (row,) = list_requests(ctx, ALICE, "alpha")
    assert row["id"] == request_id and row["waiting_reason"] == "patient no longer on the project's IRB allow-list"


def test_requests_of_a_dead_worker_go_back_to_the_queue(ctx: ServiceContext, clock: FakeClock) -> None:
    (request_id,) = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1")]).created
    dead = subprocess.Popen(["true"])
    dead.wait()
    with transaction(ctx.sessions) as session:
        session.add(Worker(id="gone", host=os.uname().nodename, pid=dead.pid, started_at=clock.now(),
                           heartbeat_at=clock.now()))
    assert schedule_once(ctx, "gone").started == [request_id]
    assert requeue_orphans(ctx, timedelta(minutes=5)) == [request_id]
    with ctx.sessions() as session:
        row = session.get_one(Request, request_id)
        assert (row.state, row.attempts, row.worker) == ("scheduled", 1, None)
        assert session.get(Worker, "gone") is None


def test_user_cancel_of_a_whole_batch_notifies_once(ctx: ServiceContext) -> None:
    ids = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.2")]).created
    cancel_requests(ctx, ALICE, ids)
    with ctx.sessions() as session:
        notes = session.execute(select(Notification).where(Notification.user_login == "alice")).scalars().all()
    assert len(notes) == 1 and "2 canceled" in notes[0].subject


def test_the_receiver_and_the_retrieval_speak_through_the_request_row(ctx: ServiceContext, clock: FakeClock) -> None:
    from mi2b2.domain.clock import as_utc
    from mi2b2.services.receipts import MoveSent, Receipt, receipt_of, record_attempt, record_write_failure

    (request_id,) = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2")]).created
    record_attempt(ctx, request_id, MoveSent(request_id, "MI2B2"))
    assert receipt_of(ctx, request_id) == Receipt(received=0, write_failure=None)
    record_write_failure(ctx, request_id, "cannot write to the cache: No space left on device")
    assert receipt_of(ctx, request_id) == Receipt(0, "cannot write to the cache: No space left on device")
    with ctx.sessions() as session:
        row = session.get_one(Request, request_id)
        # What users see meanwhile is unchanged: the receiver's reason and the status it answered.
        assert (row.failed, row.last_error, row.last_status) == (1, "cannot write to the cache: No space left on device",
                                                                 0xA700)
        assert row.write_failed_at is not None
        assert MONDAY_NOON <= as_utc(row.write_failed_at) < MONDAY_NOON + timedelta(seconds=1)  # the fake clock's now
        assert (row.move_message_id, row.move_destination_ae) == (request_id, "MI2B2")
    # The next attempt starts clean, and a C-GET names no C-MOVE.
    record_attempt(ctx, request_id, None)
    assert receipt_of(ctx, request_id).write_failure is None
    with ctx.sessions() as session:
        assert session.get_one(Request, request_id).move_message_id is None


def test_a_worker_never_requeues_its_own_running_requests(ctx: ServiceContext, clock: FakeClock) -> None:
    """A tick held up past the stale limit (waiting for the database) must not take the
    worker's own retrievals away from it: the receiver would then refuse their instances."""
    (request_id,) = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1")]).created
    with transaction(ctx.sessions) as session:
        session.add(Worker(id="busy", host="elsewhere", pid=1, started_at=clock.now(), heartbeat_at=clock.now()))
    assert schedule_once(ctx, "busy").started == [request_id]
    clock.advance(minutes=10)  # its own heartbeat is now older than the limit
    assert requeue_orphans(ctx, timedelta(minutes=5), caller="busy") == []
    assert requeue_orphans(ctx, timedelta(minutes=5), caller="another") == [request_id]


def test_a_worker_taken_for_dead_cannot_end_or_fail_what_another_worker_now_runs(
    ctx: ServiceContext, clock: FakeClock
) -> None:
    """The slow worker comes back after its request was requeued and started elsewhere: its
    late 'completed' is refused, and its crash handler leaves the other worker's run alone."""
    (request_id,) = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1")]).created
    with transaction(ctx.sessions) as session:
        session.add(Worker(id="slow", host="elsewhere", pid=1, started_at=clock.now(), heartbeat_at=clock.now()))
    assert schedule_once(ctx, "slow").started == [request_id]
    clock.advance(minutes=10)
    assert requeue_orphans(ctx, timedelta(minutes=5), caller="fresh") == [request_id]
    # Still queued: ending it from the slow worker's stale view is an illegal transition.
    with transaction(ctx.sessions) as session, pytest.raises(IllegalTransition):
        mark_ended(session.get_one(Request, request_id), RequestState.COMPLETED, None, 0, clock.now())
    assert schedule_once(ctx, "fresh").started == [request_id]
    fail_unexpectedly(ctx, request_id, RuntimeError("late crash"), worker_id="slow")
    with ctx.sessions() as session:
        row = session.get_one(Request, request_id)
        assert (row.state, row.worker, row.last_error) == ("processing", "fresh", None)
    fail_unexpectedly(ctx, request_id, RuntimeError("its own crash"), worker_id="fresh")
    with ctx.sessions() as session:
        row = session.get_one(Request, request_id)
        assert row.state == "failed" and "its own crash" in (row.last_error or "")
