"""The worker: schedule, run retrievals in threads, keep a heartbeat.

`mi2b2 serve` runs one in-process; `mi2b2 worker` runs more, on any host that
reaches the database and the PACS. Limits hold across all of them because
every decision is taken under the database's scheduling lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from mi2b2.adapters.db.outage import OutageLog, is_outage
from mi2b2.domain.health import worker_stale_after
from mi2b2.domain.request_states import IllegalTransition
from mi2b2.domain.requests import ENDED
from mi2b2.errors import Mi2b2Error
from mi2b2.services import notifications, search_jobs
from mi2b2.services.audit_syslog import AtnaDelivery, AtnaSender
from mi2b2.services.context import ServiceContext
from mi2b2.services.forward import run_forward, schedule_forwards
from mi2b2.services.receiver import ReceiverSink
from mi2b2.services.retrieval import fail_unexpectedly, run_retrieval
from mi2b2.services.scheduler import (
    heartbeat,
    new_worker_id,
    requeue_interrupted,
    requeue_orphans,
    retire_worker,
    schedule_once,
)

LOG = logging.getLogger(__name__)
MAX_PARALLEL = 32  # retrievals one worker runs at once; the PACS limits are usually far lower
MAX_SEARCH_JOBS = 4  # search jobs one worker runs at once; the query governor paces them together
INTERRUPTED = "interrupted"  # a run that stopped because the database went away; requeued once it is back
LOST_RACE = "lost"  # a run whose request another worker requeued meanwhile (it judged this one gone)


class Worker:
    def __init__(self, ctx: ServiceContext, sink: ReceiverSink, poll_seconds: float | None = None,
                 stale_after: timedelta | None = None) -> None:
        self.ctx = ctx
        self.sink = sink
        self.poll_seconds = poll_seconds or ctx.config.server.worker_poll_seconds
        self._stale_after = stale_after or worker_stale_after(self.poll_seconds)
        self.worker_id = new_worker_id()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix="retrieval")
        self._running: set[Future[str]] = set()
        self._search_jobs: set[Future[str]] = set()
        self._thread: threading.Thread | None = None
        self._next_checkpoint = ctx.clock.now()
        self._outage = OutageLog("worker", first_wait=self.poll_seconds)
        self._outage_wait = self.poll_seconds
        self._interrupted_lock = threading.Lock()
        self._interrupted_requests: set[int] = set()
        self._interrupted_jobs: set[int] = set()
        # Its own thread: a collector that is slow or down must not hold up scheduling.
        self._atna = (AtnaDelivery(AtnaSender(ctx.sessions, ctx.clock, ctx.config), self.poll_seconds)
                      if ctx.config.audit.atna is not None else None)

    @property
    def stale_after(self) -> timedelta:
        """How long another worker's heartbeat may be silent before its requests are taken back."""
        return self._stale_after

    def recover(self) -> None:
        """After a crash: requeue what dead workers left processing and drop their temp files."""
        heartbeat(self.ctx, self.worker_id)
        requeued = requeue_orphans(self.ctx, self.stale_after, caller=self.worker_id)
        removed = self.sink.store.clean_stale_incoming(self.ctx.clock.now())
        if requeued or removed:
            LOG.warning("recovered %d interrupted requests and %d partial files", len(requeued), removed)

    def tick(self) -> list[int]:
        heartbeat(self.ctx, self.worker_id)
        self._requeue_interrupted()
        requeue_orphans(self.ctx, self.stale_after, caller=self.worker_id)
        result = schedule_once(self.ctx, self.worker_id)
        if result.canceled:
            self._notify(*result.canceled)
        for request_id in result.started:
            future = self._pool.submit(self._run, request_id)
            self._running.add(future)
            future.add_done_callback(self._running.discard)
        # Forwards share the pool, the lock and the notices; their limits are per destination.
        forwards = schedule_forwards(self.ctx, self.worker_id)
        for request_id in forwards:
            future = self._pool.submit(self._run, request_id, forward=True)
            self._running.add(future)
            future.add_done_callback(self._running.discard)
        self._start_search_jobs()
        self._guarded(self._warn_irb_expiring)  # a mail relay that is down must not stop scheduling
        return result.started + forwards

    def _warn_irb_expiring(self) -> None:
        notifications.warn_irb_expiring(self.ctx)

    def _start_search_jobs(self) -> None:
        for job_id in search_jobs.claim_jobs(self.ctx, self.worker_id, MAX_SEARCH_JOBS - len(self._search_jobs)):
            future = self._pool.submit(self._run_search_job, job_id)
            self._search_jobs.add(future)
            future.add_done_callback(self._search_jobs.discard)

    def _requeue_interrupted(self) -> None:
        """What the last outage interrupted goes back to the queue, now that the database answers."""
        with self._interrupted_lock:
            requests, jobs = set(self._interrupted_requests), set(self._interrupted_jobs)
        if requests:
            requeue_interrupted(self.ctx, self.worker_id, requests)
        for job_id in jobs:
            search_jobs.release_job(self.ctx, job_id, self.worker_id)
        with self._interrupted_lock:
            self._interrupted_requests -= requests
            self._interrupted_jobs -= jobs

    def _run_search_job(self, job_id: int) -> str:
        try:
            return search_jobs.run_job(self.ctx, job_id, self.worker_id, self._stop.is_set)
        except Exception as exc:
            if is_outage(exc):
                LOG.warning("search job %s: stopped, the database is unreachable; it resumes once it is back", job_id)
                with self._interrupted_lock:
                    self._interrupted_jobs.add(job_id)
                return INTERRUPTED
            LOG.exception("search job %s crashed", job_id)
            with contextlib.suppress(Exception):  # else it waits for this worker to be gone
                search_jobs.release_job(self.ctx, job_id, self.worker_id)
            return "crashed"
        finally:
            self._wake.set()

    def run_forever(self) -> None:
        recovered = False
        while not self._stop.is_set():
            if not recovered:
                # Retried until it works: a worker that skipped recovery would leave
                # a crashed worker's requests processing forever.
                recovered = self._guarded(self.recover)
                if not recovered:
                    self._pause()
                    continue
                self._outage.succeeded()
            if self._guarded(self.tick):
                self._outage.succeeded()
            if self.ctx.clock.now() >= self._next_checkpoint:
                self._guarded(self.checkpoint)
            self._pause()

    def _pause(self) -> None:
        if self._outage.down:
            self._stop.wait(self._outage_wait)  # backing off: finished retrievals need not wake it early
        else:
            self._wake.wait(self.poll_seconds)
        self._wake.clear()

    def checkpoint(self) -> None:
        """Sign the audit chain head into the checkpoint file outside the database."""
        self._next_checkpoint = self.ctx.clock.now() + timedelta(seconds=self.ctx.config.audit.checkpoint_seconds)
        self.ctx.audit.checkpoint()

    def _guarded(self, step: Callable[[], object]) -> bool:
        """Run one step of the loop; the loop must outlive a database outage (said once, then waited out)."""
        name = getattr(step, "__name__", "step")
        try:
            step()
        except Exception as exc:
            if is_outage(exc):
                self._outage_wait = self._outage.failed()
            elif isinstance(exc, Mi2b2Error):
                LOG.error("worker step %s failed: %s", name, exc)
            else:
                LOG.exception("worker step %s failed", name)
            return False
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="mi2b2-worker", daemon=True)
        self._thread.start()
        if self._atna is not None:
            self._atna.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, wait_seconds: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(wait_seconds)
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            retire_worker(self.ctx, self.worker_id)
        except Exception as exc:
            if is_outage(exc):  # harmless: its heartbeat goes stale and another worker drops the row
                LOG.warning("could not retire worker %s: the database is unreachable", self.worker_id)
            else:
                LOG.exception("could not retire worker %s", self.worker_id)
        self._guarded(self.checkpoint)  # a clean stop leaves the newest head signed
        if self._atna is not None:
            self._atna.stop()  # after the last events above were recorded: they go out too

    def busy(self) -> int:
        return len(self._running)

    def _run(self, request_id: int, forward: bool = False) -> str:
        try:
            if forward:
                state = run_forward(self.ctx, request_id)
            else:
                state = run_retrieval(self.ctx, request_id, self.sink, pacs_freed=self._wake.set)
        except Exception as exc:
            if is_outage(exc):  # not the request's fault: it is retried, not failed
                LOG.warning("request %s: stopped, the database is unreachable; it goes back to the queue once it is back",
                            request_id)
                with self._interrupted_lock:
                    self._interrupted_requests.add(request_id)
                return INTERRUPTED
            if isinstance(exc, IllegalTransition):  # another worker requeued it meanwhile: its run counts, not ours
                LOG.warning("request %s: %s; this worker's result is dropped", request_id, exc)
                return LOST_RACE
            LOG.exception("request %s: %s crashed", request_id, "forward" if forward else "retrieval")
            fail_unexpectedly(self.ctx, request_id, exc, self.worker_id)
            state = "failed"
        finally:
            self._wake.set()  # a slot is free: schedule at once rather than at the next poll
        if state in ENDED:
            self._notify(request_id)
        return state

    def _notify(self, *request_ids: int) -> None:
        try:
            notifications.on_requests_ended(self.ctx, list(request_ids))
        except Exception:
            LOG.exception("requests %s: notification failed", ", ".join(map(str, request_ids[:10])))
