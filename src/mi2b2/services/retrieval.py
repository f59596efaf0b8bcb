"""Run one started retrieval to its end: C-MOVE (or C-GET), then judge it.

The worker calls `run_retrieval` in a thread for each request the scheduler
started. Transient failures go back to the queue with a backoff; permanent
ones fail the request with the PACS's reason. Cancel is polled while the PACS
sends, and answered with C-CANCEL; so is the end of access while it runs (the
IRB expiring at the project's local midnight, the project removed): what came
in before is then closed to reading like the rest of the project's cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Project, Request
from mi2b2.adapters.dicom.errors import DimseFailure
from mi2b2.adapters.dicom.retrieve import RetrieveProgress, RetrieveResult, get_study, move_study
from mi2b2.adapters.dicom.scu import QueryModel
from mi2b2.config import PacsConfig, RetrieveMethod
from mi2b2.domain.governance import Denial, irb_active_at
from mi2b2.domain.receipt import move_message_id
from mi2b2.domain.request_states import Event
from mi2b2.domain.requests import RequestState, retrieval_outcome
from mi2b2.errors import Mi2b2Error, RetriableError
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.pacs import local_ae, peer_for
from mi2b2.services.receipts import MoveSent, receipt_of, record_attempt
from mi2b2.services.receiver import ReceiverSink, receive_limits
from mi2b2.services.request_rows import back_off_unless_canceled, change_state, mark_ended

LOG = logging.getLogger(__name__)
POLL_SECONDS = 1.0  # how often a running retrieval re-reads its cancel flag and writes progress
INDEX_WAIT_SECONDS = 15.0  # how long the receiver may take to index what it already acknowledged


@dataclass(frozen=True)
class _Job:
    request_id: int
    project_id: str
    pacs: PacsConfig
    patient_id: str
    study_uid: str
    series_uids: tuple[str, ...]
    attempts: int


def run_retrieval(
    ctx: ServiceContext, request_id: int, sink: ReceiverSink, pacs_freed: Callable[[], None] = lambda: None
) -> str:
    """Returns the request's state afterwards. ``pacs_freed`` is called once the
    PACS has finished sending, when its slot may go to the next request."""
    job = _load(ctx, request_id)
    if job is None:
        return RequestState.CANCELED
    watch = _Watch(ctx, request_id, job.project_id)
    try:
        result = _retrieve(ctx, job, sink, watch)
    except RetriableError as exc:
        return _transient(ctx, job, exc)
    except Mi2b2Error as exc:
        # A PACS whose C-STOREs we refused for lack of space reports a failure
        # of its own; ours is the reason worth showing.
        status = exc.status if isinstance(exc, DimseFailure) else None
        return _end(ctx, job, RequestState.FAILED, _write_failure(ctx, job) or str(exc), status=status)
    _free_the_pacs(ctx, job)
    pacs_freed()
    _await_counts(ctx, job, sink, result.completed + result.warning)  # C-MOVE and C-GET alike
    if result.canceled:
        reason = f"canceled: {watch.access_ended}" if watch.access_ended else "canceled by a user"
        return _end(ctx, job, RequestState.CANCELED, reason, status=result.status)
    return _judge(ctx, job, result)


def _free_the_pacs(ctx: ServiceContext, job: _Job) -> None:
    """The PACS is done with us: the scheduler may start the next retrieval on it
    while this one waits for its last instances to be made durable and counted."""
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == job.request_id).values(pacs_done_at=ctx.clock.now()))


def _await_counts(ctx: ServiceContext, job: _Job, sink: ReceiverSink, acknowledged: int) -> None:
    """Instances are answered before they are indexed (group commit): wait until
    the request counts what the PACS says we acknowledged, or the receiver says it
    cannot write them. The receiver may be in another process, so this is read
    from the database; flushing this process's receiver first only makes it quicker."""
    sink.flush()
    deadline = time.monotonic() + INDEX_WAIT_SECONDS
    while not receipt_of(ctx, job.request_id).accounts_for(acknowledged) and time.monotonic() < deadline:
        time.sleep(0.02)


def fail_unexpectedly(ctx: ServiceContext, request_id: int, error: BaseException) -> None:
    """A bug or a vanished PACS configuration must not leave a request holding a slot forever."""
    with transaction(ctx.sessions) as session:
        row = session.get(Request, request_id)
        if row is not None and row.state == RequestState.PROCESSING:
            change_state(row, Event.FAIL)
            row.ended_at = ctx.clock.now()
            row.last_error = f"internal error ({type(error).__name__}): {error}; see the server log, then retry"


def _load(ctx: ServiceContext, request_id: int) -> _Job | None:
    with ctx.sessions() as session:
        row = session.get(Request, request_id)
        if row is None or row.state != RequestState.PROCESSING or row.pacs_id is None:
            return None
        _, _, pacs = ctx.config.pacs_location(row.pacs_id)
        return _Job(row.id, row.project_id, pacs, row.patient_id, row.study_uid, tuple(row.series_uids or ()), row.attempts)


def _retrieve(ctx: ServiceContext, job: _Job, sink: ReceiverSink, watch: _Watch) -> RetrieveResult:
    if watch.should_cancel():
        return RetrieveResult(status=0xFE00, completed=0, failed=0, warning=0, failed_sop_uids=[], canceled=True)
    model = QueryModel(job.pacs.query_model.value)
    LOG.info("request %s: retrieving from %s by %s", job.request_id, job.pacs.id, job.pacs.retrieve.value)
    if job.pacs.retrieve is RetrieveMethod.C_GET:
        record_attempt(ctx, job.request_id, None)
        return get_study(
            local_ae(ctx.config), peer_for(job.pacs), model, job.study_uid, job.patient_id, job.series_uids,
            sink=sink.for_request(job.request_id), incoming_dir=sink.incoming_dir(),
            on_progress=watch.progress, should_cancel=watch.should_cancel,
            limits=replace(receive_limits(ctx.config), network_timeout=job.pacs.timeouts.network),
        )
    move = MoveSent(move_message_id(job.request_id), ctx.config.dicom.ae_title)
    record_attempt(ctx, job.request_id, move)
    return move_study(
        local_ae(ctx.config), peer_for(job.pacs), move.destination_ae, model, job.study_uid, job.patient_id,
        job.series_uids, on_progress=watch.progress, should_cancel=watch.should_cancel, message_id=move.message_id,
    )


class _Watch:
    """Progress in, cancel out: at most one database round trip per POLL_SECONDS."""

    def __init__(self, ctx: ServiceContext, request_id: int, project_id: str) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.project_id = project_id
        self._checked = 0.0
        self._canceled = False
        self.access_ended: str | None = None  # why the project may no longer retrieve, if that stopped us
        self.pacs_total: int | None = None

    def should_cancel(self) -> bool:
        if not self._canceled and time.monotonic() - self._checked >= POLL_SECONDS:
            self._checked = time.monotonic()
            with self.ctx.sessions() as session:
                flag = session.execute(select(Request.cancel_requested).where(Request.id == self.request_id)).scalar()
                project = session.get(Project, self.project_id)
            if project is None or not project.active:
                self.access_ended = Denial.PROJECT_INACTIVE.value
            elif not irb_active_at(project.expires_on, self.ctx.clock.now(), self.ctx.config.project_zone(project.id)):
                self.access_ended = Denial.IRB_EXPIRED.value
            self._canceled = bool(flag) or self.access_ended is not None
        return self._canceled

    def progress(self, p: RetrieveProgress) -> None:
        if p.remaining is None:
            return
        total = p.remaining + p.completed + p.failed + p.warning
        if self.pacs_total is None or total > self.pacs_total:
            self.pacs_total = total
            with transaction(self.ctx.sessions) as session:
                row = session.get_one(Request, self.request_id)
                # The PACS knows best how many instances it will send.
                row.expected_instances = max(row.expected_instances, total)


def _write_failure(ctx: ServiceContext, job: _Job) -> str | None:
    """The receiver's reason, when it could not write this request's instances to the cache."""
    return receipt_of(ctx, job.request_id).write_failure


def _judge(ctx: ServiceContext, job: _Job, result: RetrieveResult) -> str:
    with ctx.sessions() as session:
        row = session.get_one(Request, job.request_id)
        expected = max(row.expected_instances, result.completed + result.failed + result.warning)
    receipt = receipt_of(ctx, job.request_id)
    if receipt.write_failure:
        return _end(ctx, job, RequestState.FAILED, receipt.write_failure, status=result.status, result=result,
                    expected=expected)
    outcome = retrieval_outcome(expected, receipt.received, result.failed, 0)
    return _end(ctx, job, outcome.state, outcome.reason, status=result.status, result=result, expected=expected)


def _transient(ctx: ServiceContext, job: _Job, exc: RetriableError) -> str:
    now = ctx.clock.now()
    retry_at = job.pacs.retries.to_domain().next_try(job.attempts, now)
    if retry_at is None:
        return _end(ctx, job, RequestState.FAILED, f"gave up after {job.attempts} attempts: {exc}")
    with transaction(ctx.sessions) as session:
        if not back_off_unless_canceled(session.get_one(Request, job.request_id), exc, retry_at, now):
            return RequestState.CANCELED
        ctx.audit.record("worker", Action.RETRIEVE, Outcome.FAILED, project_id=job.project_id, pacs_id=job.pacs.id,
                         patient_id=job.patient_id, study_uid=job.study_uid,
                         detail={"request": job.request_id, "event": "transient failure", "attempt": job.attempts,
                                 "error": str(exc), "retry_at": retry_at.isoformat()}, session=session)
    LOG.warning("request %s: attempt %s failed (%s); retrying later", job.request_id, job.attempts, type(exc).__name__)
    return RequestState.SCHEDULED


def _end(
    ctx: ServiceContext,
    job: _Job,
    state: RequestState,
    reason: str | None,
    *,
    status: int | None = None,
    result: RetrieveResult | None = None,
    expected: int | None = None,
) -> str:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        row = session.get_one(Request, job.request_id)
        mark_ended(row, state, reason, status, now)
        if result is not None:
            row.failed = result.failed
            row.warnings = result.warning
        if expected is not None:
            row.expected_instances = expected
        counts = {"received": row.received, "expected": row.expected_instances, "failed": row.failed, "bytes": row.bytes}
        outcome = Outcome.OK if state in (RequestState.COMPLETED, RequestState.CANCELED) else Outcome.FAILED
        ctx.audit.record("worker", Action.RETRIEVE, outcome, project_id=job.project_id, pacs_id=job.pacs.id,
                         patient_id=job.patient_id, study_uid=job.study_uid,
                         detail={"request": job.request_id, "event": str(state), "reason": reason or "", **counts},
                         session=session)
    LOG.info("request %s: %s (%s of %s instances)", job.request_id, state, counts["received"], counts["expected"])
    return state
