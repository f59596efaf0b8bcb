"""The receipt door: may an instance that just arrived enter a project's cache?

Pure rules over what the receiver looked up; the caller turns a refusal into a
DICOM failure status and an audit event, and never writes the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from mi2b2.domain.mrn import issuer_conflicts


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 C.4: the SCP refuses this operation for this peer
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class InFlight:
    """The processing retrieval an arriving instance may belong to."""

    request_id: int
    project_id: str
    pacs_id: str
    patient_id: str
    series_uids: frozenset[str]  # empty: the whole study
    patient_allowed: bool  # the request's patient is on the project's allow-list now
    quota_bytes: int
    used_bytes: int
    issuer: str | None = None  # the Issuer of Patient ID the patient's institution is configured with


@dataclass(frozen=True)
class Refusal:
    status: StoreStatus
    reason: str
    security: bool  # an IRB or identity breach (audited as such), not a resource problem


def judge_receipt(
    request: InFlight | None,
    patient_id: str,
    series_uid: str,
    size: int,
    move_originator_ae: str | None,
    our_ae: str,
    peer_ae: str = "",
    issuer: str = "",
) -> Refusal | None:
    """None when the instance may be stored, else why not."""
    originator = (move_originator_ae or "").strip()
    # pynetdicom's qrscp names itself as the originator; only a third AE is suspicious.
    if originator and originator not in (our_ae, peer_ae.strip()):
        return _security(f"sent for a C-MOVE issued by {originator!r}, not by mi2b2")
    if request is None:
        return _security("no retrieval in progress for this study from the calling AE")
    if patient_id != request.patient_id:
        return _security("the instance's PatientID differs from the requested study's patient")
    if issuer_conflicts(issuer, request.issuer):
        return _security("the instance's Issuer of Patient ID differs from the institution's: another patient")
    if not request.patient_allowed:
        return _security("patient not on the project's IRB allow-list")
    if request.series_uids and series_uid not in request.series_uids:
        return _security("series not among those requested")
    if request.used_bytes + size > request.quota_bytes:
        return Refusal(StoreStatus.OUT_OF_RESOURCES, "project cache quota reached", security=False)
    return None


def _security(reason: str) -> Refusal:
    return Refusal(StoreStatus.REFUSED_NOT_AUTHORIZED, reason, security=True)
