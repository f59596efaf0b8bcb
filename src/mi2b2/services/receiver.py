"""The C-STORE receipt door and the file's way into the project cache.

For each arriving instance: find the retrieval it belongs to (the calling
PACS and the study), judge it with `domain.receipt`, and then either refuse it
(status + audit, the temp file is discarded by the adapter) or move the file
into place and index it. The file is renamed into the cache before the index
row is committed, so a crash in between leaves a complete, unindexed file that
the retry or `fsck --repair` picks up, never an index row without a file.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Project, ProjectMrn, Request
from mi2b2.adapters.dicom.store_scp import ReceivedInstance
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.domain.receipt import InFlight, Refusal, StoreStatus, judge_receipt
from mi2b2.domain.requests import RequestKind, RequestState, estimated_bytes
from mi2b2.errors import Mi2b2Error
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.cache import index_instance
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

    def __init__(self, ctx: ServiceContext, store: CacheStore, request_id: int | None = None) -> None:
        self.ctx = ctx
        self.store = store
        self.request_id = request_id
        self._lookups: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def for_request(self, request_id: int) -> ReceiverSink:
        return ReceiverSink(self.ctx, self.store, request_id)

    def accept(self, instance: ReceivedInstance) -> int:
        header = instance.header
        request = self._in_flight(instance.peer_ae, header.study_uid)
        refusal = judge_receipt(
            request, header.patient_id, header.series_uid, instance.size,
            instance.move_originator_ae, self.ctx.config.dicom.ae_title,
        )
        if refusal is not None:
            self._refuse(instance, request, refusal)
            return refusal.status
        assert request is not None
        try:
            self._store(instance, request)
        except Mi2b2Error as exc:
            self._fail_request(request, f"cannot write to the cache: {exc}")
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
            allowed = session.get(ProjectMrn, (row.project_id, row.patient_id)) is not None
            used = session.execute(
                select(func.coalesce(func.sum(CachedStudy.bytes), 0)).where(CachedStudy.project_id == row.project_id)
            ).scalar_one()
            return InFlight(row.id, row.project_id, row.pacs_id or "", row.patient_id, frozenset(row.series_uids or []),
                            allowed, project.quota_bytes, int(used))

    def _count_used(self, request: InFlight, size: int) -> None:
        """Keep the cached usage moving between lookups, so a burst cannot overrun the quota."""
        with self._lock:
            for key, entry in self._lookups.items():
                if entry.request is not None and entry.request.project_id == request.project_id:
                    r = entry.request
                    self._lookups[key] = _Entry(
                        InFlight(r.request_id, r.project_id, r.pacs_id, r.patient_id, r.series_uids, r.patient_allowed,
                                 r.quota_bytes, r.used_bytes + size),
                        entry.looked_up,
                    )

    # --- outcomes ----------------------------------------------------------------------

    def _store(self, instance: ReceivedInstance, request: InFlight) -> None:
        header = instance.header
        relative = self.store.relative_path(request.project_id, header.study_uid, header.series_uid, header.sop_instance_uid)
        if self._already_cached(request.project_id, header.study_uid, header.sop_instance_uid):
            new = False  # a retry resends what an earlier attempt stored: count it, keep one copy
        else:
            size = self.store.place(instance.path, relative)
            with transaction(self.ctx.sessions) as session:
                user = session.execute(select(Request.user_login).where(Request.id == request.request_id)).scalar_one()
                new = index_instance(session, request.project_id, header, relative, size, self.ctx.clock.now(),
                                     fetched_by=user, pacs_id=request.pacs_id)
        self._count_received(request, instance.size)
        if new:
            self._count_used(request, instance.size)

    def _already_cached(self, project_id: str, study_uid: str, sop_uid: str) -> bool:
        with self.ctx.sessions() as session:
            return session.execute(
                select(CachedInstance.id)
                .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
                .where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid,
                       CachedInstance.sop_instance_uid == sop_uid)
            ).first() is not None

    def _count_received(self, request: InFlight, size: int) -> None:
        with transaction(self.ctx.sessions) as session:
            row = session.get_one(Request, request.request_id)
            row.received += 1
            row.bytes += size
            row.expected_bytes = estimated_bytes(row.expected_instances, row.received, row.bytes)

    def _refuse(self, instance: ReceivedInstance, request: InFlight | None, refusal: Refusal) -> None:
        header = instance.header
        if request is not None:
            with transaction(self.ctx.sessions) as session:
                session.execute(update(Request).where(Request.id == request.request_id).values(
                    failed=Request.failed + 1, last_error=f"instance refused: {refusal.reason}"))
        self.ctx.audit.record(
            f"dicom:{instance.peer_ae.strip()}", Action.RECEIVE, Outcome.DENIED,
            project_id=request.project_id if request else None,
            pacs_id=request.pacs_id if request else None,
            patient_id=header.patient_id or None, study_uid=header.study_uid,
            detail={"reason": refusal.reason, "security": refusal.security, "sop_instance_uid": header.sop_instance_uid,
                    "calling_ae": instance.peer_ae.strip(), "move_originator": instance.move_originator_ae or "",
                    "status": f"0x{int(refusal.status):04X}"},
        )
        LOG.warning("refused a C-STORE from %s: %s", instance.peer_ae.strip(), refusal.reason)

    def _fail_request(self, request: InFlight, reason: str) -> None:
        LOG.error("request %s: %s", request.request_id, reason)
        with transaction(self.ctx.sessions) as session:
            # The status marks the request for failing when its retrieval returns.
            session.execute(update(Request).where(Request.id == request.request_id).values(
                failed=Request.failed + 1, last_error=reason, last_status=int(StoreStatus.OUT_OF_RESOURCES)))
