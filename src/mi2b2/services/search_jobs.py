"""Large searches as background jobs: submitted by a user, run by a worker, resumable.

A search over more than ``search.job_threshold`` identifiers becomes a job.
Submitting one passes the same doors as an interactive search (membership,
IRB, institution; MRNs not on the allow-list are refused and audited, never
stored). A worker then runs it batch by batch through the very functions an
interactive search uses, so every batch re-checks membership and the IRB,
screens its MRNs again, filters the answers again, is stored as a query and
audited, and is paced by the query governor like any other search. Each
batch's results are stored with the job in the transaction that marks its
identifiers done: a job picked up again after a crash carries on from the
first identifier not done, never asking the PACS twice for a stored answer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import func, insert, select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import SearchJob, SearchJobItem, SearchJobPart, User, Worker
from mi2b2.adapters.process import pid_alive
from mi2b2.config import PacsConfig, SiteConfig
from mi2b2.domain.governance import cap_per_patient
from mi2b2.domain.identifiers import parse_identifier_text
from mi2b2.domain.principal import Principal, Role
from mi2b2.domain.query_governance import job_held
from mi2b2.errors import AccessDenied, InvalidInput, LimitExceeded, Mi2b2Error, NotFound, RetriableError
from mi2b2.services import search
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import FindSessionPort, ServiceContext
from mi2b2.services.query_governor import query_limits

KINDS: dict[str, Callable[[ServiceContext, Principal, str, str, str], search.SearchReport]] = {
    "patients": search.search_patients,
    "studies": search.search_studies,
    "accessions": search.search_accessions,
}
QUEUED, RUNNING, COMPLETED, CANCELED, FAILED = "queued", "running", "completed", "canceled", "failed"
ACTIVE = (QUEUED, RUNNING)
RETRY_PAUSE = 2.0  # seconds a job waits after the PACS was closed or busy, checking for cancel meanwhile
KEEP_ASSOCIATION_SECONDS = 5.0  # a job keeps its query association across batches this long, then gives it back


@dataclass(frozen=True)
class JobTicket:
    job_id: int
    state: str
    total: int
    refused: list[str]


class Screened(TypedDict):
    """What submission set aside, kept with the job (``search_jobs.screened``)."""

    refused: list[str]
    duplicates: list[str]
    invalid: list[dict[str, Any]]


# --- submitting -----------------------------------------------------------------------


def submit(ctx: ServiceContext, who: Principal, kind: str, project_id: str, pacs_id: str,
           text: str) -> search.SearchReport | JobTicket:
    """Run a small search now; make a large one a job. Both pass the same limits."""
    if kind not in KINDS:
        raise InvalidInput(f"unknown search kind {kind!r}; use one of {sorted(KINDS)}")
    what = "accession number" if kind == "accessions" else "MRN"
    count = len(parse_identifier_text(text, kind=what).unique)
    if count > ctx.config.search.max_identifiers:
        raise LimitExceeded(f"{count} {what}s in one search; at most {ctx.config.search.max_identifiers} are taken at "
                            "once ([search] max_identifiers): split the list into several searches (each over "
                            f"{ctx.config.search.job_threshold} runs as a background search job)")
    if count <= ctx.config.search.job_threshold:
        return KINDS[kind](ctx, who, project_id, pacs_id, text)
    return create_job(ctx, who, kind, project_id, pacs_id, text)


def create_job(ctx: ServiceContext, who: Principal, kind: str, project_id: str, pacs_id: str, text: str) -> JobTicket:
    door = search.open_door(ctx, who, project_id, pacs_id, operation=f"search {kind} job")
    screened: Screened
    if kind == "accessions":
        parsed = parse_identifier_text(text, kind="accession number")
        values = parsed.unique
        screened = {"refused": [], "duplicates": parsed.duplicates, "invalid": [e.__dict__ for e in parsed.invalid]}
    else:
        report, values = search.screen_mrns(ctx, who, door, text, kind)  # refused MRNs: audited, never stored
        screened = {"refused": report.refused, "duplicates": report.duplicates, "invalid": report.invalid}
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        job = SearchJob(user_login=who.login, project_id=project_id, pacs_id=pacs_id, kind=kind,
                        state=QUEUED if values else COMPLETED, total=len(values), done=0, screened=screened,
                        created_at=now, ended_at=None if values else now)
        session.add(job)
        session.flush()
        if values:
            session.execute(insert(SearchJobItem), [
                {"job_id": job.id, "position": i, "value": v, "done": False} for i, v in enumerate(values)
            ])
        ticket = JobTicket(job.id, job.state, job.total, screened["refused"])
    ctx.audit.record(who, Action.QUERY, project_id=project_id, pacs_id=pacs_id, detail={
        "search_job": ticket.job_id, "event": "submitted", "kind": kind, "identifiers": ticket.total,
        "refused": screened["refused"], **search.broker_view(ctx, project_id),
    })
    return ticket


# --- reading and canceling --------------------------------------------------------------


def job_status(ctx: ServiceContext, who: Principal, job_id: int) -> dict[str, Any]:
    job = _job_for(ctx, who, job_id, "read search job")
    return _status(job)


def job_results(ctx: ServiceContext, who: Principal, job_id: int) -> dict[str, Any]:
    """The job's status and everything found so far, filtered again against the allow-list
    as it stands now, and only while the user may still search the project (IRB active)."""
    job = _job_for(ctx, who, job_id, "read search job results")
    door = search.open_door(ctx, who, job.project_id, job.pacs_id, operation="read search job results")
    with ctx.sessions() as session:
        parts = session.scalars(
            select(SearchJobPart.report).where(SearchJobPart.job_id == job_id).order_by(SearchJobPart.first_position)
        ).all()
    merged = _merge(job, list(parts), door.policy.max_studies_per_patient)
    patients_seen = {p["patient_id"] for p in merged["patients"]} | {s["patient_id"] for s in merged["studies"]}
    allowed = search.allowed_values(ctx, job.project_id, job.pacs_id, patients_seen)
    merged["patients"] = [p for p in merged["patients"] if p["patient_id"] in allowed]
    merged["studies"] = [s for s in merged["studies"] if s["patient_id"] in allowed]
    return {**_status(job), **merged}


def cancel_job(ctx: ServiceContext, who: Principal, job_id: int) -> dict[str, Any]:
    _job_for(ctx, who, job_id, "cancel search job")
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        job = session.get_one(SearchJob, job_id)
        if job.state in ACTIVE:
            _end(job, CANCELED, now, f"canceled by {who.login}")
        status = _status(job)
    ctx.audit.record(who, Action.QUERY, project_id=status["project"], pacs_id=status["pacs"],
                     detail={"search_job": job_id, "event": "canceled", "done": status["done"], "total": status["total"]})
    return status


def list_jobs(ctx: ServiceContext, who: Principal, project_id: str, limit: int = 50) -> list[dict[str, Any]]:
    policy = search.load_policy(ctx, project_id)
    role = policy.members.get(who.login)
    if role is None:
        raise AccessDenied(f"project {project_id!r}: not a member of the project")
    statement = select(SearchJob).where(SearchJob.project_id == project_id).order_by(SearchJob.id.desc()).limit(limit)
    if role != "lead":
        statement = statement.where(SearchJob.user_login == who.login)
    with ctx.sessions() as session:
        return [_status(job) for job in session.scalars(statement)]


def _job_for(ctx: ServiceContext, who: Principal, job_id: int, operation: str) -> SearchJob:
    """The job, if ``who`` submitted it or leads its project; the same answer for
    someone else's job as for no job, so ids cannot be probed."""
    with ctx.sessions() as session:
        job = session.get(SearchJob, job_id)
    if job is not None and job.user_login != who.login:
        role = search.load_policy(ctx, job.project_id).members.get(who.login)
        if role != "lead":
            ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=job.project_id,
                             detail={"reason": "not the user's search job", "operation": operation, "search_job": job_id})
            job = None
    if job is None:
        raise NotFound(f"no search job {job_id} of yours; list them with GET /api/v1/search/jobs?project=...")
    return job


def _status(job: SearchJob) -> dict[str, Any]:
    return {"job_id": job.id, "kind": job.kind, "project": job.project_id, "pacs": job.pacs_id, "user": job.user_login,
            "state": job.state, "done": job.done, "total": job.total, "waiting_reason": job.waiting_reason,
            "error": job.error, "created_at": job.created_at, "ended_at": job.ended_at}


def _merge(job: SearchJob, parts: list[dict[str, Any]], cap: int | None) -> dict[str, Any]:
    patients: dict[str, dict[str, Any]] = {}
    studies: dict[str, dict[str, Any]] = {}
    lists: dict[str, list[Any]] = {"refused": list(job.screened.get("refused", [])), "not_found": [],
                                   "not_permitted": [], "warnings": []}
    for part in parts:
        for patient in part.get("patients", []):
            patients.setdefault(patient["patient_id"], patient)
        for study in part.get("studies", []):
            studies.setdefault(study["study_uid"], study)
        for key, values in lists.items():
            values.extend(v for v in part.get(key, []) if v not in values)
    # Accessions of one patient may fall into different batches: the per-patient cap applies to the whole job.
    kept, capped = cap_per_patient(list(studies.values()), lambda s: s["patient_id"],
                                   lambda s: s["study_date"] + s["study_time"], cap)
    return {"query_ids": [p["query_id"] for p in parts], "patients": list(patients.values()), "studies": kept,
            "series": [], "capped": capped, "duplicates": job.screened.get("duplicates", []),
            "invalid": job.screened.get("invalid", []), **lists}


# --- running (in a worker) ---------------------------------------------------------------


def claim_jobs(ctx: ServiceContext, worker_id: str, limit: int) -> list[int]:
    """Queued jobs, and running jobs whose worker is gone or silent, become this worker's."""
    if limit < 1:
        return []
    now = ctx.clock.now()
    lease = timedelta(seconds=ctx.config.search.lease_seconds)
    with transaction(ctx.sessions) as session:
        workers = {w.id: w for w in session.scalars(select(Worker))}
        claimed = []
        # Row locks (PostgreSQL; SQLite's write lock does the same): two workers never claim one job.
        candidates = select(SearchJob).where(SearchJob.state.in_(ACTIVE)).order_by(SearchJob.id)
        for job in session.scalars(candidates.with_for_update(skip_locked=True)):
            if job.state == RUNNING and not _orphaned(job, workers):
                continue
            job.state, job.worker, job.lease_until = RUNNING, worker_id, now + lease
            job.started_at = job.started_at or now
            claimed.append(job.id)
            if len(claimed) >= limit:
                break
    return claimed


def _orphaned(job: SearchJob, workers: dict[str, Worker]) -> bool:
    """Its worker is gone: no worker row (retired, or dropped when its heartbeat went stale),
    or a process on this host that no longer exists. A live worker's job is never taken
    from it, however long one batch takes on a slow PACS."""
    worker = workers.get(job.worker or "")
    if worker is None:
        return True
    return worker.host == socket.gethostname() and not pid_alive(worker.pid)


class _KeptAssociation:
    """The job's governed find session, kept from one batch to the next (no new
    association per batch) but given back every KEEP_ASSOCIATION_SECONDS, so a
    search waiting in line for the PACS gets its turn."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.opener = ctx.open_find
        self.clock = ctx.clock
        self._stack: ExitStack | None = None
        self._session: FindSessionPort | None = None
        self._opened_at = 0.0

    @contextmanager
    def open(self, config: SiteConfig, pacs: PacsConfig) -> Iterator[FindSessionPort]:
        if self._session is None:
            stack = ExitStack()
            self._session = stack.enter_context(self.opener(config, pacs))
            self._stack, self._opened_at = stack, self.clock.monotonic()
        try:
            yield self._session
        except BaseException:
            self.close()
            raise

    def between_batches(self) -> None:
        if self.clock.monotonic() - self._opened_at >= KEEP_ASSOCIATION_SECONDS:
            self.close()

    def close(self) -> None:
        stack, self._stack, self._session = self._stack, None, None
        if stack is not None:
            stack.close()


def release_job(ctx: ServiceContext, job_id: int, worker_id: str) -> None:
    """Give a job back to the queue (its runner failed unexpectedly); it resumes where its results end."""
    with transaction(ctx.sessions) as session:
        job = session.get(SearchJob, job_id)
        if job is not None and job.state == RUNNING and job.worker == worker_id:
            job.state, job.worker, job.lease_until = QUEUED, None, None


def run_job(ctx: ServiceContext, job_id: int, worker_id: str, stopping: Callable[[], bool] = lambda: False) -> str:
    """Search batch after batch until the job is done, canceled, refused or this worker stops."""
    kept = _KeptAssociation(ctx)
    try:
        return _run_batches(replace(ctx, open_find=kept.open), job_id, worker_id, stopping, kept)
    finally:
        kept.close()


def _run_batches(ctx: ServiceContext, job_id: int, worker_id: str, stopping: Callable[[], bool],
                 kept: _KeptAssociation) -> str:
    while not stopping():
        kept.between_batches()
        job = _still_mine(ctx, job_id, worker_id)
        if job is None:
            return "gone"
        who = _principal(ctx, job.user_login)
        batch = _next_batch(ctx, job_id, ctx.config.search.job_batch)
        if who is None:
            return _finish(ctx, job_id, worker_id, FAILED, f"user {job.user_login!r} no longer exists or is disabled")
        if not batch:
            return _finish(ctx, job_id, worker_id, COMPLETED, None)
        held = job_held(query_limits(ctx.config.pacs_location(job.pacs_id)[2], ctx.clock.now()))
        if held is not None:
            kept.close()
            _wait(ctx, job_id, worker_id, held, stopping)
            continue
        try:
            report = KINDS[job.kind](ctx, who, job.project_id, job.pacs_id, "\n".join(v for _, v in batch))
        except AccessDenied as exc:  # removed from the project, IRB expired, ...: already audited by the door
            return _finish(ctx, job_id, worker_id, CANCELED, f"stopped: {exc}")
        except RetriableError as exc:  # PACS closed, busy or unreachable: wait, then try the same batch again
            kept.close()
            _wait(ctx, job_id, worker_id, str(exc), stopping)
            continue
        except Mi2b2Error as exc:
            return _finish(ctx, job_id, worker_id, FAILED, str(exc))
        _store(ctx, job_id, worker_id, batch, report)
    return "stopped"


def _still_mine(ctx: ServiceContext, job_id: int, worker_id: str) -> SearchJob | None:
    with ctx.sessions() as session:
        job = session.get(SearchJob, job_id)
    return job if job is not None and job.state == RUNNING and job.worker == worker_id else None


def _principal(ctx: ServiceContext, login: str) -> Principal | None:
    with ctx.sessions() as session:
        user = session.scalar(select(User).where(User.login == login))
    if user is None or user.disabled:
        return None
    return Principal(user.login, Role(user.role), user.display_name, "search job")


def _next_batch(ctx: ServiceContext, job_id: int, size: int) -> list[tuple[int, str]]:
    with ctx.sessions() as session:
        return [(p, v) for p, v in session.execute(
            select(SearchJobItem.position, SearchJobItem.value)
            .where(SearchJobItem.job_id == job_id, SearchJobItem.done.is_(False))
            .order_by(SearchJobItem.position).limit(size)
        ).all()]


def _store(ctx: ServiceContext, job_id: int, worker_id: str, batch: list[tuple[int, str]],
           report: search.SearchReport) -> None:
    """The batch's results and its identifiers' completion, in one transaction."""
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        positions = [p for p, _ in batch]
        session.add(SearchJobPart(job_id=job_id, first_position=positions[0], query_id=report.query_id,
                                  report=_jsonable(asdict(report))))
        session.execute(update(SearchJobItem).where(SearchJobItem.job_id == job_id,
                                                    SearchJobItem.position.in_(positions)).values(done=True))
        done = session.execute(select(func.count()).where(SearchJobItem.job_id == job_id,
                                                          SearchJobItem.done.is_(True))).scalar_one()
        job = session.get_one(SearchJob, job_id)
        job.done = done
        job.waiting_reason = None
        if job.worker == worker_id and job.state == RUNNING:
            job.lease_until = now + timedelta(seconds=ctx.config.search.lease_seconds)


def _wait(ctx: ServiceContext, job_id: int, worker_id: str, reason: str, stopping: Callable[[], bool]) -> None:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        job = session.get_one(SearchJob, job_id)
        if job.state == RUNNING and job.worker == worker_id:
            job.waiting_reason = reason
            job.lease_until = now + timedelta(seconds=ctx.config.search.lease_seconds)
    waited = 0.0
    while waited < RETRY_PAUSE and not stopping():
        ctx.clock.sleep(0.2)
        waited += 0.2


def _finish(ctx: ServiceContext, job_id: int, worker_id: str, state: str, reason: str | None) -> str:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        job = session.get_one(SearchJob, job_id)
        if job.state != RUNNING or job.worker != worker_id:
            return job.state
        _end(job, state, now, reason)
        project_id, pacs_id, user, done, total = job.project_id, job.pacs_id, job.user_login, job.done, job.total
    ctx.audit.record(user, Action.QUERY,
                     Outcome.OK if state == COMPLETED else Outcome.FAILED if state == FAILED else Outcome.DENIED,
                     project_id=project_id, pacs_id=pacs_id,
                     detail={"search_job": job_id, "event": state, "done": done, "total": total, "reason": reason})
    return state


def _end(job: SearchJob, state: str, now: datetime, reason: str | None) -> None:
    job.state, job.ended_at, job.worker, job.lease_until = state, now, None, None
    job.waiting_reason = None
    if state != COMPLETED:
        job.error = reason


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
