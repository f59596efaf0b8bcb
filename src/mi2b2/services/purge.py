"""Purge: delete the cached studies the data policy has closed to every reader.

A study is closed when its project's access has ended and the data policy is
``closed`` (IRB expired at the project's local date, or project removed from
the configuration), or when its patient left the allow-list (whatever the
policy). The same rule as the read doors (`domain.governance.closed_to_reads`).

A dry run (the default) lists what would go and records that it looked; with
``apply`` the studies are deleted (files and index) and each deletion is
audited with its reason. Studies being retrieved right now are left for the
next purge: the receiver would keep writing into them. Site admins only:
purging is managing, and needs no membership of the project.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedStudy, Project, Request
from mi2b2.domain.governance import Denial, closed_to_reads, irb_active_at
from mi2b2.domain.principal import Principal
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.errors import AccessDenied
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.cache.deletion import remove_studies
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed


@dataclass(frozen=True)
class ClosedStudy:
    project_id: str
    study_uid: str
    patient_id: str
    instances: int
    bytes: int
    reason: str


@dataclass
class PurgeReport:
    applied: bool
    studies: list[ClosedStudy] = field(default_factory=list)  # closed: deleted if applied, else what would go
    busy: list[ClosedStudy] = field(default_factory=list)  # closed but being retrieved now: left for next time

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies)

    def counts(self) -> dict[str, int]:
        return {"studies": len(self.studies), "bytes": self.bytes, "busy": len(self.busy),
                "projects": len({s.project_id for s in self.studies})}


def closed_studies(ctx: ServiceContext) -> list[ClosedStudy]:
    """Every cached study no one may read any more, with the reason."""
    now = ctx.clock.now()
    found: list[ClosedStudy] = []
    with ctx.sessions() as session:
        for project in session.scalars(select(Project).order_by(Project.id)):
            project_reason = closed_to_reads(
                project.active, irb_active_at(project.expires_on, now, ctx.config.project_zone(project.id)), True,
                ctx.config.project_data_policy(project.id))
            rows = session.execute(
                select(CachedStudy.study_uid, CachedStudy.patient_id, CachedStudy.instance_count, CachedStudy.bytes,
                       patient_still_allowed())
                .where(CachedStudy.project_id == project.id).order_by(CachedStudy.id)
            ).all()
            for study_uid, patient_id, instances, size, allowed in rows:
                reason = project_reason or (None if allowed else Denial.PATIENT_NOT_ALLOWED.value)
                if reason is not None:
                    found.append(ClosedStudy(project.id, study_uid, patient_id, instances, size, reason))
    return found


def purge(ctx: ServiceContext, who: Principal, apply: bool = False) -> PurgeReport:
    if not who.is_admin:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, detail={"reason": "not an admin", "operation": "purge"})
        raise AccessDenied("purging the cache needs the admin role")
    closed = closed_studies(ctx)
    report = PurgeReport(applied=apply)
    if not apply:
        report.studies = closed
        ctx.audit.record(who, Action.DELETE, detail={"by": "purge", "dry_run": True, **report.counts(),
                                                     "reasons": dict(Counter(s.reason for s in closed))})
        return report
    store = cache_store(ctx)
    by_key = {(s.project_id, s.study_uid): s for s in closed}
    with transaction(ctx.sessions) as session:
        running = {(project_id, study_uid) for project_id, study_uid in session.execute(
            select(Request.project_id, Request.study_uid).where(
                Request.kind == RequestKind.RETRIEVE.value, Request.state == RequestState.PROCESSING.value)
            .order_by(Request.id).with_for_update()  # in id order, as every multi-row lock on requests
        ).all()}
        report.busy = [s for key, s in by_key.items() if key in running]
        for project_id in sorted({s.project_id for s in closed}):
            uids = [s.study_uid for s in closed if s.project_id == project_id and (project_id, s.study_uid) not in running]
            if not uids:
                continue
            rows = session.scalars(
                select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(uids))
                .order_by(CachedStudy.id).with_for_update()
            ).all()
            for study_uid, _patient, _instances, _size, _freed in remove_studies(session, store, rows):
                report.studies.append(by_key[(project_id, study_uid)])
        # The index rows go only with their audit rows.
        ctx.audit.record_many(session, [
            *(AuditEntry(who, Action.DELETE, project_id=study.project_id, patient_id=study.patient_id,
                         study_uid=study.study_uid,
                         detail={"by": "purge", "reason": study.reason, "instances": study.instances,
                                 "bytes": study.bytes})
              for study in report.studies),
            AuditEntry(who, Action.DELETE, detail={"by": "purge", "dry_run": False, **report.counts()}),
        ])
    return report
