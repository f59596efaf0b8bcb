"""Requests for studies (the paper's "Move to Repository") and what users do with them.

Adding a request checks the same doors as a search: the user is a member of a
project whose IRB is active and that may reach the PACS's institution, and
the study's patient (asked of the PACS, not taken from the caller) is on the
project's allow-list. The request then waits for the scheduler.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedStudy, ProjectMember, QueueReason, Request
from mi2b2.adapters.dicom.errors import DimseFailure
from mi2b2.domain.identifiers import looks_like_uid
from mi2b2.domain.mrn import issuer_conflicts
from mi2b2.domain.principal import Principal
from mi2b2.domain.request_states import INITIAL, Event
from mi2b2.domain.requests import (
    CANCELABLE,
    ENDED,
    RETRYABLE,
    RequestKind,
    RequestState,
    TransitionRefused,
    allowed_changes,
    check_cancel,
    check_priority_change,
    check_retry,
    estimated_bytes,
)
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services import notifications
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.context import FindSessionPort, ServiceContext
from mi2b2.services.export import screens
from mi2b2.services.export.screens import Screen
from mi2b2.services.request_rows import change_state
from mi2b2.services.search import STUDY_ROOT, Door, allowed_values, count_instances, int_or_none, load_policy, open_door
from mi2b2.services.waiting import waiting_reasons

MAX_STUDIES_PER_CALL = 5000
PRIORITY_RANGE = range(-9, 10)


@dataclass(frozen=True)
class StudyPick:
    study_uid: str
    series_uids: tuple[str, ...] = ()


@dataclass
class AddReport:
    batch_id: str
    created: list[int] = field(default_factory=list)
    already_cached: list[str] = field(default_factory=list)
    already_queued: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    not_permitted: list[str] = field(default_factory=list)  # patient not on the IRB allow-list


@dataclass(frozen=True)
class _Found:
    patient_id: str
    accession: str
    expected_instances: int
    issuer: str = ""


def add_requests(
    ctx: ServiceContext, who: Principal, project_id: str, pacs_id: str, picks: Sequence[StudyPick], priority: int = 0
) -> AddReport:
    _check_picks(picks, priority)
    door = open_door(ctx, who, project_id, pacs_id, operation="request studies")
    report = AddReport(batch_id=str(uuid.uuid4()))
    busy, cached = _queued_and_cached(ctx, project_id, [p.study_uid for p in picks])
    to_find = []
    for pick in picks:
        if pick.study_uid in busy:
            report.already_queued.append(pick.study_uid)
        elif pick.study_uid in cached and not pick.series_uids:
            report.already_cached.append(pick.study_uid)
        else:
            to_find.append(pick)
    found = _look_up(ctx, door, to_find)
    for pick in to_find:
        study = found.get(pick.study_uid)
        if study is None:
            report.not_found.append(pick.study_uid)
        elif (refusal := _patient_refusal(ctx, door, study)) is not None:
            report.not_permitted.append(pick.study_uid)
            ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id, pacs_id=pacs_id,
                             patient_id=study.patient_id, study_uid=pick.study_uid,
                             detail={"reason": refusal, "operation": "request study"})
    wanted = [p for p in to_find if p.study_uid in found and p.study_uid not in report.not_permitted]
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        for pick in wanted:
            study = found[pick.study_uid]
            row = Request(
                kind=RequestKind.RETRIEVE, batch_id=report.batch_id, project_id=project_id, user_login=who.login,
                pacs_id=pacs_id, patient_id=study.patient_id, study_uid=pick.study_uid, accession=study.accession,
                series_uids=list(pick.series_uids), priority=priority, state=INITIAL,
                waiting_reason="waiting for the scheduler", expected_instances=study.expected_instances,
                expected_bytes=estimated_bytes(study.expected_instances, 0, 0), created_at=now,
            )
            session.add(row)
            session.flush()
            report.created.append(row.id)
        ctx.audit.record_many(session, [  # one batch, in the transaction that creates the requests
            AuditEntry(who, Action.RETRIEVE, project_id=project_id, pacs_id=pacs_id,
                       patient_id=found[pick.study_uid].patient_id, study_uid=pick.study_uid,
                       detail={"request": request_id, "event": "requested", "series": len(pick.series_uids),
                               "priority": priority, "batch": report.batch_id})
            for pick, request_id in zip(wanted, report.created, strict=True)])
    return report


MAX_PAGE = 1000


@dataclass(frozen=True)
class RequestFilter:
    """What the request log asks of the server: each field empty means any."""

    states: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    patient_id: str = ""


@dataclass
class RequestPage:
    """One page of a project's requests, newest first, and the counts per state of everything
    the filter matches apart from its states (what ticking a state would show)."""

    rows: list[dict[str, Any]]
    next_before: int | None  # pass as ``before`` for the next (older) page; None on the last page
    state_counts: dict[str, int]
    total: int  # requests the whole filter matches


def list_requests(
    ctx: ServiceContext, who: Principal, project_id: str, states: Iterable[str] = (), limit: int = 1000
) -> list[dict[str, Any]]:
    """The newest ``limit`` requests of the project (all pages of `request_page` in one list)."""
    return request_page(ctx, who, project_id, RequestFilter(states=tuple(states)), limit=limit, counts=False).rows


def request_page(
    ctx: ServiceContext, who: Principal, project_id: str, wanted: RequestFilter = RequestFilter(),
    before: int | None = None, limit: int = 100, counts: bool = True,
) -> RequestPage:
    """A page of the request log: keyset on the id (newest first), so page 1,000 costs what
    page 1 does; filtered in SQL along the (project, state, id) and (project, id) indexes."""
    _require_member(ctx, who, project_id)
    _check_filter(wanted)
    if limit < 1:
        raise InvalidInput("ask for at least one request per page")
    base = [Request.project_id == project_id]
    if wanted.kinds:
        base.append(Request.kind.in_(wanted.kinds))
    if wanted.users:
        base.append(Request.user_login.in_(wanted.users))
    screen = screens.request_screen(ctx, who, project_id)
    if wanted.patient_id and screen.pseudonyms is not None:  # a member filters by the pseudonym shown
        base.append(Request.patient_id.in_(screens.patient_originals(ctx, project_id, wanted.patient_id)))
    elif wanted.patient_id:
        base.append(Request.patient_id == wanted.patient_id)
    chosen = [*base, Request.state.in_(wanted.states)] if wanted.states else base
    page = select(Request).where(*chosen)
    if before is not None:
        page = page.where(Request.id < before)
    now = ctx.clock.now()
    with ctx.sessions() as session:
        rows = session.execute(page.order_by(Request.id.desc()).limit(limit + 1)).scalars().all()
        more = len(rows) > limit
        rows = rows[:limit]
        reasons = waiting_reasons(session, rows, now, _destination_caps(ctx))
        issuers = _issuers(ctx, screen, project_id, rows)
        views = [_on_screen(screen, session, r, request_view(r, reasons.get(r.id)), issuers) for r in rows]
        state_counts: dict[str, int] = {}
        if counts:
            state_counts = {state: int(n) for state, n in session.execute(
                select(Request.state, func.count()).where(*base).group_by(Request.state)).all()}
    total = sum(n for state, n in state_counts.items() if not wanted.states or state in wanted.states)
    screens.shown(ctx, who, screen, "request log", len(views),
                  [pair for r in rows for pair in _pairs(screen, r, issuers)])
    return RequestPage(views, rows[-1].id if more and rows else None, state_counts, total)


def _check_filter(wanted: RequestFilter) -> None:
    for values, known, what in ((wanted.states, {s.value for s in RequestState}, "request state"),
                                (wanted.kinds, {k.value for k in RequestKind}, "request kind")):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise InvalidInput(f"unknown {what} {unknown[0]!r}; use one of {', '.join(sorted(known))}")


def requests_version(ctx: ServiceContext, who: Principal, project_id: str) -> str:
    """A short fingerprint of the project's request list, for the live request log:
    it changes whenever something list_requests shows changes, so a client re-fetches only then.

    Queued and running requests: one aggregate, grouped by state and waiting reason. Per
    group it sums the ids (a request moving between groups shows), priority weighted by id
    (two requests swapping priorities show) and every counter a user sees; and the
    project's queue reasons, from which its queued retrievals' reasons are read. Ended
    requests change only by leaving their state (retry), so their count and id sum per
    state (read from the (project, state, id) index alone) say it: a project with 200,000
    ended requests costs little more per tick than one with 20. Checked at list_requests'
    door on every call, so a member taken off the project stops getting updates at the next tick."""
    _require_member(ctx, who, project_id)
    active = (
        select(
            Request.state, Request.waiting_reason, func.count(), func.sum(Request.id),
            func.sum(Request.id * Request.priority), func.sum(Request.received), func.sum(Request.failed),
            func.sum(Request.warnings), func.sum(Request.bytes), func.sum(Request.attempts),
            func.sum(Request.expected_instances), func.sum(Request.expected_bytes),
            func.sum(case((Request.cancel_requested.is_(True), Request.id), else_=0)),
            func.sum(func.length(func.coalesce(Request.last_error, ""))), func.max(Request.last_status),
            func.max(Request.started_at), func.max(Request.ended_at), func.max(Request.not_before),
        )
        .where(Request.project_id == project_id, Request.state.in_(list(CANCELABLE)))
        .group_by(Request.state, Request.waiting_reason)
        .order_by(Request.state, Request.waiting_reason)
    )
    ended = (
        select(Request.state, func.count(), func.sum(Request.id))
        .where(Request.project_id == project_id, Request.state.in_(list(ENDED)))
        .group_by(Request.state).order_by(Request.state)
    )
    with ctx.sessions() as session:
        rows = [*session.execute(active).all(), *session.execute(ended).all(), *session.execute(
            select(QueueReason.pacs_id, QueueReason.reason).where(QueueReason.project_id == project_id)
            .order_by(QueueReason.pacs_id)).all()]
    text = "\n".join("|".join(str(value) for value in row) for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _destination_caps(ctx: ServiceContext) -> dict[str, int]:
    return {d.id: d.max_concurrent for d in ctx.config.destinations}


def show_request(ctx: ServiceContext, who: Principal, request_id: int) -> dict[str, Any]:
    with ctx.sessions() as session:
        row = session.get(Request, request_id)
    if row is None:
        raise NotFound(f"no request {request_id}; list them with `mi2b2 request list PROJECT`")
    project_id = row.project_id
    # Checked before the read session opens: on SQLite every session holds the write lock.
    _require_member(ctx, who, project_id)
    screen = screens.request_screen(ctx, who, project_id)
    issuers = _issuers(ctx, screen, project_id, [row])
    with ctx.sessions() as session:
        row = session.get(Request, request_id)
        if row is None:
            raise NotFound(f"no request {request_id}; list them with `mi2b2 request list PROJECT`")
        waiting = waiting_reasons(session, [row], ctx.clock.now(), _destination_caps(ctx)).get(row.id)
        view = _on_screen(screen, session, row, request_view(row, waiting), issuers)
        pairs = _pairs(screen, row, issuers)
    screens.shown(ctx, who, screen, "request", 1, pairs)
    return view


def _issuers(ctx: ServiceContext, screen: Screen, project_id: str, rows: Sequence[Request]) -> dict[str, str]:
    """The Issuer of Patient ID the files of the requests' cached studies carry: a member's request log names
    a patient as the cache list and the files do. A study not (or no longer) cached has none ("")."""
    if screen.pseudonyms is None:
        return {}
    return screens.cached_issuers(ctx, project_id, {row.study_uid for row in rows})


def _on_screen(screen: Screen, session: Session, row: Request, view: dict[str, Any],
               issuers: dict[str, str]) -> dict[str, Any]:
    """A de-identified project's request as a member sees it: pseudonyms, its error text scrubbed."""
    if screen.pseudonyms is None:
        return view
    issuer = issuers.get(row.study_uid, "")
    return {**view, "patient_id": screen.patient(row.patient_id, issuer), "study_uid": screen.uid(row.study_uid),
            "accession": "", "series_uids": [screen.uid(uid) for uid in row.series_uids or []],
            "last_error": notifications.scrub(session, row, row.last_error) if row.last_error else None}


def _pairs(screen: Screen, row: Request, issuers: dict[str, str]) -> list[tuple[str, str, str]]:
    if screen.pseudonyms is None:
        return []
    return [screen.patient_pair(row.patient_id, issuers.get(row.study_uid, "")),
            ("study", row.study_uid, screen.uid(row.study_uid))]


def cancel_requests(ctx: ServiceContext, who: Principal, request_ids: Sequence[int]) -> list[int]:
    """Scheduled requests end at once; processing ones are flagged, and the
    worker running them sends C-CANCEL and frees the slot."""
    return _change(ctx, who, request_ids, "cancel", check_cancel, _cancel)


def retry_requests(ctx: ServiceContext, who: Principal, request_ids: Sequence[int]) -> list[int]:
    _refuse_fetching_twice(ctx, request_ids)
    return _change(ctx, who, request_ids, "retry", check_retry, _retry)


def set_priority(ctx: ServiceContext, who: Principal, request_ids: Sequence[int], priority: int) -> list[int]:
    if priority not in PRIORITY_RANGE:
        raise InvalidInput(f"priority {priority} is out of range; use {PRIORITY_RANGE.start} to {PRIORITY_RANGE.stop - 1}")

    def apply(row: Request, now: Any) -> None:
        row.priority = priority

    return _change(ctx, who, request_ids, f"priority {priority}", check_priority_change, apply)


def request_view(r: Request, waiting: str | None = None) -> dict[str, Any]:
    """The row as users see it; ``waiting`` is a queued retrieval's reason as `waiting_reasons` reads it."""
    return {
        "id": r.id, "kind": r.kind, "batch_id": r.batch_id, "project_id": r.project_id, "user": r.user_login,
        "pacs_id": r.pacs_id, "destination_id": r.destination_id, "patient_id": r.patient_id,
        "study_uid": r.study_uid, "accession": r.accession, "series_uids": list(r.series_uids or []),
        "priority": r.priority, "state": r.state, "allowed": allowed_changes(r.state),
        "waiting_reason": waiting or r.waiting_reason,
        "expected_instances": r.expected_instances, "expected_bytes": r.expected_bytes, "received": r.received,
        "failed": r.failed, "warnings": r.warnings, "bytes": r.bytes, "attempts": r.attempts,
        "last_error": r.last_error, "last_status": r.last_status, "cancel_requested": r.cancel_requested,
        "created_at": r.created_at, "started_at": r.started_at, "ended_at": r.ended_at, "not_before": r.not_before,
    }


# --- helpers -------------------------------------------------------------------------


def _check_picks(picks: Sequence[StudyPick], priority: int) -> None:
    if not picks:
        raise InvalidInput("name at least one study (StudyInstanceUID) to request")
    if len(picks) > MAX_STUDIES_PER_CALL:
        raise InvalidInput(f"{len(picks)} studies in one call; send at most {MAX_STUDIES_PER_CALL} per call")
    if priority not in PRIORITY_RANGE:
        raise InvalidInput(f"priority {priority} is out of range; use {PRIORITY_RANGE.start} to {PRIORITY_RANGE.stop - 1}")
    bad = [uid for p in picks for uid in (p.study_uid, *p.series_uids) if not looks_like_uid(uid)]
    if bad:
        raise InvalidInput(f"{bad[0]!r} is not a DICOM UID (digits and dots, at most 64 characters)")


def _refuse_fetching_twice(ctx: ServiceContext, request_ids: Sequence[int]) -> None:
    """A retried retrieval must not ask the PACS again for a study another request
    is fetching, or has already brought whole into the cache."""
    with ctx.sessions() as session:
        # Only ended ones: _change refuses the others with the reason their state gives.
        rows = session.execute(select(Request.id, Request.project_id, Request.study_uid).where(
            Request.id.in_(list(request_ids)), Request.kind == RequestKind.RETRIEVE,
            Request.state.in_(list(RETRYABLE)))).all()
    by_project: dict[str, list[str]] = {}
    for _, project_id, study_uid in rows:
        by_project.setdefault(project_id, []).append(study_uid)
    taken = {project_id: _queued_and_cached(ctx, project_id, uids) for project_id, uids in by_project.items()}
    for request_id, project_id, study_uid in sorted(rows):
        busy, cached = taken[project_id]
        if study_uid in busy:
            raise InvalidInput(f"request {request_id}: its study is already being fetched by another request; "
                               "follow that one in the request log")
        if study_uid in cached:
            raise InvalidInput(f"request {request_id}: its study is already in the project's cache, "
                               "complete; nothing to fetch again")


def _queued_and_cached(ctx: ServiceContext, project_id: str, study_uids: list[str]) -> tuple[set[str], set[str]]:
    with ctx.sessions() as session:
        busy = set(session.execute(
            select(Request.study_uid).where(
                Request.project_id == project_id, Request.kind == RequestKind.RETRIEVE,
                Request.state.in_(list(CANCELABLE)), Request.study_uid.in_(study_uids),
            )
        ).scalars())
        # A study counts as cached once a retrieval of the whole study completed
        # and the study is still in the cache (a delete makes it fetchable again).
        completed = session.execute(
            select(Request.study_uid, Request.series_uids)
            .join(CachedStudy, (CachedStudy.project_id == Request.project_id) & (CachedStudy.study_uid == Request.study_uid))
            .where(Request.project_id == project_id, Request.state == RequestState.COMPLETED,
                   Request.study_uid.in_(study_uids))
        ).all()
        whole = {uid for uid, series in completed if not series}
    return busy, whole


def _look_up(ctx: ServiceContext, door: Door, picks: list[StudyPick]) -> dict[str, _Found]:
    """Ask the PACS whose study each one is and how many instances to expect."""
    found: dict[str, _Found] = {}
    if not picks:
        return found
    with ctx.open_find(ctx.config, door.pacs) as pacs:
        answers = _study_answers(pacs, [pick.study_uid for pick in picks])
        for pick in picks:
            answer = answers.get(pick.study_uid)
            if answer is None:
                continue
            found[pick.study_uid] = _Found(
                patient_id=answer.get("PatientID", ""),
                accession=answer.get("AccessionNumber", ""),
                expected_instances=_expected_instances(pacs, pick, int_or_none(answer.get("NumberOfStudyRelatedInstances"))),
                issuer=answer.get("IssuerOfPatientID", ""),
            )
    return found


UIDS_PER_FIND = 100  # studies named in one C-FIND: a 5,000-study request costs the PACS 50 queries, not 5,000


def _study_answers(pacs: FindSessionPort, uids: list[str]) -> dict[str, dict[str, str]]:
    """The PACS's STUDY-level answer for each of ``uids`` it holds, asked by List of UID matching
    (PS3.4 C.2.2.2.2). A PACS that refuses a list, or answers one with nothing, may not match
    lists: that list is asked one UID at a time, and if the PACS refused it or then found a
    study, so is every later one."""
    answers: dict[str, dict[str, str]] = {}
    unique = list(dict.fromkeys(uids))
    lists_match = True
    for start in range(0, len(unique), UIDS_PER_FIND):
        chunk = unique[start:start + UIDS_PER_FIND]
        listed: dict[str, dict[str, str]] = {}
        if lists_match and len(chunk) > 1:
            try:
                listed = _find_studies(pacs, chunk)
            except DimseFailure:  # e.g. pynetdicom's qrscp: 0xC320 for any list
                lists_match = False
        if not listed:
            for uid in chunk:
                listed |= _find_studies(pacs, [uid])
            lists_match = lists_match and not listed
        answers |= listed
    return answers


def _find_studies(pacs: FindSessionPort, uids: list[str]) -> dict[str, dict[str, str]]:
    asked = set(uids)
    answers: dict[str, dict[str, str]] = {}
    for answer in pacs.find(STUDY_ROOT, "STUDY", {
        "StudyInstanceUID": "\\".join(uids), "PatientID": "", "IssuerOfPatientID": "", "AccessionNumber": "",
        "NumberOfStudyRelatedInstances": "",
    }):
        uid = answer.get("StudyInstanceUID", "")
        if uid in asked:  # a PACS that answers with studies not asked for is not believed about them
            answers.setdefault(uid, answer)
    return answers


def _patient_refusal(ctx: ServiceContext, door: Door, study: _Found) -> str | None:
    """Why the study's patient (as its PACS names them) may not be requested, or None."""
    if issuer_conflicts(study.issuer, door.institution.issuer):
        return "the PACS names another Issuer of Patient ID than the institution's"
    if not allowed_values(ctx, door.policy.project_id, door.pacs.id, {study.patient_id}):
        return "patient not on the IRB allow-list"
    if door.mrn_format.canonical_or_none(study.patient_id) != study.patient_id:
        # The queue, the receiver and the cache know the patient by the PACS's spelling, and the
        # allow-list by the canonical one: they must be the same, or later doors would refuse.
        return "the PACS stores the MRN in another form than the institution's mrn_format gives; fix the format"
    return None


def _expected_instances(pacs: FindSessionPort, pick: StudyPick, study_count: int | None) -> int:
    if study_count is not None and not pick.series_uids:
        return study_count
    series = pick.series_uids or tuple(
        a.get("SeriesInstanceUID", "")
        for a in pacs.find(STUDY_ROOT, "SERIES", {"StudyInstanceUID": pick.study_uid, "SeriesInstanceUID": ""})
    )
    return sum(count_instances(pacs, pick.study_uid, uid) for uid in dict.fromkeys(series) if uid)


def _require_member(ctx: ServiceContext, who: Principal, project_id: str) -> str | None:
    """The caller's role in the project (None for a site admin who is not a member)."""
    policy = load_policy(ctx, project_id)
    role = policy.members.get(who.login)
    if role is None and not who.is_admin:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id,
                         detail={"reason": "not a member of the project", "operation": "requests"})
        raise AccessDenied(f"project {project_id!r}: not a member of the project")
    return role


def _change(ctx: ServiceContext, who: Principal, request_ids: Sequence[int], what: str, check: Callable[[str], None],
            apply: Callable[[Request, datetime], None]) -> list[int]:
    """Apply one user action to several requests, all or nothing."""
    ids = sorted(set(request_ids))
    if not ids:
        raise InvalidInput("name at least one request id")
    for project_id in _projects_of(ctx, ids):
        _require_member(ctx, who, project_id)
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        rows = session.execute(
            select(Request).where(Request.id.in_(ids)).order_by(Request.id).with_for_update()).scalars().all()
        leads = set(session.execute(
            select(ProjectMember.project_id).where(ProjectMember.login == who.login, ProjectMember.role == "lead")
        ).scalars())
        for row in rows:
            if row.user_login != who.login and row.project_id not in leads and not who.is_admin:
                raise AccessDenied(
                    f"request {row.id} belongs to {row.user_login}; only they, a project lead or an admin may {what} it"
                )
            try:
                check(row.state)
            except TransitionRefused as exc:
                raise InvalidInput(f"request {row.id}: {exc}") from None
            apply(row, now)
        summary = [(r.id, r.project_id, r.patient_id, r.study_uid, r.kind, r.state) for r in rows]
        ctx.audit.record_many(session, [
            AuditEntry(who, Action.FORWARD if kind == RequestKind.FORWARD else Action.RETRIEVE, project_id=project_id,
                       patient_id=patient_id, study_uid=study_uid, detail={"request": request_id, "event": what})
            for request_id, project_id, patient_id, study_uid, kind, _ in summary])
    if ended := [request_id for request_id, *_, state in summary if state in ENDED]:
        notifications.on_requests_ended(ctx, ended)
    return ids


def _projects_of(ctx: ServiceContext, ids: list[int]) -> set[str]:
    """The projects of these requests; every id must exist."""
    with ctx.sessions() as session:
        found = dict(session.execute(select(Request.id, Request.project_id).where(Request.id.in_(ids))).all())
    missing = set(ids) - set(found)
    if missing:
        raise NotFound(f"no request {min(missing)}; list them with `mi2b2 request list PROJECT`")
    return set(found.values())


def _cancel(row: Request, now: Any) -> None:
    if row.state == RequestState.SCHEDULED:
        change_state(row, Event.CANCEL)
        row.ended_at = now
        row.waiting_reason = None
        row.last_error = "canceled by a user"
    else:
        row.cancel_requested = True


def _retry(row: Request, now: Any) -> None:
    change_state(row, Event.RETRY)
    row.waiting_reason = "waiting for the scheduler (retry)"
    row.not_before = None
    row.ended_at = None
    row.attempts = 0
    row.cancel_requested = False


__all__ = [
    "ENDED", "AddReport", "RequestFilter", "RequestPage", "StudyPick", "add_requests", "cancel_requests",
    "list_requests", "request_page", "request_view", "requests_version", "retry_requests", "set_priority", "show_request",
]
