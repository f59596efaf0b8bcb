"""Why a queued retrieval waits, put together when it is read.

The scheduler keeps one reason per project and PACS (the queue_reasons rows)
and writes nothing on the requests that did not change; what holds one request
back itself (its patient left the allow-list, its retry is not due, its study
is being fetched for another request, it is bigger than the project's cache)
is read from its row and the counters here, by the same rule the planner uses
(`domain.scheduler.waiting_reason`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import CachedStudy, Project, QueueReason, Request
from mi2b2.domain.clock import as_utc
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.domain.scheduler import Candidate, waiting_reason
from mi2b2.services.allow_list import on_allow_list


def waiting_reasons(session: Session, rows: Sequence[Request], now: datetime) -> dict[int, str]:
    """Request id -> why it waits, for the queued retrievals among ``rows`` (a page: a few
    queries whatever the queue's length)."""
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
