"""Why a queued retrieval waits, put together when it is read.

The scheduler keeps one reason per project and PACS (the queue_reasons rows)
and writes nothing on the requests that did not change; what holds one request
back itself (its patient left the allow-list, its retry is not due, its study
is being fetched for another request, it is bigger than the project's cache)
is read from its row and the counters here, by the same rule the planner uses
(`domain.scheduler.waiting_reason`). Queued forwards likewise: the forward scheduler writes
nothing on the ones that wait, and their reason is read here by the rule it applies
(`domain.forwarding.forward_waiting_reason`); one whose patient left the allow-list says so
until it reaches the head of its queue, where the scheduler fails it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import CachedStudy, Project, QueueReason, Request
from mi2b2.domain.clock import as_utc
from mi2b2.domain.forwarding import ForwardCandidate, forward_waiting_reason
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.domain.scheduler import Candidate, waiting_reason
from mi2b2.services.allow_list import forward_on_allow_list, on_allow_list


def waiting_reasons(session: Session, rows: Sequence[Request], now: datetime,
                    destination_caps: Mapping[str, int] | None = None) -> dict[int, str]:
    """Request id -> why it waits, for the queued retrievals and forwards among ``rows`` (a page:
    a few queries whatever the queue's length). ``destination_caps``: each forward destination's
    max_concurrent, as configured."""
    return {**_retrievals(session, rows, now), **_forwards(session, rows, now, destination_caps or {})}


def _retrievals(session: Session, rows: Sequence[Request], now: datetime) -> dict[int, str]:
    queued = [r for r in rows if r.state == RequestState.SCHEDULED and r.kind == RequestKind.RETRIEVE and r.pacs_id]
    if not queued:
        return {}
    ids = [r.id for r in queued]
    projects = sorted({r.project_id for r in queued})
    uids = sorted({r.study_uid for r in queued})
    queue_reasons = {(pacs_id, project_id): reason for pacs_id, project_id, reason in session.execute(
        select(QueueReason.pacs_id, QueueReason.project_id, QueueReason.reason)
        .where(QueueReason.project_id.in_(projects)))}
    quotas = dict(session.execute(select(Project.id, Project.quota_bytes).where(Project.id.in_(projects))).all())
    used = dict(session.execute(
        select(CachedStudy.project_id, func.coalesce(func.sum(CachedStudy.bytes), 0))
        .where(CachedStudy.project_id.in_(projects)).group_by(CachedStudy.project_id)).all())
    allowed = set(session.execute(select(Request.id).where(
        Request.id.in_(ids), on_allow_list(Request.project_id, Request.pacs_id, Request.patient_id))).scalars())
    busy = {(pacs_id, study_uid) for pacs_id, study_uid in session.execute(select(Request.pacs_id, Request.study_uid).where(
        Request.state == RequestState.PROCESSING, Request.kind == RequestKind.RETRIEVE, Request.study_uid.in_(uids)))}
    reasons = {}
    for r in queued:
        candidate = Candidate(
            r.id, r.project_id, r.priority, as_utc(r.created_at), r.expected_bytes, r.id in allowed,
            as_utc(r.not_before) if r.not_before else None, (r.pacs_id, r.study_uid) in busy,
        )
        free = int(quotas.get(r.project_id, 0)) - int(used.get(r.project_id, 0))
        reasons[r.id] = waiting_reason(now, candidate, free, queue_reasons.get((r.pacs_id or "", r.project_id)))
    return reasons


def _forwards(session: Session, rows: Sequence[Request], now: datetime, caps: Mapping[str, int]) -> dict[int, str]:
    queued = [r for r in rows if r.state == RequestState.SCHEDULED and r.kind == RequestKind.FORWARD and r.destination_id]
    if not queued:
        return {}
    destinations = sorted({r.destination_id for r in queued if r.destination_id})
    running = (Request.kind == RequestKind.FORWARD, Request.state == RequestState.PROCESSING,
               Request.destination_id.in_(destinations))
    active = {destination_id: int(n) for destination_id, n in session.execute(
        select(Request.destination_id, func.count()).where(*running).group_by(Request.destination_id))}
    busy = {(destination_id, study_uid) for destination_id, study_uid in session.execute(
        select(Request.destination_id, Request.study_uid).where(
            *running, Request.study_uid.in_(sorted({r.study_uid for r in queued}))))}
    allowed = set(session.execute(select(Request.id).where(
        Request.id.in_([r.id for r in queued]), forward_on_allow_list())).scalars())
    reasons = {}
    for r in queued:
        destination_id = r.destination_id or ""
        candidate = ForwardCandidate(r.id, r.project_id, r.priority, as_utc(r.created_at),
                                     as_utc(r.not_before) if r.not_before else None, r.id in allowed,
                                     study_busy=(destination_id, r.study_uid) in busy)
        reasons[r.id] = forward_waiting_reason(now, candidate, active.get(destination_id, 0),
                                               caps.get(destination_id, 1))
    return reasons
