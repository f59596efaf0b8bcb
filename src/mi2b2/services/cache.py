"""The project cache: what is in it, how full it is, deleting from it, and checking it.

The database index (CachedStudy, CachedInstance) is what quotas, listings and
downloads trust; the files are what is really there. The receiver keeps them
in step one instance at a time (``index_instance``); ``fsck`` finds and
repairs whatever a crash, a full disk or a hand on the file system left
behind.

Members of a project (any role) and site admins may list and delete its
cache, even after the IRB expired: clearing out data is what an expired
protocol should still allow. Reading images is decided in
`services.data_access` (one rule for every door). Retrieval into the cache is
governed elsewhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import rows_changed, transaction
from mi2b2.adapters.db.tables import Base, CachedInstance, CachedStudy, Project, Request
from mi2b2.adapters.dicom.files import InstanceHeader, read_instance_header
from mi2b2.adapters.storage.cache_files import UID, CacheStore
from mi2b2.domain.clock import as_utc
from mi2b2.domain.governance import DataUse, Denial
from mi2b2.domain.principal import Principal
from mi2b2.domain.requests import RequestKind, RequestState, reserved_bytes
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services.allow_list import patient_allowed
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed, require_use

MAX_LISTED_PATHS = 50  # an audit event names at most this many files; the count is always exact


# views -----------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    project_id: str
    quota_bytes: int
    used_bytes: int
    in_flight_bytes: int  # still reserved by running retrievals beyond what they already wrote
    free_bytes: int  # never negative; see over_quota
    over_quota: bool
    study_count: int


@dataclass(frozen=True)
class CachedStudyView:
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    modalities: str
    description: str
    pacs_id: str | None
    instance_count: int
    bytes: int
    fetched_by: str
    fetched_at: datetime | None
    last_downloaded_by: str | None
    last_downloaded_at: datetime | None
    closed_reason: str | None = None  # why nobody may read it any more (it waits for purge); None while readable


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    instance_count: int
    bytes: int


@dataclass(frozen=True)
class StudyDetail:
    project_id: str
    study: CachedStudyView
    series_count: int
    series: list[SeriesView]


@dataclass(frozen=True)
class DeleteReport:
    project_id: str
    deleted: list[str]
    not_found: list[str]
    bytes_freed: int
    usage: Usage


@dataclass(frozen=True)
class SizeMismatch:
    path: str
    indexed_bytes: int
    disk_bytes: int


@dataclass(frozen=True)
class AggregateMismatch:
    project_id: str
    study_uid: str
    indexed_instances: int
    actual_instances: int
    indexed_bytes: int
    actual_bytes: int


@dataclass
class FsckReport:
    """What differs between index and disk (found), and what repair did (done).

    Items are cache-relative paths and UIDs, never patient names."""

    repair: bool
    missing_files: list[str] = field(default_factory=list)
    size_mismatches: list[SizeMismatch] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    wrong_aggregates: list[AggregateMismatch] = field(default_factory=list)
    stale_incoming: list[str] = field(default_factory=list)
    being_received: list[str] = field(default_factory=list)  # unindexed files of running retrievals: left alone
    rows_dropped: int = 0
    sizes_fixed: int = 0
    orphans_indexed: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    aggregates_fixed: int = 0
    empty_studies_removed: int = 0
    incoming_removed: int = 0
    differences: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "missing_files": len(self.missing_files),
            "size_mismatches": len(self.size_mismatches),
            "orphan_files": len(self.orphan_files),
            "wrong_aggregates": len(self.wrong_aggregates),
            "stale_incoming": len(self.stale_incoming),
            "being_received": len(self.being_received),
            "rows_dropped": self.rows_dropped,
            "sizes_fixed": self.sizes_fixed,
            "orphans_indexed": len(self.orphans_indexed),
            "files_deleted": len(self.files_deleted),
            "aggregates_fixed": self.aggregates_fixed,
            "empty_studies_removed": self.empty_studies_removed,
            "incoming_removed": self.incoming_removed,
        }


# indexing (the receiver's path: runs once per received file) -----------------


def cache_store(ctx: ServiceContext) -> CacheStore:
    return CacheStore(ctx.config.cache_dir())


def index_instance(
    session: Session,
    project_id: str,
    header: InstanceHeader,
    relative_path: str,
    size: int,
    now: datetime,
    fetched_by: str,
    pacs_id: str | None,
) -> bool:
    """Record a placed file in the caller's transaction; False (and no change) if it is already indexed.

    Four statements: make sure the study row exists, lock it, insert the
    instance unless present, update the study's totals. The study-row lock
    keeps concurrent receivers of one study from losing each other's counts
    on PostgreSQL (SQLite already serialises writers).
    """
    insert = _insert_for(session)
    session.execute(
        insert(CachedStudy).values(
            project_id=project_id, study_uid=header.study_uid, patient_id=header.patient_id[:64],
            patient_name=header.patient_name[:200], accession=header.accession[:64], study_date=header.study_date[:8],
            modalities="", description=header.study_description[:200], pacs_id=pacs_id, instance_count=0, bytes=0,
            fetched_by=fetched_by[:64], fetched_at=now,
        ).on_conflict_do_nothing(index_elements=["project_id", "study_uid"])
    )
    study = session.execute(
        select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == header.study_uid)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one()
    added = session.execute(
        insert(CachedInstance).values(
            cached_study_id=study.id, series_uid=header.series_uid, sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid[:64], instance_number=header.instance_number,
            relative_path=relative_path, bytes=size, received_at=now,
        ).on_conflict_do_nothing(index_elements=["cached_study_id", "sop_instance_uid"]).returning(CachedInstance.id)
    ).first()
    if added is None:
        return False
    study.instance_count += 1
    study.bytes += size
    study.modalities = _merge_modalities(study.modalities, header.modality)
    # The study row was made from the first instance; fill what it lacked.
    study.patient_name = study.patient_name or header.patient_name[:200]
    study.accession = study.accession or header.accession[:64]
    study.study_date = study.study_date or header.study_date[:8]
    study.description = study.description or header.study_description[:200]
    study.pacs_id = pacs_id or study.pacs_id
    # fetched_by/at name the latest retrieval that added instances.
    study.fetched_by = fetched_by[:64]
    study.fetched_at = now
    return True


@dataclass(frozen=True)
class Arrival:
    """An instance the receiver accepted and moved into the cache, waiting to be indexed."""

    request_id: int
    project_id: str
    header: InstanceHeader
    relative_path: str
    size: int
    fetched_by: str
    pacs_id: str | None


def index_arrivals(session: Session, arrivals: list[Arrival], now: datetime) -> int:
    """Index a batch of received instances in the caller's transaction; return how many were new.

    The set-based twin of `index_instance`, for the receiver: a few statements
    per batch instead of several per instance. Instances already indexed are
    left alone (a retry resends what an earlier attempt stored) but still count
    as received by their request."""
    if not arrivals:
        return 0
    insert = _insert_for(session)
    firsts: dict[tuple[str, str], Arrival] = {}
    for a in arrivals:
        firsts.setdefault((a.project_id, a.header.study_uid), a)
    session.execute(
        insert(CachedStudy).on_conflict_do_nothing(index_elements=["project_id", "study_uid"]),
        [_study_values(a, now) for a in firsts.values()],
    )
    studies = {}
    for project_id, study_uid in firsts:
        studies[(project_id, study_uid)] = session.execute(
            select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid)
            .with_for_update().execution_options(populate_existing=True)
        ).scalar_one()
    before = _instance_count(session, [s.id for s in studies.values()])
    session.execute(
        insert(CachedInstance).on_conflict_do_nothing(index_elements=["cached_study_id", "sop_instance_uid"]),
        [
            dict(cached_study_id=studies[(a.project_id, a.header.study_uid)].id, series_uid=a.header.series_uid,
                 sop_instance_uid=a.header.sop_instance_uid, sop_class_uid=a.header.sop_class_uid[:64],
                 instance_number=a.header.instance_number, relative_path=a.relative_path, bytes=a.size,
                 received_at=now)
            for a in arrivals
        ],
    )
    totals = dict(
        (study_id, (count, total)) for study_id, count, total in session.execute(
            select(CachedInstance.cached_study_id, func.count(), func.coalesce(func.sum(CachedInstance.bytes), 0))
            .where(CachedInstance.cached_study_id.in_([s.id for s in studies.values()]))
            .group_by(CachedInstance.cached_study_id)
        ).all()
    )
    for key, study in studies.items():
        count, total = totals.get(study.id, (0, 0))
        added = count - before.get(study.id, 0)
        study.instance_count, study.bytes = count, int(total)
        if added:
            latest = next(a for a in reversed(arrivals) if (a.project_id, a.header.study_uid) == key)
            for a in arrivals:
                if (a.project_id, a.header.study_uid) == key:
                    study.modalities = _merge_modalities(study.modalities, a.header.modality)
            study.pacs_id = latest.pacs_id or study.pacs_id
            study.fetched_by = latest.fetched_by[:64]
            study.fetched_at = now
    return sum(totals.get(s.id, (0, 0))[0] - before.get(s.id, 0) for s in studies.values())


def _instance_count(session: Session, study_ids: list[int]) -> dict[int, int]:
    return dict(session.execute(
        select(CachedInstance.cached_study_id, func.count())
        .where(CachedInstance.cached_study_id.in_(study_ids)).group_by(CachedInstance.cached_study_id)
    ).all())


def _study_values(a: Arrival, now: datetime) -> dict[str, Any]:
    h = a.header
    return dict(project_id=a.project_id, study_uid=h.study_uid, patient_id=h.patient_id[:64],
                patient_name=h.patient_name[:200], accession=h.accession[:64], study_date=h.study_date[:8],
                modalities="", description=h.study_description[:200], pacs_id=a.pacs_id, instance_count=0, bytes=0,
                fetched_by=a.fetched_by[:64], fetched_at=now)


def _insert_for(session: Session) -> Callable[[type[Base]], postgresql.Insert | sqlite.Insert]:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    # Unreachable: make_engine accepts only these two.
    raise InvalidInput(f"database {dialect!r} is not supported; use SQLite or PostgreSQL")


def _merge_modalities(current: str, modality: str) -> str:
    values = [m for m in current.split("\\") if m]
    if modality and modality not in values:
        values.append(modality)
    merged = "\\".join(values)
    return merged if len(merged) <= 64 else current


# reading -----------------------------------------------------------------------


def usage_in(session: Session, project_id: str) -> Usage:
    """A project's cache use, in the caller's session (the scheduler's cache-full check may share it)."""
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id!r}; list yours with `mi2b2 projects`")
    used, studies = session.execute(
        select(func.coalesce(func.sum(CachedStudy.bytes), 0), func.count(CachedStudy.id))
        .where(CachedStudy.project_id == project_id)
    ).one()
    running = session.execute(
        select(Request.expected_bytes, Request.bytes).where(
            Request.project_id == project_id, Request.kind == RequestKind.RETRIEVE.value,
            Request.state == RequestState.PROCESSING.value,
        )
    ).all()
    in_flight = sum(reserved_bytes(expected or 0, received or 0) for expected, received in running)
    free = project.quota_bytes - int(used) - in_flight
    return Usage(project_id, project.quota_bytes, int(used), in_flight, max(free, 0), free < 0, int(studies))


def project_usage(ctx: ServiceContext, who: Principal, project_id: str) -> Usage:
    require_member(ctx, who, project_id, "read cache usage")
    with ctx.sessions() as session:
        return usage_in(session, project_id)


def list_studies(ctx: ServiceContext, who: Principal, project_id: str) -> list[CachedStudyView]:
    """Every cached study, each saying whether (and why) it is closed to reading: what a purge would remove."""
    access = require_use(ctx, who, project_id, DataUse.LIST, "list the cache")
    closed = access.closed_reason
    with ctx.sessions() as session:
        rows = session.execute(
            select(CachedStudy, patient_still_allowed()).where(CachedStudy.project_id == project_id)
            .order_by(CachedStudy.id.desc())
        ).all()
        return [_study_view(row, closed or (None if allowed else Denial.PATIENT_NOT_ALLOWED.value))
                for row, allowed in rows]


def study_detail(ctx: ServiceContext, who: Principal, project_id: str, study_uid: str) -> StudyDetail:
    require_use(ctx, who, project_id, DataUse.DETAIL, "show a cached study")
    with ctx.sessions() as session:
        study = session.scalar(
            select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid)
        )
        if study is None:
            raise NotFound(f"study {study_uid} is not in the cache of project {project_id!r}; "
                           f"list what is with `mi2b2 cache list {project_id}`")
        series = [
            SeriesView(uid, int(count), int(size or 0))
            for uid, count, size in session.execute(
                select(CachedInstance.series_uid, func.count(CachedInstance.id), func.sum(CachedInstance.bytes))
                .where(CachedInstance.cached_study_id == study.id)
                .group_by(CachedInstance.series_uid).order_by(CachedInstance.series_uid)
            )
        ]
        return StudyDetail(project_id, _study_view(study), len(series), series)


def _study_view(row: CachedStudy, closed_reason: str | None = None) -> CachedStudyView:
    return CachedStudyView(
        study_uid=row.study_uid, patient_id=row.patient_id, patient_name=row.patient_name, accession=row.accession,
        study_date=row.study_date, modalities=row.modalities, description=row.description, pacs_id=row.pacs_id,
        instance_count=row.instance_count, bytes=row.bytes, fetched_by=row.fetched_by, fetched_at=_utc(row.fetched_at),
        last_downloaded_by=row.last_downloaded_by, last_downloaded_at=_utc(row.last_downloaded_at),
        closed_reason=closed_reason,
    )


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time mi2b2 stores is UTC."""
    return as_utc(value) if value is not None else None


def require_member(ctx: ServiceContext, who: Principal, project_id: str, operation: str) -> None:
    """Managing a project's cache: members (any project role) and site admins. An expired IRB does not matter here."""
    require_use(ctx, who, project_id, DataUse.LIST, operation)


# deleting ----------------------------------------------------------------------


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
    return DeleteReport(project_id, deleted, [u for u in wanted if u not in deleted], sum(d[3] for d in done), usage)


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


# checking ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Indexed:
    id: int
    bytes: int
    sop_uid: str
    project_id: str
    study_uid: str
    patient_id: str


@dataclass(frozen=True)
class _Removal:
    project_id: str | None
    study_uid: str | None
    patient_id: str | None
    reason: str
    path: str


def fsck(ctx: ServiceContext, who: Principal, repair: bool = False) -> FsckReport:
    """Compare the index with the files; with ``repair``, make them agree again.

    Repair drops index rows of missing files; keeps a file whose size changed
    if it still holds the instance the index names (the index takes its size),
    else removes both; indexes an unindexed file only if it sits where its
    header says, in an existing project, for a patient on that project's
    allow-list, and deletes it otherwise; recomputes study totals; removes
    the temp files of dead receivers. Files of retrievals still running are
    left alone: the receiver is about to index them.
    """
    if not who.is_admin:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, detail={"reason": "not an admin", "operation": "fsck"})
        raise AccessDenied("checking the cache needs the admin role")
    store = cache_store(ctx)
    report = FsckReport(repair=repair)
    with ctx.sessions() as session:
        indexed = {
            path: _Indexed(row_id, size, sop, project_id, study_uid, patient_id)
            for path, row_id, size, sop, project_id, study_uid, patient_id in session.execute(
                select(CachedInstance.relative_path, CachedInstance.id, CachedInstance.bytes,
                       CachedInstance.sop_instance_uid, CachedStudy.project_id, CachedStudy.study_uid,
                       CachedStudy.patient_id)
                .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
            )
        }
        report.wrong_aggregates = [
            AggregateMismatch(study.project_id, study.study_uid, study.instance_count, count, study.bytes, size)
            for study, count, size in _aggregates(session)
            if (study.instance_count, study.bytes) != (count, size)
        ]
        in_flight = _in_flight_studies(session)
    disk = dict(store.walk())
    for path, row in sorted(indexed.items()):
        if path not in disk:
            report.missing_files.append(path)
        elif disk[path] != row.bytes:
            report.size_mismatches.append(SizeMismatch(path, row.bytes, disk[path]))
    for path in sorted(set(disk) - set(indexed)):
        if _study_of(store, path) in in_flight:
            report.being_received.append(path)
        else:
            report.orphan_files.append(path)
    report.stale_incoming = store.stale_incoming_files()
    report.differences = sum(report.counts()[k] for k in (
        "missing_files", "size_mismatches", "orphan_files", "wrong_aggregates", "stale_incoming"))
    if repair and report.differences:
        _repair(ctx, who, store, report, indexed)
    ctx.audit.record(who, Action.CACHE_CHECK, detail={"repair": repair, "differences": report.differences,
                                                      **report.counts()})
    return report


def _aggregates(session: Session) -> list[tuple[CachedStudy, int, int]]:
    actual = (
        select(CachedInstance.cached_study_id.label("study_id"), func.count(CachedInstance.id).label("count"),
               func.sum(CachedInstance.bytes).label("size"))
        .group_by(CachedInstance.cached_study_id).subquery()
    )
    rows = session.execute(
        select(CachedStudy, actual.c.count, actual.c.size).outerjoin(actual, actual.c.study_id == CachedStudy.id)
        .order_by(CachedStudy.id)
    ).all()
    return [(study, int(count or 0), int(size or 0)) for study, count, size in rows]


def _in_flight_studies(session: Session) -> set[tuple[str, str]]:
    return {
        (project_id, study_uid)
        for project_id, study_uid in session.execute(
            select(Request.project_id, Request.study_uid).where(
                Request.kind == RequestKind.RETRIEVE.value, Request.state == RequestState.PROCESSING.value
            )
        )
    }


def _study_of(store: CacheStore, path: str) -> tuple[str, str] | None:
    try:
        project, study, _series, _sop = store.parse(path)
    except InvalidInput:
        return None
    return project, study


def _repair(
    ctx: ServiceContext, who: Principal, store: CacheStore, report: FsckReport, indexed: dict[str, _Indexed]
) -> list[_Removal]:
    now = ctx.clock.now()
    removals: list[_Removal] = []
    projects: set[str] = set()  # those known to exist
    with transaction(ctx.sessions) as session:
        for path in report.missing_files:
            if _disk_size(store, path) is None:  # look again: it may have been placed since
                row = indexed[path]
                report.rows_dropped += rows_changed(session, delete(CachedInstance).where(CachedInstance.id == row.id))
        for mismatch in report.size_mismatches:
            row = indexed[mismatch.path]
            header = _header(store, mismatch.path)
            size = _disk_size(store, mismatch.path)
            if header is not None and size is not None and header.sop_instance_uid == row.sop_uid:
                session.execute(update(CachedInstance).where(CachedInstance.id == row.id).values(bytes=size))
                report.sizes_fixed += 1
            else:
                session.execute(delete(CachedInstance).where(CachedInstance.id == row.id))
                report.rows_dropped += 1
                store.discard(mismatch.path)
                report.files_deleted.append(mismatch.path)
                removals.append(_Removal(row.project_id, row.study_uid, row.patient_id,
                                         "size changed and the file no longer holds its instance", mismatch.path))
        in_flight = _in_flight_studies(session)  # again: a retrieval may have started since the check
        for path in list(report.orphan_files):
            if _study_of(store, path) in in_flight:
                report.being_received.append(path)
                continue
            reason, header = _adoptable(session, store, path, projects)
            if reason is None and header is not None:
                size = _disk_size(store, path)
                project_id = path.split("/")[0]
                if size is not None and index_instance(session, project_id, header, path, size, now, who.login,
                                                       _source_pacs(session, project_id, header.study_uid)):
                    report.orphans_indexed.append(path)
                continue
            store.discard(path)
            report.files_deleted.append(path)
            project_study = _study_of(store, path)
            removals.append(_Removal(
                project_study[0] if project_study else None,
                header.study_uid if header else (project_study[1] if project_study else None),
                header.patient_id if header else None, reason or "unknown", path,
            ))
        session.flush()
        for study, count, size in _aggregates(session):
            if count == 0:
                session.execute(delete(CachedStudy).where(CachedStudy.id == study.id))
                report.empty_studies_removed += 1
            elif (study.instance_count, study.bytes) != (count, size):
                study.instance_count, study.bytes = count, size
                report.aggregates_fixed += 1
        report.incoming_removed = store.clean_stale_incoming()
        _audit_removals(ctx, who, removals, session)
    return removals


def _disk_size(store: CacheStore, path: str) -> int | None:
    """Size of the file an index row names; None if it is gone (or the row names no cache path at all)."""
    try:
        return store.size(path)
    except InvalidInput:
        return None


def _header(store: CacheStore, path: str) -> InstanceHeader | None:
    try:
        return read_instance_header(store.absolute(path))
    except InvalidInput:
        return None


def _adoptable(
    session: Session, store: CacheStore, path: str, projects: set[str]
) -> tuple[str | None, InstanceHeader | None]:
    """(why the file must go, or None if it may be indexed; its header if readable)."""
    place = _study_of(store, path)
    if place is None:
        return "not in the cache layout", None
    header = _header(store, path)
    if header is None:
        return "not a readable DICOM file", None
    project_id = place[0]
    try:
        expected = store.relative_path(project_id, header.study_uid, header.series_uid, header.sop_instance_uid)
    except InvalidInput:
        expected = None
    if expected != path:
        return "its header does not match its place in the cache", header
    if project_id not in projects:
        if session.get(Project, project_id) is None:
            return "no such project", header
        projects.add(project_id)
    if not patient_allowed(session, project_id, _source_pacs(session, project_id, header.study_uid), header.patient_id):
        return Denial.PATIENT_NOT_ALLOWED.value, header
    return None, header


def _source_pacs(session: Session, project_id: str, study_uid: str) -> str | None:
    """The PACS an orphan file's study came from (its study row, else its latest retrieval): the
    allow-list names patients per institution."""
    pacs_id = session.scalar(select(CachedStudy.pacs_id).where(
        CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid))
    if pacs_id is None:
        pacs_id = session.scalar(select(Request.pacs_id).where(
            Request.project_id == project_id, Request.study_uid == study_uid, Request.kind == RequestKind.RETRIEVE,
        ).order_by(Request.id.desc()).limit(1))
    return pacs_id


def _audit_removals(ctx: ServiceContext, who: Principal, removals: list[_Removal], session: Session) -> None:
    """One event per (project, study, patient, reason), in the repair's transaction."""
    groups: dict[tuple[str | None, str | None, str | None, str], list[str]] = defaultdict(list)
    for removal in removals:
        groups[(removal.project_id, removal.study_uid, removal.patient_id, removal.reason)].append(removal.path)
    ctx.audit.record_many(session, [
        AuditEntry(who, Action.DELETE, project_id=project_id, patient_id=patient_id, study_uid=study_uid,
                   detail={"by": "fsck", "reason": reason, "files": len(paths), "paths": paths[:MAX_LISTED_PATHS],
                           "security": reason == Denial.PATIENT_NOT_ALLOWED.value})
        for (project_id, study_uid, patient_id, reason), paths in groups.items()])
