"""Deleting studies from a project's cache: files and index go together, audited.

Members of a project (any role) and site admins may delete from its cache,
even after the IRB expired: clearing out data is what an expired protocol
should still allow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Request
from mi2b2.adapters.storage.cache_files import UID, CacheStore
from mi2b2.domain.principal import Principal
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.errors import InvalidInput, NotFound
from mi2b2.services.audit import Action, AuditEntry
from mi2b2.services.cache.reads import Usage, cache_store, require_member, usage_in
from mi2b2.services.context import ServiceContext
from mi2b2.services.export import screens


@dataclass(frozen=True)
class DeleteReport:
    project_id: str
    deleted: list[str]
    not_found: list[str]
    bytes_freed: int
    usage: Usage


def delete_studies(ctx: ServiceContext, who: Principal, project_id: str, study_uids: Iterable[str]) -> DeleteReport:
    """Remove studies (files and index) from a project's cache; the space is free at once.

    A study that is being retrieved right now is refused as a whole call, before
    anything is deleted: the receiver would keep writing into it."""
    wanted = list(dict.fromkeys(uid.strip() for uid in study_uids if uid.strip()))
    if not wanted:
        raise InvalidInput("name at least one StudyInstanceUID to delete")
    bad = [uid for uid in wanted if len(uid) > 64 or not UID.match(uid)]
    if bad:
        raise InvalidInput(f"not StudyInstanceUIDs (digits and dots): {', '.join(repr(b) for b in bad[:10])}")
    require_member(ctx, who, project_id, "delete from the cache")
    originals = screens.study_originals(ctx, project_id, wanted)  # a de-identified project's screens show pseudonyms
    named, wanted = wanted, screens.resolve(wanted, originals)
    store = cache_store(ctx)
    with transaction(ctx.sessions) as session:
        # Lock this project's queued and running retrievals of these studies, so
        # the scheduler cannot start one while the files go.
        active = session.execute(
            select(Request.id, Request.study_uid, Request.state).where(
                Request.project_id == project_id, Request.kind == RequestKind.RETRIEVE.value,
                Request.study_uid.in_(wanted),
                Request.state.in_([RequestState.SCHEDULED.value, RequestState.PROCESSING.value]),
            ).order_by(Request.id).with_for_update()
        ).all()
        running = [(request_id, uid) for request_id, uid, state in active if state == RequestState.PROCESSING]
        if running:
            ids = ", ".join(f"#{request_id}" for request_id, _uid in running)
            raise InvalidInput(
                f"{len({uid for _id, uid in running})} of these studies are being retrieved right now "
                f"(requests {ids}); cancel those requests first or wait until they end, then delete"
            )
        studies = session.scalars(
            select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(wanted))
            .order_by(CachedStudy.id).with_for_update()
        ).all()
        if not studies:
            raise NotFound(f"none of these studies is in the cache of project {project_id!r}; "
                           f"list what is with `mi2b2 cache list {project_id}`")
        done = remove_studies(session, store, studies)
        ctx.audit.record_many(session, [  # the index rows go only with their audit rows
            AuditEntry(who, Action.DELETE, project_id=project_id, patient_id=patient_id, study_uid=study_uid,
                       detail={"instances": instances, "bytes": size, "disk_bytes": freed, "by": "user"})
            for study_uid, patient_id, instances, size, freed in done])
    deleted = [d[0] for d in done]
    with ctx.sessions() as session:
        usage = usage_in(session, project_id)
    return DeleteReport(project_id, screens.as_named(deleted, originals),
                        [given for given, uid in zip(named, wanted, strict=True) if uid not in deleted],
                        sum(d[3] for d in done), usage)


def remove_studies(session: Session, store: CacheStore, studies: Iterable[CachedStudy]) -> list[tuple[str, str, int, int, int]]:
    """Delete locked study rows and their files in the caller's transaction.

    Returns (study, patient, instances, indexed bytes, bytes on disk) per study."""
    done = []
    for study in studies:
        session.execute(delete(CachedInstance).where(CachedInstance.cached_study_id == study.id))
        session.execute(delete(CachedStudy).where(CachedStudy.id == study.id))
        # Files go inside the transaction: if this fails the rows stay, and
        # any file already gone shows up in fsck as missing, never as an orphan
        # that fsck would index again.
        freed = store.delete_study(study.project_id, study.study_uid)
        done.append((study.study_uid, study.patient_id, study.instance_count, study.bytes, freed))
    return done
