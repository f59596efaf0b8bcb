"""Forward cached studies to other DICOM nodes (XNAT, OsiriX, a research PACS).

A forward is a `Request` of kind ``forward`` in the same request log as
retrievals: it is listed, shown, canceled, retried and re-prioritised by
`services.requests` like any other. This module adds the three things only
forwards have:

* `add_forwards`, the door: the caller is a member of the project (any role)
  or a site admin, the IRB approval is active, the destination accepts the
  project, the study is in the project's cache and its patient is still on
  the allow-list. Every refusal is audited.
* `schedule_forwards`, under the same database lock as the retrieval
  scheduler: at most ``max_concurrent`` forwards per destination, projects in
  turn, priority then age inside a project (`domain.forwarding`), reading only
  the heads of each project's queue.
* `run_forward`, the worker's side: C-STORE the cached files over one
  association (`adapters.dicom.store_scu`), retry transient failures with
  backoff, judge, audit one event per study. For a ``deidentified`` project
  each instance's de-identified copy is made in memory just before its
  C-STORE (`services.export.deid`: the download's engine, key, pseudonyms and
  UIDs); instances at risk of burned-in identifiers are withheld and reported.

Destinations come from the site configuration only; `destinations` rows in
the database mirror it for foreign keys and history.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, true
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import serialize_scheduling, transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, CursorKind, Destination, Project, Request
from mi2b2.adapters.dicom.deidentify import DeidEngine, Withheld
from mi2b2.adapters.dicom.errors import TlsHandshakeFailed
from mi2b2.adapters.dicom.files import UnreadableInstance, read_instance_header
from mi2b2.adapters.dicom.scu import DicomPeer
from mi2b2.adapters.dicom.store_scu import MadeInstance, StoreProgress, StoreResult, store_files
from mi2b2.config import DestinationConfig, SiteConfig
from mi2b2.config.export_policy import ExportPolicy
from mi2b2.domain.clock import as_utc
from mi2b2.domain.forwarding import (
    SWEEP_BATCH,
    DestinationRules,
    ForwardCandidate,
    HeadsRead,
    destination_allows,
    forward_denial,
    forward_outcome,
    heads_to_read,
    plan_destination,
)
from mi2b2.domain.governance import Denial, closed_to_reads, irb_active_at, local_date
from mi2b2.domain.identifiers import looks_like_uid
from mi2b2.domain.principal import Principal
from mi2b2.domain.request_states import INITIAL, Event
from mi2b2.domain.requests import CANCELABLE, RequestKind, RequestState
from mi2b2.errors import AccessDenied, InvalidInput, Mi2b2Error, NotFound, RetriableError
from mi2b2.services import jobs, notifications
from mi2b2.services.allow_list import forward_on_allow_list
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.export import deid, screens
from mi2b2.services.export.deid import WithheldReport, policy_of
from mi2b2.services.jobs import Job
from mi2b2.services.pacs import client_tls, local_ae
from mi2b2.services.request_rows import change_state, mark_started
from mi2b2.services.requests import MAX_STUDIES_PER_CALL, PRIORITY_RANGE
from mi2b2.services.scheduler import round_robin_cursor
from mi2b2.services.search import allowed_values, load_policy

LOG = logging.getLogger(__name__)

_HINTS = {
    Denial.IRB_EXPIRED: "forwarding needs an active IRB approval; once it is renewed, the site admin updates "
                        "the project's expiry date",
    Denial.NOT_MEMBER: "ask the project lead to add you to the project",
    Denial.PROJECT_INACTIVE: "the project was removed from the site configuration",
    Denial.ADMIN_NOT_MEMBER: "a site admin who needs to forward is added to the project as a member",
}


@dataclass
class ForwardReport:
    batch_id: str
    destination_id: str
    created: list[int] = field(default_factory=list)
    already_queued: list[str] = field(default_factory=list)  # a forward of it to this destination is under way
    not_cached: list[str] = field(default_factory=list)  # not (or not those series) in the project's cache
    not_permitted: list[str] = field(default_factory=list)  # patient no longer on the IRB allow-list


@dataclass(frozen=True)
class _Study:
    study_uid: str
    patient_id: str
    accession: str
    series_uids: tuple[str, ...]  # empty: the whole study
    instances: int
    bytes: int
    pacs_id: str | None  # the PACS it came from: the allow-list names patients per institution


# --- the door --------------------------------------------------------------------------


def list_destinations(ctx: ServiceContext, who: Principal, project_id: str) -> list[dict[str, Any]]:
    """The destinations this project may forward to (members and site admins may ask)."""
    policy = load_policy(ctx, project_id)
    if who.login not in policy.members and not who.is_admin:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id,
                         detail={"reason": Denial.NOT_MEMBER.value, "operation": "list destinations"})
        raise AccessDenied(f"project {project_id!r}: {Denial.NOT_MEMBER.value}; {_HINTS[Denial.NOT_MEMBER]}")
    return [
        {"id": d.id, "name": d.name or d.id, "ae_title": d.ae_title, "host": d.host, "port": d.port,
         "max_concurrent": d.max_concurrent, "tls": d.tls is not None, "all_projects": not d.projects}
        for d in ctx.config.destinations if destination_allows(d.projects, project_id)
    ]


def add_forwards(
    ctx: ServiceContext,
    who: Principal,
    project_id: str,
    destination_id: str,
    study_uids: Sequence[str],
    series_uids: Sequence[str] | None = None,
    priority: int = 0,
) -> ForwardReport:
    """Queue one forward per study; the scheduler starts them within the destination's limit.

    With ``series_uids``, only those series of each study go (each listed
    series must be cached in one of the studies)."""
    studies = _check_input(study_uids, series_uids or (), priority)
    series = tuple(dict.fromkeys(u.strip() for u in series_uids or () if u.strip()))
    destination = _destination(ctx, project_id, destination_id)
    policy = load_policy(ctx, project_id)
    denial = forward_denial(policy, who.login, who.is_admin, local_date(ctx.clock.now(), policy.timezone))
    if denial is not None:
        _deny(ctx, who, project_id, destination_id, denial.value)
        raise AccessDenied(f"project {project_id!r}: {denial.value}; {_HINTS[denial]}")
    if not destination_allows(destination.projects, project_id):
        reason = f"destination {destination_id!r} does not accept forwards from project {project_id!r}"
        _deny(ctx, who, project_id, destination_id, reason)
        raise AccessDenied(f"{reason}; use one listed by `mi2b2 destinations {project_id}`, or ask the site "
                           "admin to add the project to that destination's projects")

    report = ForwardReport(batch_id=str(uuid.uuid4()), destination_id=destination_id)
    originals = screens.study_originals(ctx, project_id, studies)  # a de-identified project's screens' pseudonyms
    studies = list(dict.fromkeys(screens.resolve(studies, originals)))
    series = tuple(screens.resolve(series, screens.series_originals(ctx, project_id, studies, series)))
    cached = _cached(ctx, project_id, studies, series)
    unknown_series = set(series) - {s for study in cached.values() for s in study.series_uids}
    if unknown_series:
        raise InvalidInput(f"series {sorted(unknown_series)[0]!r} is not in the project's cache for the studies "
                           f"named; see `mi2b2 cache show {project_id} STUDY_UID`")
    busy = _queued(ctx, project_id, destination_id, studies)
    patients_by_pacs: dict[str | None, set[str]] = defaultdict(set)
    for found in cached.values():
        patients_by_pacs[found.pacs_id].add(found.patient_id)
    allowed_by_pacs = {pacs_id: allowed_values(ctx, project_id, pacs_id, patients)
                       for pacs_id, patients in patients_by_pacs.items()}  # one look-up per PACS, not per study
    allowed = {uid for uid, s in cached.items() if s.patient_id in allowed_by_pacs[s.pacs_id]}
    wanted: list[_Study] = []
    for study_uid in studies:
        study = cached.get(study_uid)
        if study is None:
            report.not_cached.append(study_uid)
        elif study_uid in busy:
            report.already_queued.append(study_uid)
        elif study_uid not in allowed:
            report.not_permitted.append(study_uid)
            ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id, patient_id=study.patient_id,
                             study_uid=study_uid, detail={"reason": Denial.PATIENT_NOT_ALLOWED.value,
                                                          "operation": "forward", "destination": destination_id})
        else:
            wanted.append(study)
    if report.not_permitted:
        # As at every read door: a withdrawn patient's images go nowhere, and the call says why.
        raise AccessDenied(f"study {screens.as_named(report.not_permitted, originals)[0]} of project {project_id!r}: "
                           f"{Denial.PATIENT_NOT_ALLOWED.value}; it can no longer be read or forwarded and waits "
                           "for an admin to purge it (`mi2b2 admin purge`)")

    for listed in (report.not_cached, report.already_queued):
        listed[:] = screens.as_named(listed, originals)
    exported = policy_of(ctx, project_id).audit_detail()  # what the worker will apply, on record from the start
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        for study in wanted:
            row = Request(
                kind=RequestKind.FORWARD, batch_id=report.batch_id, project_id=project_id, user_login=who.login,
                destination_id=destination_id, patient_id=study.patient_id, study_uid=study.study_uid,
                accession=study.accession, series_uids=list(study.series_uids), priority=priority,
                state=INITIAL, waiting_reason="waiting for the scheduler",
                expected_instances=study.instances, expected_bytes=study.bytes, created_at=now,
            )
            session.add(row)
            session.flush()
            report.created.append(row.id)
        ctx.audit.record_many(session, [  # one batch, in the transaction that creates the requests
            AuditEntry(who, Action.FORWARD, project_id=project_id, patient_id=study.patient_id,
                       study_uid=study.study_uid,
                       detail={"request": request_id, "event": "requested", "destination": destination_id,
                               "series": len(study.series_uids), "instances": study.instances,
                               "priority": priority, "batch": report.batch_id, **exported})
            for study, request_id in zip(wanted, report.created, strict=True)])
    return report


def _check_input(study_uids: Sequence[str], series_uids: Sequence[str], priority: int) -> list[str]:
    studies = list(dict.fromkeys(u.strip() for u in study_uids if u and u.strip()))
    if not studies:
        raise InvalidInput("name at least one study (StudyInstanceUID) to forward")
    if len(studies) > MAX_STUDIES_PER_CALL:
        raise InvalidInput(f"{len(studies)} studies in one call; forward at most {MAX_STUDIES_PER_CALL} per call")
    if priority not in PRIORITY_RANGE:
        raise InvalidInput(f"priority {priority} is out of range; use {PRIORITY_RANGE.start} to {PRIORITY_RANGE.stop - 1}")
    bad = [uid for uid in (*studies, *(s.strip() for s in series_uids)) if uid and not looks_like_uid(uid)]
    if bad:
        raise InvalidInput(f"{bad[0]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return studies


def _destination(ctx: ServiceContext, project_id: str, destination_id: str) -> DestinationConfig:
    for destination in ctx.config.destinations:
        if destination.id == destination_id:
            return destination
    raise NotFound(f"no destination {destination_id!r}; list the ones project {project_id!r} may use with "
                   f"`mi2b2 destinations {project_id}`")


def _deny(ctx: ServiceContext, who: Principal, project_id: str, destination_id: str, reason: str) -> None:
    ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id,
                     detail={"reason": reason, "operation": "forward", "destination": destination_id})


def _cached(ctx: ServiceContext, project_id: str, study_uids: list[str], series: tuple[str, ...]) -> dict[str, _Study]:
    """The named studies as they are in the project's cache (only the named series, if any)."""
    found: dict[str, _Study] = {}
    with ctx.sessions() as session:
        rows = session.execute(
            select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(study_uids))
        ).scalars().all()
        for study in rows:
            if not series:
                if study.instance_count:
                    found[study.study_uid] = _Study(study.study_uid, study.patient_id, study.accession, (),
                                                    study.instance_count, study.bytes, study.pacs_id)
                continue
            per_series = session.execute(
                select(CachedInstance.series_uid, func.count(), func.coalesce(func.sum(CachedInstance.bytes), 0))
                .where(CachedInstance.cached_study_id == study.id, CachedInstance.series_uid.in_(series))
                .group_by(CachedInstance.series_uid)
            ).all()
            if per_series:
                found[study.study_uid] = _Study(
                    study.study_uid, study.patient_id, study.accession, tuple(sorted(s for s, _, _ in per_series)),
                    sum(int(n) for _, n, _ in per_series), sum(int(b) for _, _, b in per_series), study.pacs_id,
                )
    return found


def _queued(ctx: ServiceContext, project_id: str, destination_id: str, study_uids: list[str]) -> set[str]:
    with ctx.sessions() as session:
        return set(session.execute(
            select(Request.study_uid).where(
                Request.project_id == project_id, Request.kind == RequestKind.FORWARD,
                Request.destination_id == destination_id, Request.state.in_(list(CANCELABLE)),
                Request.study_uid.in_(study_uids),
            )
        ).scalars())


# --- scheduling ------------------------------------------------------------------------


def schedule_forwards(ctx: ServiceContext, worker_id: str) -> list[int]:
    """Start what may start now on every destination; return the started request ids.

    A tick costs what can start, not what is queued: per destination it counts the running
    forwards and reads, per project, only the heads of its queue (`domain.forwarding.forward_heads`,
    here as one indexed query per project and destination). Forwards the scheduler ends
    (canceled: IRB expired or project removed; failed: no longer allowed), at most
    `SWEEP_BATCH` a tick, are audited and their owners notified here."""
    configured = {d.id: d for d in ctx.config.destinations}
    with ctx.sessions() as session:
        # A plain read first: most ticks have no forward waiting, and need not take the scheduling lock.
        destinations = _destinations_with_queue(session, configured)
    if not destinations:
        return []
    started: list[int] = []
    ended: dict[int, tuple[RequestState, str]] = {}
    with transaction(ctx.sessions) as session:
        serialize_scheduling(session)
        now = ctx.clock.now()  # read once the lock is held, as the retrieval scheduler does
        closed = _closed_projects(ctx, session, now)
        active, busy = _running(session)
        sweep_left = SWEEP_BATCH
        for destination_id in destinations:
            dest = configured.get(destination_id)
            rules = DestinationRules(destination_id, dest is not None, dest.max_concurrent if dest else 1,
                                     frozenset(dest.projects) if dest else frozenset())
            heads: list[ForwardCandidate] = []
            for project_id in sorted(closed):
                read = heads_to_read(rules, active[destination_id], closed, project_id, sweep_left)
                if read.limit > 0:
                    rows = _heads(session, destination_id, project_id, read, now, busy[destination_id])
                    if read.ending:
                        sweep_left -= len(rows)
                    heads += rows
            if not heads:
                continue
            cursor = round_robin_cursor(session, CursorKind.DESTINATION, destination_id)
            plan = plan_destination(now, rules, active[destination_id], closed, heads, cursor.last_project_id)
            cursor.last_project_id = plan.last_project
            for request_id in plan.starts:
                mark_started(session.get_one(Request, request_id), worker_id, now)
            ended.update({request_id: (RequestState.CANCELED, f"canceled: {reason}")
                          for request_id, reason in plan.cancel.items()})
            ended.update({request_id: (RequestState.FAILED, reason) for request_id, reason in plan.fail.items()})
            started += plan.starts
        _end(ctx, session, ended, now)
    _notify(ctx, list(ended))
    return started


def _destinations_with_queue(session: Session, configured: dict[str, DestinationConfig]) -> list[str]:
    """The destinations (configured, or removed but still known) with a scheduled forward."""
    known = sorted(set(configured) | set(session.execute(select(Destination.id)).scalars()))
    # One probe each along ix_requests_forward_queue: a DISTINCT would read every queued forward.
    return [destination_id for destination_id in known if session.scalar(select(Request.id).where(
        Request.destination_id == destination_id, Request.state == RequestState.SCHEDULED,
        Request.kind == RequestKind.FORWARD).limit(1)) is not None]


def _closed_projects(ctx: ServiceContext, session: Session, now: datetime) -> dict[str, str | None]:
    """Per project, why its forwards may not run now (None: they may): forward follows the rule for reads."""
    return {
        project.id: closed_to_reads(
            project.active, irb_active_at(project.expires_on, now, ctx.config.project_zone(project.id)), True,
            ctx.config.project_data_policy(project.id))
        for project in session.execute(select(Project)).scalars()
    }


def _running(session: Session) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Per destination, how many forwards run and which studies they send (at most its cap)."""
    active: dict[str, int] = defaultdict(int)
    busy: dict[str, set[str]] = defaultdict(set)
    for destination_id, study_uid in session.execute(
        select(Request.destination_id, Request.study_uid)
        .where(Request.kind == RequestKind.FORWARD, Request.state == RequestState.PROCESSING)
    ).all():
        if destination_id is None:  # a forward always names its destination; the column is shared with retrievals
            continue
        active[destination_id] += 1
        busy[destination_id].add(study_uid)
    return active, busy


def _heads(session: Session, destination_id: str, project_id: str, read: HeadsRead, now: datetime,
           busy: set[str]) -> list[ForwardCandidate]:
    """`domain.forwarding.forward_heads` in SQL for one project and destination, read along
    ix_requests_forward_queue: at most ``read.limit`` rows in queue order."""
    allowed = true() if read.ending else forward_on_allow_list()  # forwards that end anyway need no answer
    query = select(Request.id, Request.priority, Request.created_at, Request.not_before, allowed).where(
        Request.destination_id == destination_id, Request.state == RequestState.SCHEDULED,
        Request.kind == RequestKind.FORWARD, Request.project_id == project_id,
    )
    if not read.ending:
        query = query.where(or_(Request.not_before.is_(None), Request.not_before <= now))
        if busy:
            query = query.where(Request.study_uid.not_in(sorted(busy)))
    rows = session.execute(
        query.order_by(Request.priority.desc(), Request.created_at, Request.id).limit(read.limit)).all()
    return [ForwardCandidate(rid, project_id, priority, as_utc(created), as_utc(not_before) if not_before else None,
                             bool(ok))
            for rid, priority, created, not_before, ok in rows]


def _end(ctx: ServiceContext, session: Session, ended: dict[int, tuple[RequestState, str]], now: datetime) -> None:
    """End the forwards the plans end, with their audit rows in the same transaction. Locked in
    id order, as every multi-row lock on requests is taken; one a user ended meanwhile is left
    as it is (and dropped from ``ended``)."""
    rows = session.execute(
        select(Request).where(Request.id.in_(list(ended)), Request.state == RequestState.SCHEDULED)
        .order_by(Request.id).with_for_update().execution_options(populate_existing=True)
    ).scalars().all() if ended else []
    for request_id in set(ended) - {row.id for row in rows}:
        del ended[request_id]
    for row in rows:
        state, reason = ended[row.id]
        change_state(row, Event.CANCEL if state == RequestState.CANCELED else Event.REFUSE)
        row.last_error = reason
        row.ended_at = now
        row.waiting_reason = None
    ctx.audit.record_many(session, [
        AuditEntry("scheduler", Action.FORWARD, Outcome.DENIED, project_id=row.project_id, patient_id=row.patient_id,
                   study_uid=row.study_uid, detail={"request": row.id, "event": str(ended[row.id][0]),
                                                    "reason": ended[row.id][1], "destination": row.destination_id})
        for row in rows])


def _notify(ctx: ServiceContext, request_ids: list[int]) -> None:
    if not request_ids:
        return
    try:
        notifications.on_requests_ended(ctx, request_ids)
    except Exception:
        # A notice that could not be written must not stop scheduling; the requests' states are committed.
        LOG.exception("requests %s: notification failed", ", ".join(map(str, request_ids[:10])))


# --- running one forward ---------------------------------------------------------------


def run_forward(ctx: ServiceContext, request_id: int) -> str:
    """C-STORE one started forward to its destination; return the request's state afterwards."""
    job = jobs.load(ctx, request_id, RequestKind.FORWARD)
    if job is None:
        return RequestState.CANCELED
    dest = next((d for d in ctx.config.destinations if d.id == job.target_id), None)
    if dest is None:
        return jobs.end(ctx, job, RequestState.FAILED, f"destination {job.target_id!r} is no longer configured",
                        record=_record())
    policy = policy_of(ctx, job.project_id)  # the policy now, also for a forward queued before it changed
    paths = _files(ctx, job)
    copies = _Copies.start(ctx, policy, job, paths) if policy.deidentified else None
    watch = jobs.Watch(ctx, job)
    LOG.info("request %s: forwarding %d instances to %s%s", job.request_id, len(paths), dest.id,
             " de-identified" if copies else "")
    try:
        result = store_files(local_ae(ctx.config), peer_for_destination(dest, ctx.config), dest.id,
                             paths if copies is None else copies.instances(paths),
                             should_cancel=watch.should_cancel, on_progress=_progress(ctx, job, watch, len(paths)))
    except RetriableError as exc:
        return jobs.back_off(ctx, job, exc, dest.retries.to_domain(), _record(policy=policy))
    except Mi2b2Error as exc:
        return jobs.end(ctx, job, RequestState.FAILED, str(exc), record=_record(expected=len(paths), policy=policy),
                        security=isinstance(exc, TlsHandshakeFailed) and exc.security)
    expected = len(paths) - result.skipped  # withheld instances are reported, not expected at the destination
    record = _record(result, expected, policy, copies.report if copies else None)
    if result.canceled:
        return jobs.end(ctx, job, RequestState.CANCELED, watch.cancel_reason, status=result.last_status, record=record)
    if copies is not None and copies.report.withheld and expected == 0:
        return jobs.end(ctx, job, RequestState.FAILED, f"nothing forwarded: {copies.summary(0)}",
                        status=result.last_status, record=record)
    outcome = forward_outcome(expected, result.stored, result.failed, result.reasons[0] if result.reasons else None)
    reason = outcome.reason
    if copies is not None and copies.report.withheld:
        reason = f"{reason}; {copies.summary(result.stored)}" if reason else copies.summary(result.stored)
    return jobs.end(ctx, job, outcome.state, reason, status=result.last_status, record=record)


@dataclass
class _Copies:
    """A de-identified forward's copies, each made just before its C-STORE, and what was withheld."""

    engine: DeidEngine
    report: WithheldReport

    @classmethod
    def start(cls, ctx: ServiceContext, policy: ExportPolicy, job: Job, paths: list[Path]) -> _Copies:
        engine = deid.engine_for(ctx, policy)
        if paths:
            # The honest broker's table, as a download of the study records it (the same pseudonyms).
            try:
                header = read_instance_header(paths[0])
                patient, issuer = header.patient_id, header.issuer
            except UnreadableInstance:  # it will be withheld as unreadable; the request names the patient
                patient, issuer = job.patient_id, ""
            deid.record_mappings(ctx, job.project_id, [
                ("patient", f"{issuer}/{patient}" if issuer else patient,
                 engine.pseudonyms.patient_id(patient, issuer)),
                ("study", job.study_uid, engine.pseudonyms.uid(job.study_uid))])
        return cls(engine, WithheldReport(policy))

    def instances(self, paths: list[Path]) -> list[MadeInstance]:
        return [MadeInstance(path, self._maker(path)) for path in paths]

    def _maker(self, path: Path) -> Callable[[], bytes | None]:
        def make() -> bytes | None:
            copy = deid.deidentified_copy(self.engine, path)
            if isinstance(copy, Withheld):
                self.report.add(copy)
                return None
            self.report.exported += 1
            return copy

        return make

    def summary(self, stored: int) -> str:
        """Forwarded and withheld counts, and the withheld series by pseudonymous UID: no identifier in it."""
        series = "; ".join(f"series {entry['series_uid'] or '(unreadable)'} ({entry['modality'] or '?'}, "
                           f"{entry['instances']} instances: {entry['reason']})"
                           for entry in self.report.by_series.values())
        return f"forwarded {stored} instances de-identified; {self.report.withheld} withheld: {series}"


def peer_for_destination(dest: DestinationConfig, config: SiteConfig) -> DicomPeer:
    t = dest.timeouts
    tls = client_tls(config, dest.tls, f"destinations[{dest.id!r}].tls", "destination")
    return DicomPeer(dest.ae_title, dest.host, dest.port, t.connect, t.acse, t.dimse, t.network, tls)


def _files(ctx: ServiceContext, job: Job) -> list[Path]:
    """The cached files of the study (or its chosen series), in series and instance order."""
    query = (
        select(CachedInstance.relative_path)
        .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
        .where(CachedStudy.project_id == job.project_id, CachedStudy.study_uid == job.study_uid)
    )
    if job.series_uids:
        query = query.where(CachedInstance.series_uid.in_(list(job.series_uids)))
    with ctx.sessions() as session:
        relative = session.execute(
            query.order_by(CachedInstance.series_uid, CachedInstance.instance_number, CachedInstance.id)
        ).scalars().all()
    store = cache_store(ctx)
    return [store.absolute(path) for path in relative]


def _progress(ctx: ServiceContext, job: Job, watch: jobs.Watch, expected: int) -> Callable[[StoreProgress], None]:
    def write(p: StoreProgress) -> None:
        if not watch.progress_due():
            return
        with transaction(ctx.sessions) as session:
            row = session.get_one(Request, job.request_id)
            row.expected_instances = expected
            row.received, row.failed, row.warnings, row.bytes = p.stored, p.failed, p.warnings + p.converted, p.bytes

    return write


def _record(result: StoreResult | None = None, expected: int | None = None, policy: ExportPolicy | None = None,
            withheld: WithheldReport | None = None) -> jobs.Record:
    """What a forward's end writes (what the destination stored) and audits, with the export policy applied."""

    def record(row: Request) -> dict[str, object]:
        if expected is not None:
            row.expected_instances = expected
        if result is not None:
            row.received, row.failed, row.bytes = result.stored, result.failed, result.bytes
            # A conversion is worth a warning: the destination got another encoding than the cache holds.
            row.warnings = result.warnings + result.converted
        counts: dict[str, object] = {
            "expected": row.expected_instances, "stored": row.received, "failed": row.failed,
            "warnings": row.warnings, "converted": result.converted if result else 0, "bytes": row.bytes,
            "attempt": row.attempts}
        if policy is not None:
            counts.update(policy.audit_detail())
        if withheld is not None:
            counts.update(withheld=withheld.withheld, withheld_series=list(withheld.by_series.values()))
        return counts

    return record


__all__ = [
    "ForwardReport", "add_forwards", "list_destinations", "peer_for_destination", "run_forward", "schedule_forwards",
]
