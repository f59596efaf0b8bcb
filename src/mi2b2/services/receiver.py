"""The C-STORE receipt door and the file's way into the project cache.

For each arriving instance: find the retrieval it belongs to (the calling
PACS and the study), judge it with `domain.receipt`, and then either refuse it
(status + audit, the temp file is discarded by the adapter) or move the file
into place and index it. The file is renamed into the cache before the index
row is committed, so a crash in between leaves a complete, unindexed file that
the retry or `fsck --repair` picks up, never an index row without a file.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Project, Request
from mi2b2.adapters.dicom.store_scp import ReceivedInstance
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.domain.receipt import InFlight, Refusal, StoreStatus, judge_receipt
from mi2b2.domain.requests import RequestKind, RequestState, estimated_bytes
from mi2b2.errors import Mi2b2Error
from mi2b2.services.allow_list import institution_rules, patient_allowed
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.cache import Arrival, index_arrivals
from mi2b2.services.context import ServiceContext

LOG = logging.getLogger(__name__)
LOOKUP_SECONDS = 1.0  # how long a looked-up retrieval is trusted before asking the database again


@dataclass
class _Entry:
    request: InFlight | None
    looked_up: float


class ReceiverSink:
    """Implements the adapter's InstanceSink for every association (C-MOVE
    receipt) or, bound to one request, for a C-GET association."""

    def __init__(self, ctx: ServiceContext, store: CacheStore, request_id: int | None = None,
                 indexer: Indexer | None = None) -> None:
        self.ctx = ctx
        self.store = store
        self.request_id = request_id
        self.indexer = indexer or Indexer(ctx, store)
        self._lookups: dict[tuple[str, str], _Entry] = {}
        self._owners: dict[int, str] = {}
        self._lock = threading.Lock()

    def for_request(self, request_id: int) -> ReceiverSink:
        return ReceiverSink(self.ctx, self.store, request_id, self.indexer)

    def close(self) -> None:
        self.indexer.stop()

    def accept(self, instance: ReceivedInstance) -> int:
        header = instance.header
        request = self._in_flight(instance.peer_ae, header.study_uid)
        refusal = judge_receipt(
            request, header.patient_id, header.series_uid, instance.size,
            instance.move_originator_ae, self.ctx.config.dicom.ae_title, instance.peer_ae, header.issuer,
        )
        if refusal is not None:
            self._refuse(instance, request, refusal)
            return refusal.status
        assert request is not None
        try:
            self._store(instance, request)
        except Mi2b2Error as exc:
            fail_request_for_storage(self.ctx, request.request_id, f"cannot write to the cache: {exc}")
            return StoreStatus.OUT_OF_RESOURCES
        return StoreStatus.SUCCESS

    # --- lookup ------------------------------------------------------------------------

    def _in_flight(self, peer_ae: str, study_uid: str) -> InFlight | None:
        key = (peer_ae.strip(), study_uid)
        with self._lock:
            entry = self._lookups.get(key)
            if entry is not None and time.monotonic() - entry.looked_up < LOOKUP_SECONDS:
                return entry.request
        request = self._look_up(*key)
        with self._lock:
            self._lookups[key] = _Entry(request, time.monotonic())
        return request

    def _look_up(self, peer_ae: str, study_uid: str) -> InFlight | None:
        pacs_ids = [p.id for p in self.ctx.config.all_pacs() if p.ae_title == peer_ae]
        query = select(Request).where(
            Request.kind == RequestKind.RETRIEVE,
            Request.state == RequestState.PROCESSING,
            Request.study_uid == study_uid,
        )
        if self.request_id is not None:
            query = query.where(Request.id == self.request_id)
        else:
            query = query.where(Request.pacs_id.in_(pacs_ids))
        with self.ctx.sessions() as session:
            row = session.execute(query.order_by(Request.id).limit(1)).scalar_one_or_none()
            if row is None:
                return None
            project = session.get_one(Project, row.project_id)
            allowed = patient_allowed(session, row.project_id, row.pacs_id, row.patient_id)
            rules = institution_rules(session, row.project_id, row.pacs_id)
            used = session.execute(
                select(func.coalesce(func.sum(CachedStudy.bytes), 0)).where(CachedStudy.project_id == row.project_id)
            ).scalar_one()
            return InFlight(row.id, row.project_id, row.pacs_id or "", row.patient_id, frozenset(row.series_uids or []),
                            allowed, project.quota_bytes, int(used), rules.issuer if rules else None)

    def _count_used(self, request: InFlight, size: int) -> None:
        """Keep the cached usage moving between lookups, so a burst cannot overrun the quota."""
        with self._lock:
            for key, entry in self._lookups.items():
                if entry.request is not None and entry.request.project_id == request.project_id:
                    self._lookups[key] = _Entry(replace(entry.request, used_bytes=entry.request.used_bytes + size),
                                                entry.looked_up)

    # --- outcomes ----------------------------------------------------------------------

    def _store(self, instance: ReceivedInstance, request: InFlight) -> None:
        header = instance.header
        relative = self.store.relative_path(request.project_id, header.study_uid, header.series_uid, header.sop_instance_uid)
        size = self.store.move_in(instance.path, relative)
        self.indexer.submit(Arrival(request.request_id, request.project_id, header, relative, size,
                                    self._owner(request.request_id), request.pacs_id))
        self._count_used(request, size)

    def _owner(self, request_id: int) -> str:
        with self._lock:
            login = self._owners.get(request_id)
        if login is None:
            with self.ctx.sessions() as session:
                login = session.execute(select(Request.user_login).where(Request.id == request_id)).scalar_one()
            with self._lock:
                self._owners[request_id] = login
        return login

    def _refuse(self, instance: ReceivedInstance, request: InFlight | None, refusal: Refusal) -> None:
        header = instance.header
        with transaction(self.ctx.sessions) as session:  # the request's count and the refusal commit together
            if request is not None:
                session.execute(update(Request).where(Request.id == request.request_id).values(
                    failed=Request.failed + 1, last_error=f"instance refused: {refusal.reason}"))
            self.ctx.audit.record(
                f"dicom:{instance.peer_ae.strip()}", Action.RECEIVE, Outcome.DENIED,
                project_id=request.project_id if request else None,
                pacs_id=request.pacs_id if request else None,
                patient_id=header.patient_id or None, study_uid=header.study_uid,
                detail={"reason": refusal.reason, "security": refusal.security,
                        "sop_instance_uid": header.sop_instance_uid, "calling_ae": instance.peer_ae.strip(),
                        "move_originator": instance.move_originator_ae or "", "status": f"0x{int(refusal.status):04X}"},
                session=session,
            )
        LOG.warning("refused a C-STORE from %s: %s", instance.peer_ae.strip(), refusal.reason)


def fail_request_for_storage(ctx: ServiceContext, request_id: int, reason: str) -> None:
    LOG.error("request %s: %s", request_id, reason)
    with transaction(ctx.sessions) as session:
        # The status marks the request for failing when its retrieval returns.
        session.execute(update(Request).where(Request.id == request_id).values(
            failed=Request.failed + 1, last_error=reason, last_status=int(StoreStatus.OUT_OF_RESOURCES)))


class Indexer:
    """Group commit for the receiver: fsync and index accepted instances in batches.

    The network thread only renames the file into the cache and queues it
    here; this thread makes a batch durable (fdatasync, one fsync per folder)
    and then indexes it and counts it against its request in one transaction.
    Per-instance fsyncs and commits on the network thread cost ~15 ms per
    instance, most of the receive time (bench/retrieve.py). A request is
    judged only once its instances are counted (see retrieval.py), so a crash
    between the answer to the PACS and the commit costs a retry, never a file.
    """

    MAX_BATCH = 400
    MAX_WAIT = 0.1  # seconds a batch may wait to grow
    # A PACS sends the instances of a study back to back (~2 ms apart on a
    # fast link); a pause this long means it has stopped, and the retrieval
    # waiting for its last instances to be counted should not wait MAX_WAIT.
    IDLE_GAP = 0.01

    def __init__(self, ctx: ServiceContext, store: CacheStore) -> None:
        self.ctx = ctx
        self.store = store
        self._queue: queue.Queue[Arrival] = queue.Queue()
        self._done = threading.Condition()
        self._submitted = 0
        self._committed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, arrival: Arrival) -> None:
        self._ensure_running()
        with self._done:
            self._submitted += 1
        self._queue.put(arrival)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is indexed (or given up on)."""
        with self._done:
            target = self._submitted
            return self._done.wait_for(lambda: self._committed >= target, timeout)

    def stop(self) -> None:
        self.flush(10)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _ensure_running(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="mi2b2-indexer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._commit(batch)

    def _next_batch(self) -> list[Arrival]:
        try:
            batch = [self._queue.get(timeout=0.5)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.MAX_WAIT
        while len(batch) < self.MAX_BATCH:
            try:
                batch.append(self._queue.get(timeout=max(min(deadline - time.monotonic(), self.IDLE_GAP), 0)))
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[Arrival]) -> None:
        try:
            gone = set(self.store.make_durable([a.relative_path for a in batch]))
            present = [a for a in batch if a.relative_path not in gone]
            for _ in range(3):
                try:
                    self._index(present)
                    break
                except OperationalError:
                    LOG.warning("indexing %d instances failed on a database error; trying again", len(present))
                    time.sleep(1)
            else:
                raise RuntimeError("the database refused the cache index three times")
        except Exception as exc:
            LOG.exception("could not index %d received instances", len(batch))
            with contextlib.suppress(Exception):
                self._remove_unindexed(batch)  # if even that fails, fsck finds them
            for request_id in {a.request_id for a in batch}:
                with contextlib.suppress(Exception):
                    fail_request_for_storage(self.ctx, request_id, f"cannot write to the cache: {exc}")
        finally:
            with self._done:
                self._committed += len(batch)
                self._done.notify_all()

    def _remove_unindexed(self, batch: list[Arrival]) -> None:
        """Leave no file the index does not name (a resent instance indexed earlier stays)."""
        paths = [a.relative_path for a in batch]
        with self.ctx.sessions() as session:
            indexed = set(session.execute(
                select(CachedInstance.relative_path).where(CachedInstance.relative_path.in_(paths))
            ).scalars())
        for path in set(paths) - indexed:
            self.store.remove(path)

    def _index(self, arrivals: list[Arrival]) -> None:
        counts: dict[int, list[int]] = {}
        for a in arrivals:
            n, size = counts.setdefault(a.request_id, [0, 0])
            counts[a.request_id] = [n + 1, size + a.size]
        with transaction(self.ctx.sessions) as session:
            index_arrivals(session, arrivals, self.ctx.clock.now())
            for request_id, (n, size) in counts.items():
                row = session.get(Request, request_id)
                if row is None:
                    continue
                row.received += n
                row.bytes += size
                row.expected_bytes = estimated_bytes(row.expected_instances, row.received, row.bytes)
