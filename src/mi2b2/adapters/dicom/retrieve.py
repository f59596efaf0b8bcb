"""DICOM retrieval: C-MOVE and C-GET of one study, or some of its series.

`move_study` asks the PACS to send the study to a destination AE (mi2b2's
`StoreServer`, which the PACS admin registered); `get_study` fetches it over
our own association (C-GET), the received instances going through the same
receiver code as the StoreServer's (`store_receiver.StoreReceiver`).

What both return or raise:

* `RetrieveResult` for every final status in which the PACS did its work:
  Success (0x0000), Warning (0xB000: some sub-operations failed; the counts
  and FailedSOPInstanceUIDList say which), Cancel (0xFE00, `canceled=True`),
  and a Failure status that reports failed sub-operations (every C-STORE
  failed: the destination refused them, which retrying would not change).
* Retriable errors (`PacsUnreachable`, `PacsBusy` for a transient rejection
  or "out of resources" 0xA7xx, `PacsTimeout`, `AssociationAborted`) and
  permanent ones (`AssociationRejected`, `ServiceNotSupported`,
  `MoveDestinationUnknown` for 0xA801, `DimseFailure`) otherwise.

Cancellation: `should_cancel` is polled on every pending response (C-GET:
also after every received instance); once it says yes we send C-CANCEL and
keep reading until the final response. A PACS that ignores the cancel gets
`cancel_grace` seconds, then the association is aborted; either way the result
says `canceled=True`.

No patient data in logs or messages: identifiers are sent, never logged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context, build_role
from pynetdicom.status import code_to_category

from mi2b2.adapters.dicom.dimse_status import DimseService, status_text
from mi2b2.adapters.dicom.errors import (
    AssociationAborted,
    DimseFailure,
    MoveDestinationUnknown,
    PacsBusy,
    ServiceNotSupported,
)
from mi2b2.adapters.dicom.netdicom_internals import prompt_network_thread
from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, QueryModel, associate, no_response_error, release
from mi2b2.adapters.dicom.store_receipt import InstanceSink, ReceiveLimits, outbound_peer
from mi2b2.adapters.dicom.store_receiver import StoreReceiver, refuse_unexpected_store
from mi2b2.errors import InvalidInput

__all__ = [
    "CANCEL_GRACE",
    "RetrieveProgress",
    "RetrieveResult",
    "get_study",
    "move_study",
]

LOG = logging.getLogger(__name__)

# Seconds a PACS gets to answer our C-CANCEL before we abort the association.
CANCEL_GRACE = 5.0

_MOVE_SOP_CLASS = {
    QueryModel.PATIENT_ROOT: UID("1.2.840.10008.5.1.4.1.2.1.2"),
    QueryModel.STUDY_ROOT: UID("1.2.840.10008.5.1.4.1.2.2.2"),
}
_GET_SOP_CLASS = {
    QueryModel.PATIENT_ROOT: UID("1.2.840.10008.5.1.4.1.2.1.3"),
    QueryModel.STUDY_ROOT: UID("1.2.840.10008.5.1.4.1.2.2.3"),
}

# What a C-GET offers to receive in, per storage class. A PACS picks one per
# class and must send every instance of that class in it (transcoding or
# failing the others), so the common stored forms go first.
_GET_TRANSFER_SYNTAXES: list[str | UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
]
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
# The storage classes a C-GET offers to receive; one context is the C-GET's own.
_GET_STORAGE_CLASSES: list[UID] = [
    cx.abstract_syntax for cx in StoragePresentationContexts[: _MAX_CONTEXTS - 1] if cx.abstract_syntax is not None
]


@dataclass(frozen=True)
class RetrieveProgress:
    """From each pending C-MOVE/C-GET response."""

    remaining: int | None
    completed: int
    failed: int
    warning: int


@dataclass(frozen=True)
class RetrieveResult:
    """From the final response."""

    status: int
    completed: int
    failed: int
    warning: int
    failed_sop_uids: list[str]  # from FailedSOPInstanceUIDList when present
    canceled: bool


def _ignore(progress: RetrieveProgress) -> None:
    return None


def _never() -> bool:
    return False


# --- C-MOVE ------------------------------------------------------------------------------


def move_study(
    local: LocalAE,
    peer: DicomPeer,
    destination_ae: str,
    model: QueryModel,
    study_uid: str,
    patient_id: str,
    series_uids: Sequence[str] = (),
    *,
    on_progress: Callable[[RetrieveProgress], None] = _ignore,
    should_cancel: Callable[[], bool] = _never,
    cancel_grace: float = CANCEL_GRACE,
    message_id: int | None = None,
) -> RetrieveResult:
    """C-MOVE the study (or the listed series of it) from `peer` to `destination_ae`.

    With `message_id`, every C-MOVE request (one per series) carries it: the PACS
    echoes it as Move Originator Message ID in each C-STORE, and the receiver
    tells this retrieval's instances by it. Reusing it is allowed because the
    requests run one after another (PS3.7 10.1.5.1.1 forbids equal ids only
    among outstanding operations).
    """
    model = _model(model)
    if not destination_ae.strip():
        raise InvalidInput("a C-MOVE needs a destination AE title; configure the receiver's AE title")
    requests = _identifiers(model, study_uid, patient_id, series_uids)
    sop_class = _MOVE_SOP_CLASS[model]
    assoc = associate(local, peer, [sop_class], f"{_MODEL_NAMES[model]} C-MOVE", on_connect=_prompt)

    def send(identifier: Dataset, message_id: int) -> Iterator[tuple[Dataset, Dataset | None]]:
        return assoc.send_c_move(identifier, destination_ae, sop_class, msg_id=message_id)

    operation = _Operation(assoc, peer, DimseService.C_MOVE, sop_class, send, on_progress, should_cancel, cancel_grace,
                           destination_ae, message_id)
    return operation.run(requests)


# --- C-GET -------------------------------------------------------------------------------


def get_study(
    local: LocalAE,
    peer: DicomPeer,
    model: QueryModel,
    study_uid: str,
    patient_id: str,
    series_uids: Sequence[str] = (),
    *,
    sink: InstanceSink,
    incoming_dir: Path,
    on_progress: Callable[[RetrieveProgress], None] = _ignore,
    should_cancel: Callable[[], bool] = _never,
    cancel_grace: float = CANCEL_GRACE,
    limits: ReceiveLimits | None = None,
) -> RetrieveResult:
    """C-GET the study (or the listed series of it) from `peer`; each instance goes to `sink`.

    `sink.accept` and `should_cancel` run on the association's network thread
    while instances arrive (see `store_scp.InstanceSink`).
    """
    model = _model(model)
    requests = _identifiers(model, study_uid, patient_id, series_uids)
    incoming_dir = Path(incoming_dir)
    incoming_dir.mkdir(parents=True, exist_ok=True)
    sop_class = _GET_SOP_CLASS[model]
    storage = [build_context(storage_class, _GET_TRANSFER_SYNTAXES) for storage_class in _GET_STORAGE_CLASSES]
    # SCP role for every storage class: the PACS sends C-STOREs to us.
    roles = [build_role(storage_class, scp_role=True) for storage_class in _GET_STORAGE_CLASSES]
    assoc = associate(
        local,
        peer,
        [sop_class, *storage],
        f"{_MODEL_NAMES[model]} C-GET",
        roles=roles,
        on_connect=_prompt,
    )

    def send(identifier: Dataset, message_id: int) -> Iterator[tuple[Dataset, Dataset | None]]:
        return assoc.send_c_get(identifier, sop_class, msg_id=message_id)

    operation = _Operation(assoc, peer, DimseService.C_GET, sop_class, send, on_progress, should_cancel, cancel_grace, None)
    assoc.bind(evt.EVT_C_STORE, refuse_unexpected_store)
    sender = outbound_peer(peer.ae_title, peer.host)
    receiver = StoreReceiver(assoc, sink, incoming_dir, peer=lambda: sender, after_each=operation.cancel.poll,
                             limits=limits or ReceiveLimits(max_pdu=local.max_pdu or ReceiveLimits.max_pdu,
                                                            network_timeout=peer.network_timeout))
    try:
        return operation.run(requests)
    finally:
        receiver.close()


# --- shared ------------------------------------------------------------------------------

_MODEL_NAMES = {QueryModel.PATIENT_ROOT: "Patient Root", QueryModel.STUDY_ROOT: "Study Root"}


def _prompt(event: evt.Event) -> None:
    prompt_network_thread(event.assoc)


def _model(model: QueryModel | str) -> QueryModel:
    try:
        return QueryModel(model)
    except ValueError:
        raise InvalidInput(f"unknown query/retrieve model {model!r}; use one of {[m.value for m in QueryModel]}") from None


def _identifiers(model: QueryModel, study_uid: str, patient_id: str, series_uids: Sequence[str]) -> list[Dataset]:
    """One identifier for the whole study, or one per series.

    A single request listing every SeriesInstanceUID is allowed (PS3.4
    C.4.2.2.1) and Orthanc and dcmqrscp take it, but pynetdicom's qrscp fails
    it with a database error reported as 0xA801; one request per series, on
    the same association, works everywhere for one more round trip each.
    """
    study_uid = (study_uid or "").strip()
    if not study_uid:
        raise InvalidInput("a retrieval needs the StudyInstanceUID of the study")
    if model is QueryModel.PATIENT_ROOT and not (patient_id or "").strip():
        raise InvalidInput("the Patient Root model needs the PatientID of the study; search the study again or use Study Root")
    series = [uid.strip() for uid in series_uids if uid and uid.strip()]
    if len(series) != len(series_uids):
        raise InvalidInput("a series subset contains an empty SeriesInstanceUID")
    return [_identifier(model, study_uid, patient_id, uid) for uid in dict.fromkeys(series)] or [
        _identifier(model, study_uid, patient_id, None)
    ]


def _identifier(model: QueryModel, study_uid: str, patient_id: str, series_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    if model is QueryModel.PATIENT_ROOT:
        ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    return ds


class _Cancel:
    """Sends C-CANCEL once `should_cancel` says so; from either thread of a C-GET."""

    def __init__(self, assoc: Association, context_id: int, should_cancel: Callable[[], bool], grace: float):
        self._assoc = assoc
        self._context_id = context_id
        self._should_cancel = should_cancel
        self._grace = grace
        self._lock = threading.Lock()
        self.message_id: int | None = None  # of the request in progress
        self.sent_at: float | None = None

    def wanted(self) -> bool:
        return self.sent_at is not None or bool(self._should_cancel())

    def poll(self) -> None:
        if self.sent_at is not None or self.message_id is None or not self._should_cancel():
            return
        with self._lock:
            if self.sent_at is not None:
                return
            self.sent_at = time.monotonic()
            # A PACS that ignores the cancel must not keep us for a whole DIMSE timeout.
            self._assoc.dimse_timeout = self._grace
            with contextlib.suppress(RuntimeError):  # the association ended meanwhile
                self._assoc.send_c_cancel(self.message_id, self._context_id)
            LOG.info("sent C-CANCEL to %s", self._assoc.acceptor.ae_title)

    @property
    def overdue(self) -> bool:
        return self.sent_at is not None and time.monotonic() - self.sent_at > self._grace


_Send = Callable[[Dataset, int], Iterator[tuple[Dataset, Dataset | None]]]


class _Operation:
    """One C-MOVE or C-GET retrieval: one request per identifier, on one association."""

    def __init__(
        self,
        assoc: Association,
        peer: DicomPeer,
        service: DimseService,
        sop_class: UID,
        send: _Send,
        on_progress: Callable[[RetrieveProgress], None],
        should_cancel: Callable[[], bool],
        grace: float,
        destination_ae: str | None,
        message_id: int | None = None,
    ) -> None:
        self.assoc = assoc
        self.peer = peer
        self.service = service
        self.name = str(service)
        self.sop_class = sop_class
        self.send = send
        self.on_progress = on_progress
        self.destination_ae = destination_ae
        self.message_id = message_id  # of every request, if fixed; else 1, 2, ... in turn
        context = next((cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class), None)
        self.context_id = int(context.context_id or 0) if context is not None else None
        self.cancel = _Cancel(assoc, self.context_id or 0, should_cancel, grace)

    def run(self, requests: list[Dataset]) -> RetrieveResult:
        """Send each request in turn; release (or abort, on any error) the association."""
        started = time.perf_counter()
        try:
            if self.context_id is None:
                raise ServiceNotSupported(str(self.peer), f"{self.sop_class.name} ({self.name})")
            result = self._run(requests)
        except BaseException:
            # Sub-operations may still be running: a release would wait for them.
            if self.assoc.is_established:
                self.assoc.abort()
            raise
        release(self.assoc)
        LOG.info(
            "%s from %s: status 0x%04X, %d completed, %d failed, %d warning%s in %.2f s",
            self.name,
            self.peer,
            result.status,
            result.completed,
            result.failed,
            result.warning,
            " (canceled)" if result.canceled else "",
            time.perf_counter() - started,
        )
        return result

    def _run(self, requests: list[Dataset]) -> RetrieveResult:
        results: list[RetrieveResult] = []
        for number, identifier in enumerate(requests, start=1):
            if results and self.cancel.wanted():
                break
            message_id = self.message_id or number
            self.cancel.message_id = message_id
            try:
                responses = self.send(identifier, message_id)
            except ValueError as exc:
                raise InvalidInput(f"the retrieve identifier cannot be encoded: {exc}") from exc
            except RuntimeError as exc:
                raise AssociationAborted(str(self.peer), self.name) from exc
            done = _total(results)
            results.append(self._collect(responses, done, last=number == len(requests)))
            if results[-1].canceled:
                break
        combined = _total(results)
        if len(results) < len(requests):  # cancelled between two series
            return _replace_status(combined, 0xFE00, canceled=True)
        return combined

    def _collect(
        self,
        responses: Iterator[tuple[Dataset, Dataset | None]],
        done: RetrieveResult,
        last: bool,
    ) -> RetrieveResult:
        progress = RetrieveProgress(None, 0, 0, 0)
        waiting_since = time.perf_counter()
        for status, identifier in responses:
            now = time.perf_counter()
            if "Status" not in status:
                if self.cancel.sent_at is not None:
                    # We cancelled and the PACS went quiet: pynetdicom aborted after the grace period.
                    return _canceled(progress)
                raise no_response_error(self.peer, now - waiting_since, self.name)
            waiting_since = now
            code = int(status.Status)
            if code_to_category(code) == "Pending":
                progress = _progress(status)
                self.on_progress(
                    RetrieveProgress(
                        # Further series' sub-operations are not counted yet.
                        remaining=progress.remaining if last else None,
                        completed=done.completed + progress.completed,
                        failed=done.failed + progress.failed,
                        warning=done.warning + progress.warning,
                    )
                )
                self.cancel.poll()
                if self.cancel.overdue:
                    LOG.warning("%s ignored our C-CANCEL for %s; aborting the association", self.peer, self.name)
                    self.assoc.abort()
                    return _canceled(progress)
                continue
            return self._final(code, status, identifier, progress)
        raise AssociationAborted(str(self.peer), self.name)

    def _final(self, code: int, status: Dataset, identifier: Dataset | None, progress: RetrieveProgress) -> RetrieveResult:
        peer, operation = str(self.peer), self.name
        category = code_to_category(code)
        completed = _count(status, "NumberOfCompletedSuboperations")
        failed = _count(status, "NumberOfFailedSuboperations")
        warning = _count(status, "NumberOfWarningSuboperations")
        result = RetrieveResult(
            status=code,
            completed=completed,
            failed=failed,
            warning=warning,
            failed_sop_uids=_failed_uids(identifier),
            canceled=category == "Cancel",
        )
        if category in ("Success", "Warning", "Cancel"):
            return result
        comment = str(status.get("ErrorComment", "") or "") or None
        if code == 0xA801 and self.destination_ae is not None:
            raise MoveDestinationUnknown(peer, self.destination_ae, comment)
        if failed and not completed and (0xA700 <= code <= 0xA7FF or 0xC000 <= code <= 0xCFFF):
            # Every sub-operation was tried and failed (DCMTK says 0xA702): the
            # destination refused them, which a retry would not change.
            return result
        if 0xA700 <= code <= 0xA7FF:  # Refused: out of resources (A701: matches, A702: sub-operations)
            raise PacsBusy(peer, f"{operation} status 0x{code:04X}, {status_text(self.service, code)}")
        if self.destination_ae is not None and not (completed or failed or warning or progress.completed or progress.failed):
            # Orthanc answers 0xC000 with no counts both for a destination it
            # does not know and for a sub-operation the destination refused.
            hint = (
                f"nothing was sent. If the PACS does not know the destination {self.destination_ae!r}, ask its "
                "admin to register mi2b2's receiver (that AE title, this host, the receiver port); if the "
                "receiver refused an instance, mi2b2's audit trail says why"
            )
            comment = f"{comment}; {hint}" if comment else hint
        raise DimseFailure(peer, operation, code, status_text(self.service, code), comment)


def _total(results: list[RetrieveResult]) -> RetrieveResult:
    """One result for the requests of one retrieval (one per series)."""
    if len(results) == 1:
        return results[0]
    completed = sum(r.completed for r in results)
    failed = sum(r.failed for r in results)
    warning = sum(r.warning for r in results)
    canceled = any(r.canceled for r in results)
    if canceled:
        status = 0xFE00
    elif all(r.status == 0x0000 for r in results):
        status = 0x0000
    elif not completed and not warning:
        status = next(r.status for r in results if r.status != 0x0000)  # all failed
    else:
        status = 0xB000  # sub-operations complete, one or more failures or warnings
    return RetrieveResult(
        status=status,
        completed=completed,
        failed=failed,
        warning=warning,
        failed_sop_uids=[uid for r in results for uid in r.failed_sop_uids],
        canceled=canceled,
    )


def _replace_status(result: RetrieveResult, status: int, canceled: bool) -> RetrieveResult:
    return RetrieveResult(status, result.completed, result.failed, result.warning, result.failed_sop_uids, canceled)


def _canceled(last: RetrieveProgress) -> RetrieveResult:
    return RetrieveResult(
        status=0xFE00,
        completed=last.completed,
        failed=last.failed,
        warning=last.warning,
        failed_sop_uids=[],
        canceled=True,
    )


def _progress(status: Dataset) -> RetrieveProgress:
    remaining = status.get("NumberOfRemainingSuboperations")
    return RetrieveProgress(
        remaining=int(remaining) if remaining is not None else None,
        completed=_count(status, "NumberOfCompletedSuboperations"),
        failed=_count(status, "NumberOfFailedSuboperations"),
        warning=_count(status, "NumberOfWarningSuboperations"),
    )


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value is not None else 0


def _failed_uids(identifier: Dataset | None) -> list[str]:
    if identifier is None:
        return []
    value = identifier.get("FailedSOPInstanceUIDList")
    if not value:
        return []
    if isinstance(value, str):
        return [uid for uid in value.split("\\") if uid]
    return [str(uid) for uid in value if uid]
