"""The receipt door: may an instance that just arrived enter a project's cache?

Pure rules over what the receiver looked up; the caller turns a refusal into a
DICOM failure status and an audit event, and never writes the file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from mi2b2.domain.identifiers import looks_like_uid
from mi2b2.domain.mrn import issuer_conflicts

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
class MoveOrigin:
    """Who asked the PACS to send an instance, as its C-STORE says: Move Originator
    AE Title and Message ID (0000,1030-1031). Absent on C-GET and from some PACS."""

    ae_title: str | None = None
    message_id: int | None = None


@dataclass(frozen=True)
class Candidate:
    """A processing retrieval from the calling PACS, as far as matching needs it."""

    request_id: int
    study_uid: str
    move_message_id: int | None = None  # of the C-MOVE its current attempt sent, if it sent one
    move_destination_ae: str | None = None  # the AE title that C-MOVE named as destination


MESSAGE_IDS = 0xFFFF  # Message ID is an unsigned 16-bit number; 0 is not used


def move_message_id(request_id: int) -> int:
    """The Message ID of a retrieval's C-MOVEs, the same on every attempt.

    Two retrievals in flight at once get different ids unless their request
    ids are 65,535 apart. A request's per-series C-MOVEs on one association
    share it: PS3.7 forbids equal ids only among outstanding operations, and
    ours run one after the other.
    """
    return 1 + (request_id - 1) % MESSAGE_IDS


def match_retrieval(candidates: Iterable[Candidate], study_uid: str, origin: MoveOrigin, our_ae: str) -> int | None:
    """The request an arriving instance belongs to, among the processing retrievals
    from its PACS (None: it belongs to none of them).

    First the retrieval whose C-MOVE the instance names: its Move Originator AE
    is our AE title (mi2b2 issues its C-MOVEs under the title it receives at) and
    its Move Originator Message ID that C-MOVE's. This tells two projects'
    retrievals of one study apart. Otherwise (C-GET, a PACS that does not say,
    names itself, or names an id we do not know) the oldest retrieval of the study.
    """
    of_study = sorted((c for c in candidates if c.study_uid == study_uid), key=lambda c: c.request_id)
    if origin.message_id is not None and (origin.ae_title or "").strip() == our_ae.strip():
        for candidate in of_study:
            if (candidate.move_message_id == origin.message_id
                    and (candidate.move_destination_ae or "").strip() == our_ae.strip()):
                return candidate.request_id
    return of_study[0].request_id if of_study else None


@dataclass(frozen=True)
class Refusal:
    status: StoreStatus
    reason: str
    security: bool  # an IRB or identity breach (audited as such), not a resource problem
    # Not an instance the retrieval asked for (another study, patient or series, a
    # forged header): refused and audited, but it says nothing about the retrieval.
    stray: bool = True


@dataclass(frozen=True)
class PacsIdentity:
    """A configured PACS as the receiver recognises it: AE title and the networks it calls from."""

    pacs_id: str
    ae_title: str
    networks: tuple[IpNetwork, ...]


@dataclass(frozen=True)
class PeerVerdict:
    pacs_ids: tuple[str, ...]  # the PACS this peer is (empty: no PACS, e.g. a C-ECHO from a workstation)
    refusal: str | None = None  # why the association is refused, if it is


def identify_peer(calling_ae: str, address: str, nodes: Iterable[PacsIdentity]) -> PeerVerdict:
    """Which configured PACS an association comes from, by AE title *and* address.

    The AE title is shown to every user and any host can claim it: a peer that
    names a PACS's AE title from an address configured for none of the PACS
    with that title is refused.
    """
    calling_ae = calling_ae.strip()
    titled = [node for node in nodes if node.ae_title.strip() == calling_ae]
    if not titled:
        return PeerVerdict(())
    peer = _address(address)
    matching = tuple(node.pacs_id for node in titled if peer is not None and any(peer in net for net in node.networks))
    if not matching:
        return PeerVerdict((), f"calling AE {calling_ae!r} is PACS {', '.join(n.pacs_id for n in titled)}, "
                               f"whose configured addresses do not include {address}")
    return PeerVerdict(matching)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def judge_receipt(
    request: InFlight | None,
    patient_id: str,
    series_uid: str,
    size: int,
    move_originator_ae: str | None,
    our_ae: str,
    peer_ae: str = "",
    issuer: str = "",
    other_uids: Sequence[str] = (),
) -> Refusal | None:
    """None when the instance may be stored, else why not.

    ``other_uids`` are the instance's Study and SOP Instance UIDs: like the
    series UID they become file names, so anything but a DICOM UID is refused.
    """
    if not all(looks_like_uid(uid) for uid in (series_uid, *other_uids)):
        return _security("a Study, Series or SOP Instance UID is not a DICOM UID (digits and dots, at most 64)")
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
        return Refusal(StoreStatus.REFUSED_NOT_AUTHORIZED, "patient not on the project's IRB allow-list",
                       security=True, stray=False)
    if request.series_uids and series_uid not in request.series_uids:
        return _security("series not among those requested")
    if request.used_bytes + size > request.quota_bytes:
        return Refusal(StoreStatus.OUT_OF_RESOURCES, "project cache quota reached", security=False, stray=False)
    return None


def _security(reason: str) -> Refusal:
    return Refusal(StoreStatus.REFUSED_NOT_AUTHORIZED, reason, security=True)
