"""Reading a project's cache: how full it is, what studies it holds, and one study's series.

Members of a project (any role) and site admins may list its cache, even
after the IRB expired: clearing out data is what an expired protocol should
still allow. Reading images is decided in `services.data_access` (one rule
for every door). In a de-identified project both screens show studies under the
pseudonyms its downloads use (`services.export.screens`), and take them back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Project, Request
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.domain.clock import as_utc
from mi2b2.domain.governance import DataUse, Denial
from mi2b2.domain.principal import Principal
from mi2b2.domain.requests import RequestKind, RequestState, reserved_bytes
from mi2b2.errors import NotFound
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed, require_use
from mi2b2.services.export import screens
from mi2b2.services.export.screens import Screen


def cache_store(ctx: ServiceContext) -> CacheStore:
    """The cache's files, where this site keeps them."""
    return CacheStore(ctx.config.cache_dir())


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
        views = [_study_view(row, closed or (None if allowed else Denial.PATIENT_NOT_ALLOWED.value))
                 for row, allowed in rows]
        stored = {row.study_uid: row.patient_id_issuer for row, _allowed in rows}
    screen = screens.cache_screen(ctx, project_id)
    if screen.pseudonyms is None:
        return views
    issuers = screens.known_issuers(ctx, project_id, stored)
    screens.shown(ctx, who, screen, "cache list", len(views),
                  [pair for v in views for pair in _pairs(screen, v, issuers[v.study_uid])])
    return [_on_screen(screen, view, issuers[view.study_uid]) for view in views]


def study_detail(ctx: ServiceContext, who: Principal, project_id: str, study_uid: str) -> StudyDetail:
    require_use(ctx, who, project_id, DataUse.DETAIL, "show a cached study")
    original = screens.study_originals(ctx, project_id, [study_uid]).get(study_uid, study_uid)
    with ctx.sessions() as session:
        study = session.scalar(
            select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == original)
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
        view = _study_view(study)
        stored = {study.study_uid: study.patient_id_issuer}
    screen = screens.cache_screen(ctx, project_id)
    if screen.pseudonyms is None:
        return StudyDetail(project_id, view, len(series), series)
    issuer = screens.known_issuers(ctx, project_id, stored)[view.study_uid]
    screens.shown(ctx, who, screen, "cached study", 1, _pairs(screen, view, issuer))
    return StudyDetail(project_id, _on_screen(screen, view, issuer), len(series),
                       [replace(s, series_uid=screen.uid(s.series_uid)) for s in series])


def _on_screen(screen: Screen, view: CachedStudyView, issuer: str) -> CachedStudyView:
    """A de-identified project's study as its downloads name it: nothing identifying left."""
    return replace(view, study_uid=screen.uid(view.study_uid), patient_id=screen.patient(view.patient_id, issuer),
                   patient_name="", accession="", description="",
                   study_date=screen.date(view.patient_id, issuer, view.study_date))


def _pairs(screen: Screen, view: CachedStudyView, issuer: str) -> list[tuple[str, str, str]]:
    return [screen.patient_pair(view.patient_id, issuer), ("study", view.study_uid, screen.uid(view.study_uid))]


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

