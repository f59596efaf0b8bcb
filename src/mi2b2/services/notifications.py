"""Telling researchers that their retrievals ended: in the app, and by e-mail.

The worker calls ``on_request_ended`` (``on_requests_ended`` for many) after
a request's final state is committed. A failed request gets its own notice; when every request of a
batch has ended, its owner gets one summary. Texts carry project ids, counts,
request numbers and DICOM status codes, never patient names, MRNs, accession
numbers or UIDs: they are e-mailed, and e-mail is not access-controlled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import rows_changed, serialize_scheduling, transaction
from mi2b2.adapters.db.tables import CachedStudy, Notification, Project, ProjectMember, Request, User
from mi2b2.adapters.email import MailError, send_mail
from mi2b2.domain.clock import as_utc
from mi2b2.domain.governance import DataPolicy, local_date
from mi2b2.domain.principal import Principal
from mi2b2.domain.requests import ENDED, RequestKind, RequestState
from mi2b2.errors import InvalidInput, NotFound
from mi2b2.services.allow_list import project_mrns
from mi2b2.services.context import ServiceContext

LOG = logging.getLogger(__name__)

KIND_FAILED = "request_failed"
KIND_BATCH = "batch_ended"
KIND_IRB_EXPIRING = "irb_expiring"
MAX_REASON = 300

_UID = re.compile(r"(?<![0-9.])\d+(?:\.\d+){2,}(?![0-9.])")
_PERSON_NAME = re.compile(r"[^\s,;:()\[\]]*\^[^\s,;:()\[\]]*")  # DICOM PN: FAMILY^GIVEN
_LONG_NUMBER = re.compile(r"\d{5,}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class NotificationView:
    id: int
    kind: str
    project_id: str | None
    batch_id: str | None
    subject: str
    body: str
    created_at: datetime
    read_at: datetime | None
    emailed_at: datetime | None
    email_error: str | None


# producing ---------------------------------------------------------------------


def on_request_ended(ctx: ServiceContext, request_id: int) -> list[int]:
    """Create the notices a just-ended request calls for; return their ids (empty if none or already sent).

    Safe to call twice, also concurrently: a notice whose exact text already
    exists is not created again. The text names the request or batch and the
    time it ended, so a retried request that fails again is notified again.
    """
    return on_requests_ended(ctx, [request_id])


def on_requests_ended(ctx: ServiceContext, request_ids: Sequence[int]) -> list[int]:
    """`on_request_ended` for many: the requests of one batch are handled together, its rows read
    once however many of them ended (an IRB that lapsed ends hundreds of one batch in one tick)."""
    batch_of: dict[int, str | None] = {}
    with ctx.sessions() as session:
        for start in range(0, len(request_ids), 1000):
            batch_of.update((request_id, batch_id) for request_id, batch_id in session.execute(
                select(Request.id, Request.batch_id).where(Request.id.in_(request_ids[start:start + 1000]))))
    if missing := [i for i in request_ids if i not in batch_of]:
        raise NotFound(f"no request #{missing[0]}")
    groups: dict[str | int, list[int]] = {}
    for request_id in dict.fromkeys(request_ids):
        groups.setdefault(batch_of[request_id] or request_id, []).append(request_id)
    return [notice for group in groups.values() for notice in _on_ended_in_batch(ctx, group)]


def _on_ended_in_batch(ctx: ServiceContext, request_ids: list[int]) -> list[int]:
    """The notices for these requests of one batch (or one request alone)."""
    created: list[Notification] = []
    with transaction(ctx.sessions) as session:
        batch = _lock_batch(session, session.get_one(Request, request_ids[0]))
        by_id = {r.id: r for r in batch}
        ended = [by_id[i] for i in request_ids if by_id[i].state in ENDED]
        if not ended:
            return []
        project = session.get(Project, ended[0].project_id)
        title = project.title if project else ""
        now = ctx.clock.now()
        for request in ended:
            if request.state == RequestState.FAILED:
                reason = scrub(session, request, request.last_error)
                note = _failure_notice(request, batch, title, reason, now)
                if _add_once(session, note):
                    created.append(note)
        lone_failure = len(batch) == 1 and batch[0].state == RequestState.FAILED  # its failure notice says it all
        if all(r.state in ENDED for r in batch) and not lone_failure:
            for login in sorted({r.user_login for r in batch}):
                note = _batch_notice([r for r in batch if r.user_login == login], title, now)
                if _add_once(session, note):
                    created.append(note)
        session.flush()
        ids = [note.id for note in created]
    _deliver(ctx, ids)
    return ids


def warn_irb_expiring(ctx: ServiceContext) -> list[int]:
    """Warn each lead of a project whose IRB ends within ``[site] irb_warning_days``; return the new notice ids.

    Once per lead, project and expiry date (a renewed approval gets its own
    warning). The worker calls this every tick; the scheduling lock keeps two
    workers from both sending it."""
    days = ctx.config.site.irb_warning_days
    if days <= 0:
        return []
    now = ctx.clock.now()
    created: list[Notification] = []
    with transaction(ctx.sessions) as session:
        serialize_scheduling(session)
        for project in session.scalars(select(Project).where(Project.active.is_(True)).order_by(Project.id)):
            left = (project.expires_on - local_date(now, ctx.config.project_zone(project.id))).days
            if not 0 <= left <= days:
                continue
            leads = session.scalars(select(ProjectMember.login).where(
                ProjectMember.project_id == project.id, ProjectMember.role == "lead").order_by(ProjectMember.login)).all()
            subject = f"IRB approval of project {project.id} ends on {project.expires_on.isoformat()}"
            for login in leads:
                if session.scalar(select(Notification.id).where(
                        Notification.user_login == login, Notification.kind == KIND_IRB_EXPIRING,
                        Notification.project_id == project.id, Notification.subject == subject).limit(1)) is not None:
                    continue
                note = Notification(user_login=login, project_id=project.id, kind=KIND_IRB_EXPIRING, subject=subject,
                                    body=_irb_body(ctx, session, project, left), created_at=now)
                session.add(note)
                created.append(note)
        session.flush()
        ids = [note.id for note in created]
    _deliver(ctx, ids)
    return ids


def _irb_body(ctx: ServiceContext, session: Session, project: Project, days_left: int) -> str:
    """Counts and what will happen; no patient, study or accession is named (this is e-mailed)."""
    studies, size = session.execute(
        select(func.count(CachedStudy.id), func.coalesce(func.sum(CachedStudy.bytes), 0))
        .where(CachedStudy.project_id == project.id)).one()
    queued = session.scalar(select(func.count(Request.id)).where(
        Request.project_id == project.id, Request.state.in_([RequestState.SCHEDULED.value,
                                                             RequestState.PROCESSING.value]))) or 0
    zone = ctx.config.project_zone(project.id)
    policy = ctx.config.project_data_policy(project.id)
    after = ("members may still download, view and forward what is cached (data policy 'read-only')"
             if policy is DataPolicy.READ_ONLY else
             "members may only list and delete what is cached (data policy 'closed'); downloads, the viewer, "
             "DICOMweb and forwards are refused, and an admin purges the cache")
    when = "today" if days_left == 0 else f"in {days_left} day{'s' if days_left != 1 else ''}"
    return "\n".join([
        f"The IRB approval {project.irb_number} of {_project_line(project.id, project.title)} ends {when}: "
        f"it covers {project.expires_on.isoformat()} until midnight ({zone}).",
        "",
        f"Cached now: {studies} studies, {int(size)} bytes. Requests queued or running: {queued}.",
        "",
        "After that date no new searches or retrievals run, running retrievals are canceled, and "
        f"{after}.",
        "",
        "If the approval is renewed, ask the site admin to enter the new expiry date in the configuration.",
    ])


def _lock_batch(session: Session, request: Request) -> list[Request]:
    """The request's batch (or the request alone), read under a lock that serialises notifiers.

    Only the batch's first row is locked: it is the mutex for "has this batch
    been summarised yet", and locking every row would make each receiver
    updating its request's counters wait for us."""
    if request.batch_id is None:
        return [session.execute(
            select(Request).where(Request.id == request.id).with_for_update().execution_options(populate_existing=True)
        ).scalar_one()]
    first = session.scalar(select(Request.id).where(Request.batch_id == request.batch_id).order_by(Request.id).limit(1))
    session.execute(select(Request.id).where(Request.id == first).with_for_update())
    return list(session.scalars(
        select(Request).where(Request.batch_id == request.batch_id).order_by(Request.id)
        .execution_options(populate_existing=True)
    ))


def _add_once(session: Session, note: Notification) -> bool:
    exists = session.scalar(
        select(Notification.id).where(
            Notification.user_login == note.user_login, Notification.kind == note.kind,
            Notification.subject == note.subject, Notification.body == note.body,
        ).limit(1)
    )
    if exists is not None:
        return False
    session.add(note)
    return True


def _nouns(kind: str) -> tuple[str, str, str]:
    if kind == RequestKind.FORWARD:
        return "forward", "forwards", "finished"
    return "study", "studies", "ready"


def _when(value: datetime | None) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "just now"


def _project_line(project_id: str, title: str) -> str:
    return f"project {project_id} ({title})" if title else f"project {project_id}"


def _failure_notice(request: Request, batch: list[Request], title: str, reason: str, now: datetime) -> Notification:
    what = "forward" if request.kind == RequestKind.FORWARD else "retrieval"
    position = ""
    if len(batch) > 1:
        index = [r.id for r in batch].index(request.id) + 1
        position = f" (study {index} of {len(batch)} in its batch)"
    status = f"0x{request.last_status:04X}" if request.last_status is not None else "none"
    body = "\n".join([
        f"A {what} in {_project_line(request.project_id, title)} failed: request #{request.id}{position}.",
        "",
        f"Reason: {reason}",
        f"Instances: {request.received} of {request.expected_instances} received, {request.failed} failed, "
        f"{request.warnings} with warnings. Last DICOM status: {status}. Attempts: {request.attempts}.",
        f"Ended: {_when(request.ended_at)}.",
        "",
        f"The request log of project {request.project_id} in mi2b2 has the details; a failed request can be retried there.",
    ])
    return Notification(user_login=request.user_login, project_id=request.project_id, batch_id=request.batch_id,
                        kind=KIND_FAILED, subject=f"A {what} failed in project {request.project_id}"[:200],
                        body=body, created_at=now)


def _batch_notice(requests: list[Request], title: str, now: datetime) -> Notification:
    first = requests[0]
    one, many, done = _nouns(first.kind)
    counts = {state: sum(1 for r in requests if r.state == state) for state in
              (RequestState.COMPLETED, RequestState.INCOMPLETE, RequestState.FAILED, RequestState.CANCELED)}
    total = len(requests)
    subject = batch_subject(counts, one, many, done, first.project_id)
    ended = max((as_utc(r.ended_at) for r in requests if r.ended_at), default=None)
    numbers = ", ".join(f"#{r.id}" for r in requests)
    body = "\n".join([
        f"Your {'batch of ' if first.batch_id else ''}{total} {one if total == 1 else many} for "
        f"{_project_line(first.project_id, title)} has ended:",
        "",
        *(f"  {count:>5} {state.value}" for state, count in counts.items()),
        "",
        f"Requests: {numbers}." if total <= 20 else f"Requests: #{requests[0].id} to #{requests[-1].id}.",
        f"The last one ended {_when(ended)}.",
        "",
        f"Open project {first.project_id} in mi2b2 to see the cache and the request log.",
    ])
    return Notification(user_login=first.user_login, project_id=first.project_id, batch_id=first.batch_id,
                        kind=KIND_BATCH, subject=subject[:200], body=body, created_at=now)


def batch_subject(counts: dict[RequestState, int], one: str, many: str, done: str, project_id: str) -> str:
    """What happened, in one line: "15 of 20 studies ready in project c1; 5 failed"."""
    total = sum(counts.values())
    ready = counts.get(RequestState.COMPLETED, 0)
    rest = ", ".join(f"{n} {state.value}" for state, n in counts.items() if n and state is not RequestState.COMPLETED)
    head = f"{total} {one if total == 1 else many}" if ready == total else f"{ready} of {total} {many}"
    return f"{head} {done} in project {project_id}" + (f"; {rest}" if rest else "")


def scrub(session: Session, request: Request, text: str | None) -> str:
    """The request's error text with anything that could identify a patient taken out.

    The text comes from the PACS and DICOM libraries, so it may quote what it
    was handling. Known identifiers of this request, MRNs of the project's
    allow-list, person names, UIDs and long numbers are replaced."""
    if not text:
        return "no reason was recorded"
    known: set[str] = {request.patient_id, request.accession, request.study_uid, *request.series_uids}
    for name in session.scalars(select(CachedStudy.patient_name).where(
            CachedStudy.project_id == request.project_id, CachedStudy.study_uid == request.study_uid)):
        known.add(name)
        known.update(part for part in re.split(r"[\^=]", name) if len(part) >= 2)
    tokens = set(_TOKEN.findall(text))
    if tokens:
        known.update(project_mrns(session, request.project_id, among=tokens))
    scrubbed = _PERSON_NAME.sub("[name]", text)
    for value in sorted((k for k in known if k), key=len, reverse=True):
        scrubbed = re.sub(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", "[redacted]", scrubbed,
                          flags=re.IGNORECASE)
    scrubbed = _UID.sub("[uid]", scrubbed)
    scrubbed = _LONG_NUMBER.sub("[number]", scrubbed)
    scrubbed = " ".join(scrubbed.split())
    return scrubbed if len(scrubbed) <= MAX_REASON else scrubbed[: MAX_REASON - 1] + "…"


def _deliver(ctx: ServiceContext, ids: Iterable[int]) -> None:
    """E-mail new notices after their transaction committed; record the outcome on each."""
    smtp = ctx.config.smtp
    ids = list(ids)
    if smtp is None or not ids:
        return
    with ctx.sessions() as session:
        rows = session.execute(
            select(Notification.id, Notification.subject, Notification.body, User.email)
            .join(User, User.login == Notification.user_login)
            .where(Notification.id.in_(ids), User.disabled.is_(False), User.email.is_not(None), User.email != "")
            .order_by(Notification.id)
        ).all()
    for note_id, subject, body, email in rows:
        if email is None:  # the query keeps only users with an address
            continue
        values: dict[str, object]
        try:
            send_mail(smtp, email, f"[mi2b2] {subject}", body, ctx.clock.now())
            values = {"emailed_at": ctx.clock.now()}
        except MailError as exc:
            LOG.warning("notification %s was not e-mailed: %s", note_id, exc)
            values = {"email_error": str(exc)}
        with transaction(ctx.sessions) as session:
            session.execute(update(Notification).where(Notification.id == note_id).values(**values))


# reading -----------------------------------------------------------------------


def list_notifications(ctx: ServiceContext, who: Principal, unread_only: bool = False,
                       limit: int = 200) -> list[NotificationView]:
    statement = select(Notification).where(Notification.user_login == who.login)
    if unread_only:
        statement = statement.where(Notification.read_at.is_(None))
    with ctx.sessions() as session:
        rows = session.scalars(statement.order_by(Notification.id.desc()).limit(min(max(limit, 1), 5000)))
        return [
            NotificationView(n.id, n.kind, n.project_id, n.batch_id, n.subject, n.body, as_utc(n.created_at),
                             _utc(n.read_at), _utc(n.emailed_at), n.email_error)
            for n in rows
        ]


def _utc(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def mark_read(ctx: ServiceContext, who: Principal, ids: Iterable[int] | None = None, everything: bool = False) -> int:
    """Mark the caller's notices read (the listed ones, or all); return how many changed."""
    wanted = sorted(set(ids or []))
    if everything == bool(wanted):
        raise InvalidInput("give either notification ids or all=true, not both and not neither")
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        statement = update(Notification).where(Notification.user_login == who.login, Notification.read_at.is_(None))
        if not everything:
            mine = set(session.scalars(select(Notification.id).where(
                Notification.user_login == who.login, Notification.id.in_(wanted))))
            unknown = [i for i in wanted if i not in mine]
            if unknown:
                raise NotFound(f"you have no notifications {', '.join(str(i) for i in unknown)}; "
                               "list yours with `mi2b2 notifications`")
            statement = statement.where(Notification.id.in_(wanted))
        return rows_changed(session, statement.values(read_at=now))
