"""One machine for the requests a worker runs to their end: retrievals and forwards.

A worker thread runs one started request:

* `load` it, or learn that it is no longer processing (canceled meanwhile);
* `Watch` it while its DICOM operation runs: the cancel flag (and, for a
  retrieval, the end of the project's access) is read at most once per
  `POLL_SECONDS`, and so is progress written;
* `back_off` after a transient failure: back to the queue until the retry
  policy's next try, or failed once the attempts are used up;
* `end` it: the final state, the counts written into its row, one audit event.

What differs by kind comes in as parameters: the target (the PACS a retrieval
reads from, the destination a forward sends to), the retry policy, and the
counts each kind writes and audits (`Record`). Every poll and wait reads the
service context's timer, so a test drives it with a fake one and nothing sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date

from sqlalchemy import select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Project, Request
from mi2b2.domain.clock import Timer
from mi2b2.domain.governance import Denial, irb_active_at
from mi2b2.domain.requests import RequestKind, RequestState, RetryPolicy
from mi2b2.errors import RetriableError
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.request_rows import back_off_unless_canceled, mark_ended

LOG = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # how often a running request re-reads its cancel flag, and writes its progress

# Writes what the ending attempt achieved into the request's row (in the ending
# transaction) and returns the counts its audit event carries.
Record = Callable[[Request], Mapping[str, object]]


@dataclass(frozen=True)
class Job:
    request_id: int
    kind: RequestKind
    project_id: str
    target_id: str  # the PACS a retrieval reads from; the destination a forward sends to
    patient_id: str
    study_uid: str
    series_uids: tuple[str, ...]  # empty: the whole study
    attempts: int

    @property
    def action(self) -> Action:
        return Action.FORWARD if self.kind == RequestKind.FORWARD else Action.RETRIEVE


def load(ctx: ServiceContext, request_id: int, kind: RequestKind) -> Job | None:
    """The started request, or None when it is no longer processing (nothing to run)."""
    with ctx.sessions() as session:
        row = session.get(Request, request_id)
        if row is None or row.kind != kind or row.state != RequestState.PROCESSING:
            return None
        target = row.destination_id if kind == RequestKind.FORWARD else row.pacs_id
        if target is None:
            return None
        return Job(row.id, kind, row.project_id, target, row.patient_id, row.study_uid,
                   tuple(row.series_uids or ()), row.attempts)


def wait_until(timer: Timer, done: Callable[[], bool], timeout: float, interval: float) -> bool:
    """Ask ``done`` every ``interval`` seconds of ``timer`` until it says yes (True) or
    ``timeout`` seconds have passed (False)."""
    deadline = timer.monotonic() + timeout
    while timer.monotonic() < deadline:
        if done():
            return True
        timer.sleep(interval)
    return False


class Watch:
    """Cancel out, progress in: at most one database round trip per POLL_SECONDS each way."""

    def __init__(self, ctx: ServiceContext, job: Job) -> None:
        self._ctx = ctx
        self._job = job
        self._checked: float | None = None
        self._written: float | None = None
        self._canceled = False
        self.access_ended: str | None = None  # why the project may no longer read, if that stopped the request

    @property
    def cancel_reason(self) -> str:
        return f"canceled: {self.access_ended}" if self.access_ended else "canceled by a user"

    def should_cancel(self) -> bool:
        if self._canceled or not self._due(self._checked):
            return self._canceled
        self._checked = self._ctx.timer.monotonic()
        with self._ctx.sessions() as session:
            found = session.execute(
                select(Request.cancel_requested, Project.active, Project.expires_on)
                .select_from(Request).outerjoin(Project, Project.id == Request.project_id)
                .where(Request.id == self._job.request_id)
            ).one_or_none()
        flag, active, expires_on = found if found is not None else (False, None, None)
        # A forward too: images must not keep leaving for a destination once the IRB no longer covers them.
        self.access_ended = self._access_ended(active, expires_on)
        self._canceled = bool(flag) or self.access_ended is not None
        return self._canceled

    def progress_due(self) -> bool:
        """True at most once per POLL_SECONDS: the caller may write its progress now."""
        if not self._due(self._written):
            return False
        self._written = self._ctx.timer.monotonic()
        return True

    def _due(self, last: float | None) -> bool:
        return last is None or self._ctx.timer.monotonic() - last >= POLL_SECONDS

    def _access_ended(self, active: bool | None, expires_on: date | None) -> str | None:
        if not active or expires_on is None:  # None: the project row is gone
            return Denial.PROJECT_INACTIVE.value
        ctx, project_id = self._ctx, self._job.project_id
        if not irb_active_at(expires_on, ctx.clock.now(), ctx.config.project_zone(project_id)):
            return Denial.IRB_EXPIRED.value
        return None


def back_off(ctx: ServiceContext, job: Job, error: RetriableError, policy: RetryPolicy, record: Record,
             counts: bool = True) -> RequestState:
    """After a transient failure: back to the queue until the policy's next try, or
    end (failed when the attempts are used up, canceled if a user asked meanwhile).

    An attempt that does not ``count`` (mi2b2's own receiver was down) is given back:
    the request waits the policy's first delay and never fails for it."""
    now = ctx.clock.now()
    retry_at = policy.next_try(job.attempts, now) if counts else now + policy.first_delay
    status: int | None = getattr(error, "status", None)  # a destination's busy status, worth showing
    if retry_at is None:
        return end(ctx, job, RequestState.FAILED, f"gave up after {job.attempts} attempts: {error}",
                   status=status, record=record)
    with transaction(ctx.sessions) as session:
        # Nothing of this attempt counts: the next one starts over.
        row = session.get_one(Request, job.request_id)
        if not back_off_unless_canceled(row, error, retry_at, now, status):
            _audit_end(ctx, session, job, RequestState.CANCELED, "canceled by a user", {})
            return RequestState.CANCELED
        if not counts:
            row.attempts = max(row.attempts - 1, 0)
        pacs_id, where = _audited_target(job)
        ctx.audit.record("worker", job.action, Outcome.FAILED, project_id=job.project_id, pacs_id=pacs_id,
                         patient_id=job.patient_id, study_uid=job.study_uid,
                         detail={"request": job.request_id, "event": "transient failure", **where,
                                 "attempt": job.attempts, "error": str(error), "retry_at": retry_at.isoformat()},
                         session=session)
    LOG.warning("request %s: %s attempt %s failed (%s); retrying later", job.request_id, job.kind, job.attempts,
                type(error).__name__)
    return RequestState.SCHEDULED


def end(
    ctx: ServiceContext, job: Job, state: RequestState, reason: str | None, *, status: int | None = None,
    record: Record, security: bool = False,
) -> RequestState:
    """End the request in ``state``, with what ``record`` writes into its row, audited
    (``security``: as a security event, e.g. a peer whose TLS certificate cannot be trusted)."""
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        row = session.get_one(Request, job.request_id)
        mark_ended(row, state, reason, status, now)
        counts = record(row)
        received, expected = row.received, row.expected_instances
        _audit_end(ctx, session, job, state, reason, {**counts, **({"security": True} if security else {})})
    LOG.info("request %s: %s %s (%s of %s instances)", job.request_id, job.kind, state, received, expected)
    return state


def _audit_end(ctx: ServiceContext, session: Session, job: Job, state: RequestState, reason: str | None,
               counts: Mapping[str, object]) -> None:
    outcome = Outcome.OK if state in (RequestState.COMPLETED, RequestState.CANCELED) else Outcome.FAILED
    pacs_id, where = _audited_target(job)
    ctx.audit.record("worker", job.action, outcome, project_id=job.project_id, pacs_id=pacs_id,
                     patient_id=job.patient_id, study_uid=job.study_uid,
                     detail={"request": job.request_id, "event": str(state), **where, "reason": reason or "",
                             **counts},
                     session=session)


def _audited_target(job: Job) -> tuple[str | None, dict[str, str]]:
    """A PACS has its own column in the audit trail; a destination is named in the detail."""
    if job.kind == RequestKind.FORWARD:
        return None, {"destination": job.target_id}
    return job.target_id, {}
