"""The C-STORE receipt door and the file's way into the project cache.

For each arriving instance: find the retrieval it belongs to (from the calling
PACS, the one whose C-MOVE the instance names, else the one of its study: see
`domain.receipt.match_retrieval`), judge it with `domain.receipt`, and then
either refuse it (status + audit, the temp file is discarded by the adapter) or
move the file into place and index it. The file is renamed into the cache
before the index row is committed, so a crash in between leaves a complete,
unindexed file that the retry or `fsck --repair` picks up, never an index row
without a file. What the receiver tells the retrieval goes through
`services.receipts`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.outage import OutageLog, is_outage
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Project, Request
from mi2b2.adapters.dicom.files import InstanceHeader
from mi2b2.adapters.dicom.proxy_protocol import ProxyTrust
from mi2b2.adapters.dicom.scu import resolve_host
from mi2b2.adapters.dicom.store_receipt import Peer, ReceivedInstance, ReceiveLimits
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.config import SiteConfig
from mi2b2.domain.audit_chain import fit_field
from mi2b2.domain.receipt import (
    Candidate,
    InFlight,
    MoveOrigin,
    PacsIdentity,
    Refusal,
    StoreStatus,
    identify_peer,
    judge_receipt,
    match_retrieval,
)
from mi2b2.domain.requests import RequestKind, RequestState, estimated_bytes
from mi2b2.errors import Mi2b2Error
from mi2b2.services.allow_list import institution_rules, patient_allowed
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.cache.index import Arrival, index_instances
from mi2b2.services.context import ServiceContext
from mi2b2.services.receipts import record_write_failure

LOG = logging.getLogger(__name__)
LOOKUP_SECONDS = 1.0  # how long a looked-up retrieval is trusted before asking the database again
RESOLVE_SECONDS = 300.0  # how long a PACS host's resolved addresses are trusted
LISTED = 20  # at most this many UIDs and patients named in one association's refusal row


@dataclass
class _Entry:
    request: InFlight | None
    looked_up: float


@dataclass
class _Refused:
    """What was refused on one association, recorded once when it ends."""

    peer: Peer
    count: int = 0
    security: bool = False
    reasons: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    projects: set[str] = field(default_factory=set)
    pacs: set[str] = field(default_factory=set)
    patients: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    instances: list[str] = field(default_factory=list)
    against: Counter[int] = field(default_factory=Counter)  # request id -> its own instances refused
    last_error: dict[int, str] = field(default_factory=dict)

    def add(self, header: InstanceHeader | None, status: int, reason: str, security: bool,
            request: InFlight | None = None, stray: bool = True) -> None:
        self.count += 1
        self.security = self.security or security
        self.reasons[reason] += 1
        self.statuses[f"0x{int(status):04X}"] += 1
        if request is not None:
            self.projects.add(request.project_id)
            self.pacs.add(request.pacs_id)
            if not stray:  # one of the retrieval's own instances: it counts as failed there
                self.against[request.request_id] += 1
                self.last_error[request.request_id] = f"instance refused: {reason}"
        if header is not None:
            _listed(self.patients, header.patient_id)
            _listed(self.studies, header.study_uid)
            if len(self.instances) < LISTED:
                self.instances.append(fit_field(header.sop_instance_uid, 64) or "")


def _listed(values: set[str], value: str) -> None:
    if value and len(values) < LISTED:
        values.add(fit_field(value, 64) or "")


class ReceiverSink:
    """Implements the adapter's InstanceSink and ReceiptGuard for every
    association (C-MOVE receipt) or, bound to one request, for a C-GET association."""

    def __init__(self, ctx: ServiceContext, store: CacheStore, request_id: int | None = None,
                 indexer: Indexer | None = None) -> None:
        self.ctx = ctx
        self.store = store
        self.request_id = request_id
        self.indexer = indexer or Indexer(ctx, store)
        self._lookups: dict[tuple[tuple[str, ...], str, MoveOrigin], _Entry] = {}
        self._owners: dict[int, str] = {}
        self._peers: dict[int, tuple[str, ...]] = {}  # association -> the PACS its peer is
        self._refused: dict[int, _Refused] = {}  # association -> what was refused on it so far
        self._identities: tuple[float, list[PacsIdentity]] | None = None
        self._lock = threading.Lock()
        self._outage = self.indexer.outage  # one account of the database's state for the receiver

    def for_request(self, request_id: int) -> ReceiverSink:
        return ReceiverSink(self.ctx, self.store, request_id, self.indexer)

    def close(self) -> None:
        self.indexer.stop()

    def incoming_dir(self) -> Path:
        """Where a C-GET's arriving instances are written before they are judged."""
        return self.store.incoming_dir()

    def flush(self, timeout: float = 30.0) -> bool:
        """Index what this process acknowledged so far: a fast path, for what another
        process receives is counted all the same (see `receipts.receipt_of`)."""
        return self.indexer.flush(timeout)

    # --- the association ---------------------------------------------------------------

    def admit(self, peer: Peer) -> str | None:
        verdict = identify_peer(peer.ae_title, peer.address, self._pacs_identities())
        if verdict.refusal is not None:
            self.ctx.audit.record(
                f"dicom:{peer.ae_title}", Action.RECEIVE, Outcome.DENIED,
                detail={"reason": "association refused: " + verdict.refusal, "security": True,
                        "calling_ae": peer.ae_title, "address": peer.address},
            )
            return verdict.refusal
        with self._lock:
            self._peers[peer.association] = verdict.pacs_ids
        return None

    def tls_refused(self, address: str, reason: str) -> None:
        """A sender failed the receiver's TLS handshake (another CA, no certificate, plain DICOM)."""
        self.ctx.audit.record(
            f"dicom:{address}", Action.RECEIVE, Outcome.DENIED,
            detail={"reason": "TLS connection refused: " + reason, "security": True, "address": address},
        )

    def proxy_refused(self, address: str, reason: str) -> None:
        """A connection refused for its PROXY header: none from a balancer, or one from elsewhere (forged)."""
        self.ctx.audit.record(
            f"dicom:{address}", Action.RECEIVE, Outcome.DENIED,
            detail={"reason": "connection refused: " + reason, "security": True, "address": address},
        )

    def association_ended(self, peer: Peer) -> None:
        with self._lock:
            self._peers.pop(peer.association, None)
            refused = self._refused.pop(peer.association, None)
        if refused is not None:
            self._record_refusals(refused)

    def forget_peers(self) -> None:
        """The configuration was reloaded: resolve the PACS's addresses again, and look
        retrievals up afresh."""
        with self._lock:
            self._identities = None
            self._lookups.clear()

    def _pacs_of(self, peer: Peer) -> tuple[str, ...]:
        with self._lock:
            known = self._peers.get(peer.association)
        if known is not None:
            return known
        return identify_peer(peer.ae_title, peer.address, self._pacs_identities()).pacs_ids

    def _pacs_identities(self) -> list[PacsIdentity]:
        with self._lock:
            cached = self._identities
        if cached is not None and self.ctx.timer.monotonic() - cached[0] < RESOLVE_SECONDS:
            return cached[1]
        identities = pacs_identities(self.ctx.config)
        with self._lock:
            self._identities = (self.ctx.timer.monotonic(), identities)
        return identities

    # --- each instance -----------------------------------------------------------------

    def judge(self, peer: Peer, header: InstanceHeader, move_originator_ae: str | None,
              move_originator_message_id: int | None = None) -> int | None:
        """From the header alone, before the adapter writes a byte."""
        try:
            request = self._in_flight(peer, header.study_uid, MoveOrigin(move_originator_ae, move_originator_message_id))
        except Exception as exc:
            return self._unjudged(exc)
        refusal = self._judge(request, peer, header, 0, move_originator_ae)
        if refusal is None:
            return None
        self._note(peer, header, refusal, request)
        return int(refusal.status)

    def refused(self, peer: Peer, header: InstanceHeader | None, status: int, reason: str) -> None:
        """The adapter refused an instance by itself (too large, unreadable)."""
        with self._lock:
            self._refused.setdefault(peer.association, _Refused(peer)).add(header, status, reason, security=False)

    def _unjudged(self, error: Exception) -> int:
        """No verdict without the database: a status the PACS counts as a failure
        of this instance alone, and no request failed for it (the retry sends it again)."""
        if not is_outage(error):
            raise error
        self._outage.failed()
        return StoreStatus.OUT_OF_RESOURCES

    def accept(self, instance: ReceivedInstance) -> int:
        header = instance.header
        peer = instance.peer or Peer(instance.peer_ae.strip(), "", 0)
        origin = MoveOrigin(instance.move_originator_ae, instance.move_originator_message_id)
        try:
            request = self._in_flight(peer, header.study_uid, origin)
            owner = self._owner(request.request_id) if request is not None else ""
        except Exception as exc:
            return self._unjudged(exc)
        refusal = self._judge(request, peer, header, instance.size, instance.move_originator_ae)
        if refusal is not None:
            self._note(peer, header, refusal, request)
            if instance.peer is None:  # no association to sum up at: record it now
                self.association_ended(peer)
            return refusal.status
        assert request is not None
        try:
            self._store(instance, request, owner)
        except Mi2b2Error as exc:
            record_write_failure(self.ctx, request.request_id, f"cannot write to the cache: {exc}")
            return StoreStatus.OUT_OF_RESOURCES
        return StoreStatus.SUCCESS

    def _judge(self, request: InFlight | None, peer: Peer, header: InstanceHeader, size: int,
               move_originator_ae: str | None) -> Refusal | None:
        return judge_receipt(
            request, header.patient_id, header.series_uid, size, move_originator_ae,
            self.ctx.config.dicom.ae_title, peer.ae_title, header.issuer,
            other_uids=(header.study_uid, header.sop_instance_uid),
        )

    # --- lookup ------------------------------------------------------------------------

    def _in_flight(self, peer: Peer, study_uid: str, origin: MoveOrigin) -> InFlight | None:
        key = (self._pacs_of(peer) if self.request_id is None else (), study_uid, origin)
        with self._lock:
            entry = self._lookups.get(key)
            if entry is not None and self.ctx.timer.monotonic() - entry.looked_up < LOOKUP_SECONDS:
                return entry.request
        request = self._look_up(*key)
        self._outage.succeeded()
        with self._lock:
            if len(self._lookups) > 10_000:  # strays with made-up study UIDs must not grow it forever
                self._lookups.clear()
            self._lookups[key] = _Entry(request, self.ctx.timer.monotonic())
        return request

    def _look_up(self, pacs_ids: tuple[str, ...], study_uid: str, origin: MoveOrigin) -> InFlight | None:
        if self.request_id is None and not pacs_ids:
            return None
        query = select(Request.id, Request.study_uid, Request.move_message_id, Request.move_destination_ae).where(
            Request.kind == RequestKind.RETRIEVE,
            Request.state == RequestState.PROCESSING,
            Request.study_uid == study_uid,
        )
        if self.request_id is not None:
            query = query.where(Request.id == self.request_id)
        else:
            query = query.where(Request.pacs_id.in_(list(pacs_ids)))
        with self.ctx.sessions() as session:
            candidates = [Candidate(row_id, uid, message_id, destination)
                          for row_id, uid, message_id, destination in session.execute(query).all()]
            request_id = match_retrieval(candidates, study_uid, origin, self.ctx.config.dicom.ae_title)
            if request_id is None:
                return None
            row = session.get_one(Request, request_id)
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

    def _store(self, instance: ReceivedInstance, request: InFlight, owner: str) -> None:
        header = instance.header
        relative = self.store.relative_path(request.project_id, header.study_uid, header.series_uid, header.sop_instance_uid)
        size = self.store.move_in(instance.path, relative)
        self.indexer.submit(Arrival(request.project_id, header, relative, size, owner, request.pacs_id,
                                    request_id=request.request_id))
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

    def _note(self, peer: Peer, header: InstanceHeader, refusal: Refusal, request: InFlight | None) -> None:
        with self._lock:
            self._refused.setdefault(peer.association, _Refused(peer)).add(
                header, refusal.status, refusal.reason, refusal.security, request, refusal.stray)
        LOG.warning("refused a C-STORE from %s: %s", peer.ae_title, refusal.reason)

    def _record_refusals(self, refused: _Refused) -> None:
        """One audit row for everything refused on an association (and its retrievals' counts)."""
        peer = refused.peer

        def only(values: set[str]) -> str | None:
            return next(iter(values)) if len(values) == 1 else None

        with transaction(self.ctx.sessions) as session:  # the requests' counts and the row commit together
            for request_id, count in sorted(refused.against.items()):  # locked in id order
                session.execute(update(Request).where(Request.id == request_id).values(
                    failed=Request.failed + count, last_error=refused.last_error[request_id]))
            self.ctx.audit.record(
                f"dicom:{peer.ae_title}", Action.RECEIVE, Outcome.DENIED,
                project_id=only(refused.projects), pacs_id=only(refused.pacs),
                patient_id=only(refused.patients), study_uid=only(refused.studies),
                detail={"refused": refused.count, "reasons": dict(refused.reasons), "statuses": dict(refused.statuses),
                        "security": refused.security, "calling_ae": peer.ae_title, "address": peer.address,
                        "patients": sorted(refused.patients), "studies": sorted(refused.studies),
                        "sop_instance_uids": refused.instances},
                session=session,
            )


def pacs_identities(config: SiteConfig) -> list[PacsIdentity]:
    """Each configured PACS with the networks it may call from (its host's addresses unless configured)."""
    identities = []
    for pacs in config.all_pacs():
        addresses = pacs.addresses or list(resolve_host(pacs.host))
        if not addresses:
            LOG.error("PACS %s: host %s does not resolve, so none of its associations can be accepted; "
                      "set its addresses in the configuration", pacs.id, pacs.host)
        networks = tuple(ipaddress.ip_network(a.strip(), strict=False) for a in addresses)
        identities.append(PacsIdentity(pacs.id, pacs.ae_title, networks))
    return identities


def proxy_trust(config: SiteConfig) -> ProxyTrust:
    """The balancers whose connections carry a PROXY header (``[dicom] proxy_protocol_from``)."""
    return ProxyTrust.of(config.dicom.proxy_protocol_from)


def receive_limits(config: SiteConfig) -> ReceiveLimits:
    dicom = config.dicom
    return ReceiveLimits(max_pdu=dicom.max_pdu, max_instance_bytes=dicom.max_instance_size,
                         max_associations_per_peer=dicom.max_associations_per_peer,
                         network_timeout=dicom.network_timeout)


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
        self.outage = OutageLog("receiver", first_wait=1.0)

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
        timer = self.ctx.timer
        deadline = timer.monotonic() + self.MAX_WAIT
        while len(batch) < self.MAX_BATCH:
            try:
                batch.append(self._queue.get(timeout=max(min(deadline - timer.monotonic(), self.IDLE_GAP), 0)))
            except queue.Empty:
                break
        return batch

    def _commit(self, batch: list[Arrival]) -> None:
        try:
            gone = set(self.store.make_durable([a.relative_path for a in batch]))
            present = [a for a in batch if a.relative_path not in gone]
            self._index_until_done(present)
        except Exception as exc:
            LOG.exception("could not index %d received instances", len(batch))
            with contextlib.suppress(Exception):
                self._remove_unindexed(batch)  # if even that fails, fsck finds them
            for request_id in {a.request_id for a in batch}:
                with contextlib.suppress(Exception):
                    record_write_failure(self.ctx, request_id, f"cannot write to the cache: {exc}")
        finally:
            with self._done:
                self._committed += len(batch)
                self._done.notify_all()

    def _index_until_done(self, arrivals: list[Arrival]) -> None:
        """A busy database gets three tries; one that is unreachable is waited for as long as it
        takes (unless the receiver stops): the files are durable and the PACS was told they are stored."""
        busy_tries = 0
        while True:
            try:
                self._index(arrivals)
                self.outage.succeeded()
                return
            except Exception as exc:
                if is_outage(exc) and not self._stop.is_set():
                    self._stop.wait(self.outage.failed())
                    continue
                if not isinstance(exc, OperationalError) or is_outage(exc):
                    raise
                busy_tries += 1
                if busy_tries == 3:
                    raise RuntimeError("the database refused the cache index three times") from None
                LOG.warning("indexing %d instances failed on a database error; trying again", len(arrivals))
                self.ctx.timer.sleep(1)

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
            index_instances(session, arrivals, self.ctx.clock.now())
            # The requests locked in id order, as every multi-row lock on requests is taken
            # (workers requeueing and starting, users canceling): no deadlock on PostgreSQL.
            rows = session.execute(
                select(Request).where(Request.id.in_(sorted(counts))).order_by(Request.id).with_for_update()
                .execution_options(populate_existing=True)).scalars().all()
            for row in rows:
                n, size = counts[row.id]
                row.received += n
                row.bytes += size
                row.expected_bytes = estimated_bytes(row.expected_instances, row.received, row.bytes)
