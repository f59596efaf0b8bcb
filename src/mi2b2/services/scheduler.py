"""The scheduler's database side: read the counters, ask the pure planner, write the plan.

Everything happens in one transaction that holds the scheduling lock, so two
workers (even on two hosts) never both see a free slot and both take it.

A tick costs what can start, not what is queued: per PACS it reads the
counters and, per project, only the heads of its queue (`queue_heads` in the
domain, here as one indexed query per project), and writes one waiting reason
per project and PACS when it changes. A request's own waiting reason is put
together when it is read (services/waiting.py).
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import serialize_scheduling, transaction
from mi2b2.adapters.db.outage import DatabaseUnavailable
from mi2b2.adapters.db.tables import (
    CachedStudy,
    CursorKind,
    PacsStart,
    Project,
    QueueReason,
    Request,
    SchedulerCursor,
    Worker,
    WorkerKind,
)
from mi2b2.adapters.process import pid_alive
from mi2b2.config import PacsConfig, RetrieveMethod
from mi2b2.domain.clock import as_utc
from mi2b2.domain.governance import irb_active_at
from mi2b2.domain.health import worker_stale_after
from mi2b2.domain.request_states import Event, sources
from mi2b2.domain.requests import RequestKind, RequestState, reserved_bytes
from mi2b2.domain.scheduler import HOUR, Candidate, PacsLoad, ProjectBudget, plan_pacs, starts_left
from mi2b2.domain.windows import Limits, limits_at
from mi2b2.services.allow_list import on_allow_list
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.request_rows import back_off_unless_canceled, change_state, mark_started


@dataclass
class ScheduleResult:
    started: list[int] = field(default_factory=list)
    canceled: dict[int, str] = field(default_factory=dict)


def schedule_once(ctx: ServiceContext, worker_id: str) -> ScheduleResult:
    """Start what may start now on every PACS; the caller runs the started requests."""
    result = ScheduleResult()
    with transaction(ctx.sessions) as session:
        serialize_scheduling(session)
        # Read the clock only once the lock is held: a time read while another worker held it
        # would record this worker's starts as earlier than they were, and let the next minute in early.
        now = ctx.clock.now()
        budgets = _project_budgets(ctx, session, now)
        busy = _studies_in_flight(session)
        no_receiver = receiver_missing(ctx, session, now)
        for pacs in ctx.config.all_pacs():
            load = _pacs_load(session, pacs, now, no_receiver if pacs.retrieve is RetrieveMethod.C_MOVE else None)
            cursor = round_robin_cursor(session, CursorKind.PACS, pacs.id)
            heads = _queue_heads(session, pacs.id, now, load, budgets, busy.get(pacs.id, set()))
            plan = plan_pacs(now, load, budgets, heads, cursor.last_project_id)
            _apply_starts(session, pacs.id, plan.starts, worker_id, now, budgets)
            busy.setdefault(pacs.id, set()).update(_study_uids(session, plan.starts))
            cursor.last_project_id = plan.last_project
            _store_queue_reasons(session, pacs.id, plan.queue_reasons, now)
            result.started += plan.starts
            result.canceled.update(_cancel(session, plan.cancel, now))
        session.execute(delete(PacsStart).where(PacsStart.started_at < now - 2 * HOUR))
        canceled = session.execute(
            select(Request.id, Request.project_id, Request.pacs_id, Request.patient_id, Request.study_uid)
            .where(Request.id.in_(list(result.canceled)))
        ).all()
        ctx.audit.record_many(session, [  # the cancellations commit with their audit rows
            AuditEntry("scheduler", Action.RETRIEVE, Outcome.DENIED, project_id=project_id, pacs_id=pacs_id,
                       patient_id=patient_id, study_uid=study_uid,
                       detail={"request": request_id, "event": "canceled", "reason": result.canceled[request_id]})
            for request_id, project_id, pacs_id, patient_id, study_uid in canceled])
    return result


def pacs_limits(pacs: PacsConfig, now: datetime) -> Limits:
    windows = [w.to_domain() for w in pacs.windows]
    return limits_at(windows, now, ZoneInfo(pacs.timezone), pacs.default_max_concurrent)


@dataclass(frozen=True)
class PacsState:
    """What the admin page and the CLI show: the governance state of one PACS now."""

    pacs_id: str
    limits: Limits
    active: int
    starts_last_minute: int
    starts_last_hour: int
    queued: int


def pacs_states(ctx: ServiceContext) -> list[PacsState]:
    now = ctx.clock.now()
    states = []
    with ctx.sessions() as session:
        for pacs in ctx.config.all_pacs():
            load = _pacs_load(session, pacs, now)
            queued = session.execute(
                select(func.count()).where(Request.pacs_id == pacs.id, Request.state == RequestState.SCHEDULED)
            ).scalar_one()
            states.append(PacsState(
                pacs.id, load.limits, load.active,
                sum(1 for t in load.recent_starts if t > now - timedelta(minutes=1)), len(load.recent_starts), queued,
            ))
    return states


# --- workers and recovery ------------------------------------------------------------


def new_worker_id(kind: str = "worker") -> str:
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def heartbeat(ctx: ServiceContext, worker_id: str, kind: WorkerKind = WorkerKind.WORKER) -> None:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        row = session.get(Worker, worker_id)
        if row is None:
            session.add(Worker(id=worker_id, kind=kind.value, host=socket.gethostname(), pid=os.getpid(),
                               started_at=now, heartbeat_at=now))
        else:
            row.heartbeat_at = now


def receiver_hosts(session: Session) -> set[str]:
    """Hosts where a receiver keeps (or kept) a heartbeat."""
    return set(session.execute(select(Worker.host).where(Worker.kind == WorkerKind.RECEIVER)).scalars())


def receivers_changing(session: Session, now: datetime, settle: timedelta) -> int:
    """How many receivers keep (or kept until lately) a heartbeat here, when that is several or the
    newest began less than ``settle`` ago; else 0. Behind a balancer, a PACS may then be sent to a
    receiver that is going, or not yet routed to, and deliver nothing though another is fine."""
    started = session.execute(select(Worker.started_at).where(Worker.kind == WorkerKind.RECEIVER)).scalars().all()
    if len(started) >= 2 or any(as_utc(t) >= now - settle for t in started):
        return len(started)
    return 0


def receivers_keep_heartbeats(session: Session) -> bool:
    return session.execute(select(Worker.id).where(Worker.kind == WorkerKind.RECEIVER).limit(1)).first() is not None


def receiver_missing(ctx: ServiceContext, session: Session, now: datetime) -> str | None:
    """Why no C-MOVE may start now: receivers keep heartbeats, and none is alive. None when
    one is, or when no receiver ever kept one here (a receiver run by a test harness or an
    older version): then nothing is known, and retrievals are not held back.

    A receiver that stops keeps its row (stale), so that stopping every receiver holds the
    C-MOVEs until one is back; rows of gone receivers are dropped once another is alive."""
    stale_after = worker_stale_after(ctx.config.server.worker_poll_seconds)
    here = socket.gethostname()
    receivers = session.execute(select(Worker).where(Worker.kind == WorkerKind.RECEIVER)).scalars().all()
    if not receivers:
        return None
    alive = [r for r in receivers
             if as_utc(r.heartbeat_at) >= now - stale_after and not (r.host == here and not pid_alive(r.pid))]
    if alive:
        gone = sorted(r.id for r in receivers if r not in alive)
        if gone:
            session.execute(delete(Worker).where(Worker.id.in_(gone)))
        return None
    last = max(receivers, key=lambda r: as_utc(r.heartbeat_at))
    return (f"no mi2b2 receiver is running (the last, on {last.host}, was seen at "
            f"{as_utc(last.heartbeat_at):%Y-%m-%d %H:%M:%S} UTC): the PACS would have nowhere to send; "
            "start `mi2b2 receiver` or `mi2b2 serve`")


def retire_worker(ctx: ServiceContext, worker_id: str) -> None:
    with transaction(ctx.sessions) as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))


def requeue_orphans(ctx: ServiceContext, stale_after: timedelta, caller: str | None = None) -> list[int]:
    """Requests left processing by a worker that is gone go back to the queue.

    Gone means: no worker row, a heartbeat older than ``stale_after``, or a
    worker on this host whose process no longer exists (after a SIGKILL we
    need not wait for its heartbeat to go stale). Attempts are kept. The
    ``caller`` worker is alive, whatever its heartbeat says: a tick held up
    (waiting for the database) past the limit must not take its own running
    retrievals away from it."""
    now = ctx.clock.now()
    here = socket.gethostname()
    with transaction(ctx.sessions) as session:
        workers = {w.id: w for w in session.execute(select(Worker).where(Worker.kind == WorkerKind.WORKER)).scalars()}
        dead = {
            w.id for w in workers.values()
            if w.id != caller
            and (as_utc(w.heartbeat_at) < now - stale_after or (w.host == here and not pid_alive(w.pid)))
        }
        # Lock only the rows that look orphaned, in id order: locking every processing row
        # on every tick made two workers deadlock, and held up the receiver counting arrivals.
        suspects = [request_id for request_id, worker in session.execute(
            select(Request.id, Request.worker).where(Request.state == RequestState.PROCESSING)
        ).all() if worker != caller and (worker is None or worker not in workers or worker in dead)]
        orphans = session.execute(
            select(Request).where(Request.id.in_(suspects), Request.state.in_(sources(Event.REQUEUE)))
            .order_by(Request.id).with_for_update()
        ).scalars().all() if suspects else []
        requeued = []
        for row in orphans:
            if row.worker != caller and (row.worker is None or row.worker not in workers or row.worker in dead):
                change_state(row, Event.REQUEUE)
                row.worker = None
                row.waiting_reason = "requeued: the worker running it stopped"
                requeued.append(row.id)
        session.execute(delete(Worker).where(Worker.id.in_(dead)))
    return requeued



def requeue_interrupted(ctx: ServiceContext, worker_id: str, request_ids: set[int]) -> list[int]:
    """Requests this worker stopped running when the database went away go back to the queue
    (or end canceled, if a user asked for that meanwhile), their attempt given back. Returns those requeued."""
    now = ctx.clock.now()
    requeued = []
    with transaction(ctx.sessions) as session:
        rows = session.execute(
            select(Request).where(Request.id.in_(sorted(request_ids)), Request.state == RequestState.PROCESSING,
                                  Request.worker == worker_id).with_for_update()
        ).scalars().all()
        for row in rows:
            if back_off_unless_canceled(row, DatabaseUnavailable(), now, now):
                row.attempts = max(row.attempts - 1, 0)  # our outage: it must not use up the request's attempts
                requeued.append(row.id)
    return requeued


# --- reading the counters ------------------------------------------------------------


def _project_budgets(ctx: ServiceContext, session: Session, now: datetime) -> dict[str, ProjectBudget]:
    used = dict(session.execute(
        select(CachedStudy.project_id, func.coalesce(func.sum(CachedStudy.bytes), 0)).group_by(CachedStudy.project_id)
    ).all())
    in_flight: dict[str, int] = defaultdict(int)
    for project_id, expected, received in session.execute(
        select(Request.project_id, Request.expected_bytes, Request.bytes)
        .where(Request.state == RequestState.PROCESSING, Request.kind == RequestKind.RETRIEVE)
    ).all():
        in_flight[project_id] += reserved_bytes(expected, received)
    budgets = {}
    for project in session.execute(select(Project)).scalars():
        open_ = project.active and irb_active_at(project.expires_on, now, ctx.config.project_zone(project.id))
        reason = "the project's IRB approval has expired" if project.active else "the project is no longer configured"
        budgets[project.id] = ProjectBudget(
            project.id, open_, project.quota_bytes, int(used.get(project.id, 0)), in_flight[project.id], reason
        )
    return budgets


def _studies_in_flight(session: Session) -> dict[str, set[str]]:
    busy: dict[str, set[str]] = defaultdict(set)
    for pacs_id, study_uid in session.execute(
        select(Request.pacs_id, Request.study_uid)
        .where(Request.state == RequestState.PROCESSING, Request.kind == RequestKind.RETRIEVE)
    ).all():
        if pacs_id is not None:  # a retrieval always names its PACS
            busy[pacs_id].add(study_uid)
    return busy


def _pacs_load(session: Session, pacs: PacsConfig, now: datetime, receiver_down: str | None = None) -> PacsLoad:
    active = session.execute(
        select(func.count()).where(
            Request.pacs_id == pacs.id, Request.state == RequestState.PROCESSING, Request.kind == RequestKind.RETRIEVE,
            Request.pacs_done_at.is_(None),  # finishing on our side only: the PACS slot is free
        )
    ).scalar_one()
    starts = session.execute(
        select(PacsStart.started_at).where(PacsStart.pacs_id == pacs.id, PacsStart.started_at > now - HOUR)
    ).scalars().all()
    return PacsLoad(pacs_limits(pacs, now), active, [as_utc(t) for t in starts], receiver_down)


def _queue_heads(
    session: Session, pacs_id: str, now: datetime, load: PacsLoad, budgets: dict[str, ProjectBudget], busy: set[str]
) -> list[Candidate]:
    """`domain.scheduler.queue_heads` in SQL: per open project at most ``starts_left`` rows,
    read along ix_requests_queue; and the queued requests of closed projects, to cancel."""
    queued = (Request.pacs_id == pacs_id, Request.state == RequestState.SCHEDULED, Request.kind == RequestKind.RETRIEVE)
    columns = (Request.id, Request.project_id, Request.priority, Request.created_at, Request.expected_bytes)
    closed = sorted(pid for pid, budget in budgets.items() if not budget.may_retrieve)
    rows = list(session.execute(select(*columns).where(*queued, Request.project_id.in_(closed))).all()) if closed else []
    n = starts_left(now, load)
    for project_id, budget in sorted(budgets.items()) if n > 0 else ():
        if not budget.may_retrieve:
            continue
        heads = select(*columns).where(
            *queued, Request.project_id == project_id,
            or_(Request.not_before.is_(None), Request.not_before <= now),
            Request.expected_bytes <= budget.quota_bytes - budget.used_bytes,
            on_allow_list(Request.project_id, Request.pacs_id, Request.patient_id),
        )
        if busy:
            heads = heads.where(Request.study_uid.not_in(sorted(busy)))
        rows += session.execute(heads.order_by(Request.priority.desc(), Request.created_at, Request.id).limit(n)).all()
    return [Candidate(rid, project_id, priority, as_utc(created), expected)
            for rid, project_id, priority, created, expected in rows]


def round_robin_cursor(session: Session, kind: CursorKind, target_id: str) -> SchedulerCursor:
    """Where round-robin over projects continues for one PACS's retrievals or one destination's forwards."""
    cursor = session.get(SchedulerCursor, (str(kind), target_id))
    if cursor is None:
        cursor = SchedulerCursor(kind=str(kind), target_id=target_id, last_project_id=None)
        session.add(cursor)
    return cursor


# --- writing the plan ----------------------------------------------------------------


def _apply_starts(
    session: Session, pacs_id: str, ids: list[int], worker_id: str, now: datetime, budgets: dict[str, ProjectBudget]
) -> None:
    # Locked in id order, as every multi-row lock on requests is taken, so a user's cancel or
    # the receiver's counts never deadlock with a tick. A request canceled since the heads were
    # read is left alone: it no longer starts.
    rows = {row.id: row for row in session.execute(
        select(Request).where(Request.id.in_(ids)).order_by(Request.id).with_for_update()
        .execution_options(populate_existing=True)).scalars()} if ids else {}
    for request_id in list(ids):
        row = rows.get(request_id)
        if row is None or row.state != RequestState.SCHEDULED:
            ids.remove(request_id)
            continue
        mark_started(row, worker_id, now)
        session.add(PacsStart(pacs_id=pacs_id, project_id=row.project_id, request_id=row.id, started_at=now))
        b = budgets[row.project_id]
        # Later PACS in this same pass must see this study's space as taken.
        budgets[row.project_id] = ProjectBudget(
            b.project_id, b.may_retrieve, b.quota_bytes, b.used_bytes, b.in_flight_bytes + row.expected_bytes, b.closed_reason
        )


def _study_uids(session: Session, ids: list[int]) -> set[str]:
    if not ids:
        return set()
    return set(session.execute(select(Request.study_uid).where(Request.id.in_(ids))).scalars())


def _store_queue_reasons(session: Session, pacs_id: str, reasons: dict[str, str], now: datetime) -> None:
    """One row per project on this PACS, written only when its reason changed."""
    stored = {row.project_id: row for row in session.execute(
        select(QueueReason).where(QueueReason.pacs_id == pacs_id)).scalars()}
    for project_id in sorted(reasons):
        row = stored.get(project_id)
        if row is None:
            session.add(QueueReason(pacs_id=pacs_id, project_id=project_id, reason=reasons[project_id], updated_at=now))
        elif row.reason != reasons[project_id]:
            row.reason, row.updated_at = reasons[project_id], now


def _cancel(session: Session, cancel: dict[int, str], now: datetime) -> dict[int, str]:
    """Cancel what the plan says can never start; returns those still queued (and so canceled)."""
    if not cancel:
        return {}
    rows = session.execute(
        select(Request).where(Request.id.in_(list(cancel)), Request.state == RequestState.SCHEDULED)
        .order_by(Request.id).with_for_update().execution_options(populate_existing=True)).scalars().all()
    for row in rows:
        reason = cancel[row.id]
        change_state(row, Event.CANCEL)
        row.ended_at = now
        row.waiting_reason = None
        row.last_error = f"canceled: {reason}"
    return {row.id: cancel[row.id] for row in rows}
