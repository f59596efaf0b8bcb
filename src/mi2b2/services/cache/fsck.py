"""Checking the cache: compare the index with the files, and with ``repair`` make them agree again.

The database index (CachedStudy, CachedInstance) is what quotas, listings and
downloads trust; the files are what is really there. The receiver keeps them
in step as it indexes; ``fsck`` finds and repairs whatever a crash, a full
disk or a hand on the file system left behind.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import rows_changed, transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Project, Request
from mi2b2.adapters.dicom.files import InstanceHeader, read_instance_header
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.domain.governance import Denial
from mi2b2.domain.principal import Principal
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.errors import AccessDenied, InvalidInput
from mi2b2.services.allow_list import patient_allowed
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.cache.index import index_instance
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext

MAX_LISTED_PATHS = 50  # an audit event names at most this many files; the count is always exact


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
    indexed = _compare(ctx, store, report)
    if repair and report.differences:
        _repair(ctx, who, store, report, indexed)
    ctx.audit.record(who, Action.CACHE_CHECK, detail={"repair": repair, "differences": report.differences,
                                                      **report.counts()})
    return report


def _compare(ctx: ServiceContext, store: CacheStore, report: FsckReport) -> dict[str, _Indexed]:
    """Fill in what differs between index and disk; return the index, by path."""
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
    report.stale_incoming = store.stale_incoming_files(ctx.clock.now())
    report.differences = sum(report.counts()[k] for k in (
        "missing_files", "size_mismatches", "orphan_files", "wrong_aggregates", "stale_incoming"))
    return indexed


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
    with transaction(ctx.sessions) as session:
        _drop_missing(session, store, report, indexed)
        removals += _fix_sizes(session, store, report, indexed)
        removals += _adopt_or_remove_orphans(session, store, report, who, now)
        session.flush()
        _fix_aggregates(session, report)
        report.incoming_removed = store.clean_stale_incoming(ctx.clock.now())
        _audit_removals(ctx, who, removals, session)
    return removals


def _drop_missing(session: Session, store: CacheStore, report: FsckReport, indexed: dict[str, _Indexed]) -> None:
    for path in report.missing_files:
        if _disk_size(store, path) is None:  # look again: it may have been placed since
            report.rows_dropped += rows_changed(session, delete(CachedInstance).where(CachedInstance.id == indexed[path].id))


def _fix_sizes(
    session: Session, store: CacheStore, report: FsckReport, indexed: dict[str, _Indexed]
) -> list[_Removal]:
    """The index takes a file's new size if it still holds its instance; else both go."""
    removals = []
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
    return removals


def _adopt_or_remove_orphans(
    session: Session, store: CacheStore, report: FsckReport, who: Principal, now: datetime
) -> list[_Removal]:
    """Index an unindexed file that may be there (see `_adoptable`); delete the others."""
    removals = []
    projects: set[str] = set()  # those known to exist
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
    return removals


def _fix_aggregates(session: Session, report: FsckReport) -> None:
    """Study totals from their instance rows; a study left with none goes."""
    for study, count, size in _aggregates(session):
        if count == 0:
            session.execute(delete(CachedStudy).where(CachedStudy.id == study.id))
            report.empty_studies_removed += 1
        elif (study.instance_count, study.bytes) != (count, size):
            study.instance_count, study.bytes = count, size
            report.aggregates_fixed += 1


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
