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
import socket
from collections.abc import Callable
from dataclasses import replace

from sqlalchemy import update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.adapters.dicom.errors import DeliveryInterrupted, DimseFailure, ReceiverUnreachable, TlsHandshakeFailed
from mi2b2.adapters.dicom.retrieve import RetrieveProgress, RetrieveResult, get_study, move_study
from mi2b2.adapters.process import accepts_connections
from mi2b2.config import PacsConfig, RetrieveMethod
from mi2b2.domain.health import worker_stale_after
from mi2b2.domain.receipt import move_message_id
from mi2b2.domain.request_states import Event
from mi2b2.domain.requests import RequestKind, RequestState, retrieval_outcome
from mi2b2.errors import Mi2b2Error, RetriableError
from mi2b2.services import jobs
from mi2b2.services.context import ServiceContext
from mi2b2.services.jobs import Job
from mi2b2.services.pacs import local_ae, peer_for
from mi2b2.services.receipts import MoveSent, ReceiptLost, receipt_of, record_attempt
from mi2b2.services.receiver import ReceiverSink, receive_limits
from mi2b2.services.request_rows import change_state
from mi2b2.services.scheduler import receiver_hosts, receiver_missing, receivers_changing, receivers_keep_heartbeats

LOG = logging.getLogger(__name__)
INDEX_WAIT_SECONDS = 15.0  # how long the receiver may take to index what it already acknowledged
INDEX_POLL_SECONDS = 0.02  # how often that wait re-reads the request's count


def run_retrieval(
    ctx: ServiceContext, request_id: int, sink: ReceiverSink, pacs_freed: Callable[[], None] = lambda: None
) -> str:
    """Returns the request's state afterwards. ``pacs_freed`` is called once the
    PACS has finished sending, when its slot may go to the next request."""
    job = jobs.load(ctx, request_id, RequestKind.RETRIEVE)
    if job is None:
        return RequestState.CANCELED
    _, _, pacs = ctx.config.pacs_location(job.target_id)
    watch = jobs.Watch(ctx, job)
    try:
        result = _retrieve(ctx, job, pacs, sink, watch)
        _blame_our_receiver(ctx, pacs, result)
    except ReceiverUnreachable as exc:
        # Our outage, not the PACS's nor the study's: it does not use up the request's attempts.
        return jobs.back_off(ctx, job, exc, pacs.retries.to_domain(), _record(), counts=False)
    except RetriableError as exc:
        return jobs.back_off(ctx, job, exc, pacs.retries.to_domain(), _record())
    except Mi2b2Error as exc:
        status = exc.status if isinstance(exc, DimseFailure) else None
        if isinstance(exc, DimseFailure) and _receiver_down(ctx, pacs, status, None):
            return jobs.back_off(ctx, job, _unreachable(ctx, pacs, status), pacs.retries.to_domain(), _record(),
                                 counts=False)
        interrupted = _interrupted(ctx, pacs, status, None)
        if interrupted is not None:
            return jobs.back_off(ctx, job, interrupted, pacs.retries.to_domain(), _record())
        # A PACS whose C-STOREs we refused for lack of space reports a failure
        # of its own; ours is the reason worth showing.
        return jobs.end(ctx, job, RequestState.FAILED, _write_failure(ctx, job) or str(exc), status=status,
                        record=_record(), security=isinstance(exc, TlsHandshakeFailed) and exc.security)
    _free_the_pacs(ctx, job)
    pacs_freed()
    _await_counts(ctx, job, sink, result.completed + result.warning)  # C-MOVE and C-GET alike
    if result.canceled:
        return jobs.end(ctx, job, RequestState.CANCELED, watch.cancel_reason, status=result.status, record=_record())
    return _judge(ctx, job, pacs, result)


def _blame_our_receiver(ctx: ServiceContext, pacs: PacsConfig, result: RetrieveResult) -> None:
    """Every sub-operation of a C-MOVE failed, nothing arrived, and our receiver is down: that is why."""
    if result.failed and not result.completed and not result.warning:
        if _receiver_down(ctx, pacs, result.status, result):
            raise _unreachable(ctx, pacs, result.status)
        interrupted = _interrupted(ctx, pacs, result.status, result)
        if interrupted is not None:
            raise interrupted


def _nothing_delivered(pacs: PacsConfig, status: int | None, result: RetrieveResult | None) -> bool:
    """A C-MOVE failure a PACS gives when it cannot deliver: 0xA801 "move destination unknown"
    (which pynetdicom and others also answer when the destination does not answer), or
    0xA7xx/0xCxxx with nothing sent."""
    if pacs.retrieve is not RetrieveMethod.C_MOVE or status is None:
        return False
    if not (status == 0xA801 or 0xA700 <= status <= 0xA7FF or 0xC000 <= status <= 0xCFFF):
        return False
    return result is None or not result.completed


def _receiver_down(ctx: ServiceContext, pacs: PacsConfig, status: int | None, result: RetrieveResult | None) -> bool:
    """Whether a failed C-MOVE failed because mi2b2's receiver could not be reached: it could
    not deliver, and our receiver is down."""
    return _nothing_delivered(pacs, status, result) and _our_receiver_down(ctx)


def _interrupted(ctx: ServiceContext, pacs: PacsConfig, status: int | None,
                 result: RetrieveResult | None) -> DeliveryInterrupted | None:
    """A C-MOVE that could not deliver while mi2b2's receivers were changing (several behind a
    balancer, or one just started): the one the PACS reached may have died mid-association, or
    the balancer not route to the new one yet, which a retry (that counts) gets past."""
    if status is None or not _nothing_delivered(pacs, status, result):
        return None
    with ctx.sessions() as session:
        receivers = receivers_changing(session, ctx.clock.now(), worker_stale_after(ctx.config.server.worker_poll_seconds))
    if not receivers:
        return None
    return DeliveryInterrupted(f"{pacs.ae_title}@{pacs.host}:{pacs.port}", status, receivers)


def _our_receiver_down(ctx: ServiceContext) -> bool:
    """After a C-MOVE failed: no receiver of ours keeps a live heartbeat, or the receiver this
    host runs (or, where none keeps heartbeats, the configured one) takes no connection now.
    A worker-only host has no receiver of its own to try, and trusts the heartbeats."""
    now = ctx.clock.now()
    with ctx.sessions() as session:
        if receiver_missing(ctx, session, now) is not None:
            return True
        local = receiver_hosts(session) & {socket.gethostname()} or not receivers_keep_heartbeats(session)
    dicom = ctx.config.dicom
    return bool(local) and not accepts_connections(dicom.host, dicom.port)


def _no_receiver_alive(ctx: ServiceContext) -> bool:
    """Before a C-MOVE: receivers keep heartbeats and none is alive (the scheduler holds C-MOVEs
    then; this catches one started just before the last receiver stopped)."""
    with ctx.sessions() as session:
        return receiver_missing(ctx, session, ctx.clock.now()) is not None


def _unreachable(ctx: ServiceContext, pacs: PacsConfig, status: int | None) -> ReceiverUnreachable:
    dicom = ctx.config.dicom
    return ReceiverUnreachable(f"{pacs.ae_title}@{pacs.host}:{pacs.port}", status, dicom.ae_title, dicom.host, dicom.port)


def _free_the_pacs(ctx: ServiceContext, job: Job) -> None:
    """The PACS is done with us: the scheduler may start the next retrieval on it
    while this one waits for its last instances to be made durable and counted."""
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == job.request_id).values(pacs_done_at=ctx.clock.now()))


def _await_counts(ctx: ServiceContext, job: Job, sink: ReceiverSink, acknowledged: int) -> None:
    """Instances are answered before they are indexed (group commit): wait until
    the request counts what the PACS says we acknowledged, or the receiver says it
    cannot write them. The receiver may be in another process, so this is read
    from the database; flushing this process's receiver first only makes it quicker."""
    sink.flush()
    jobs.wait_until(ctx.timer, lambda: receipt_of(ctx, job.request_id).accounts_for(acknowledged),
                    INDEX_WAIT_SECONDS, INDEX_POLL_SECONDS)


def fail_unexpectedly(ctx: ServiceContext, request_id: int, error: BaseException, worker_id: str) -> None:
    """A bug or a vanished PACS configuration must not leave a request holding a slot forever.
    Only while ``worker_id`` still runs it: a request another worker took over is theirs to end."""
    with transaction(ctx.sessions) as session:
        row = session.get(Request, request_id)
        if row is not None and row.state == RequestState.PROCESSING and row.worker == worker_id:
            change_state(row, Event.FAIL)
            row.ended_at = ctx.clock.now()
            row.last_error = f"internal error ({type(error).__name__}): {error}; see the server log, then retry"


def _retrieve(ctx: ServiceContext, job: Job, pacs: PacsConfig, sink: ReceiverSink, watch: jobs.Watch) -> RetrieveResult:
    if watch.should_cancel():
        return RetrieveResult(status=0xFE00, completed=0, failed=0, warning=0, failed_sop_uids=[], canceled=True)
    on_progress = _PacsTotal(ctx, job.request_id)
    LOG.info("request %s: retrieving from %s by %s", job.request_id, pacs.id, pacs.retrieve.value)
    if pacs.retrieve is RetrieveMethod.C_GET:
        record_attempt(ctx, job.request_id, None)
        return get_study(
            local_ae(ctx.config), peer_for(pacs, ctx.config), pacs.query_model, job.study_uid, job.patient_id,
            job.series_uids,
            sink=sink.for_request(job.request_id), incoming_dir=sink.incoming_dir(),
            on_progress=on_progress, should_cancel=watch.should_cancel,
            limits=replace(receive_limits(ctx.config), network_timeout=pacs.timeouts.network),
        )
    if _no_receiver_alive(ctx):  # the PACS would have nowhere to send: do not load it for nothing
        raise _unreachable(ctx, pacs, None)
    move = MoveSent(move_message_id(job.request_id), ctx.config.dicom.ae_title)
    record_attempt(ctx, job.request_id, move)
    return move_study(
        local_ae(ctx.config), peer_for(pacs, ctx.config), move.destination_ae, pacs.query_model, job.study_uid,
        job.patient_id,
        job.series_uids, on_progress=on_progress, should_cancel=watch.should_cancel, message_id=move.message_id,
    )


class _PacsTotal:
    """The PACS knows best how many instances it will send: raise the request's
    expectation when the PACS announces more (one write per increase)."""

    def __init__(self, ctx: ServiceContext, request_id: int) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.total: int | None = None

    def __call__(self, p: RetrieveProgress) -> None:
        if p.remaining is None:
            return
        total = p.remaining + p.completed + p.failed + p.warning
        if self.total is None or total > self.total:
            self.total = total
            with transaction(self.ctx.sessions) as session:
                row = session.get_one(Request, self.request_id)
                row.expected_instances = max(row.expected_instances, total)


def _write_failure(ctx: ServiceContext, job: Job) -> str | None:
    """The receiver's reason, when it could not write this request's instances to the cache."""
    return receipt_of(ctx, job.request_id).write_failure


def _judge(ctx: ServiceContext, job: Job, pacs: PacsConfig, result: RetrieveResult) -> str:
    with ctx.sessions() as session:
        row = session.get_one(Request, job.request_id)
        expected = max(row.expected_instances, result.completed + result.failed + result.warning)
    record = _record(result, expected)
    receipt = receipt_of(ctx, job.request_id)
    if receipt.write_failure:
        return jobs.end(ctx, job, RequestState.FAILED, receipt.write_failure, status=result.status, record=record)
    if receipt.received < result.completed + result.warning:
        return jobs.back_off(ctx, job, ReceiptLost(result.completed + result.warning, receipt.received),
                             pacs.retries.to_domain(), record)
    outcome = retrieval_outcome(expected, receipt.received, result.failed, 0)
    return jobs.end(ctx, job, outcome.state, outcome.reason, status=result.status, record=record)


def _record(result: RetrieveResult | None = None, expected: int | None = None) -> jobs.Record:
    """What a retrieval's end writes (the PACS's failures and warnings; the receiver
    counted what arrived) and audits."""

    def record(row: Request) -> dict[str, int]:
        if result is not None:
            row.failed = result.failed
            row.warnings = result.warning
        if expected is not None:
            row.expected_instances = expected
        return {"received": row.received, "expected": row.expected_instances, "failed": row.failed, "bytes": row.bytes}

    return record
