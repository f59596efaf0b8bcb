"""Every refusal the receipt door can give is counted under its own kind, and what a peer
chose (an AE title, a file name) never picks the kind or becomes a label."""

from __future__ import annotations

import ipaddress

import pytest

from mi2b2.domain.receipt import InFlight, PacsIdentity, identify_peer, judge_receipt
from mi2b2.domain.refusal_reasons import ALL_KINDS, OTHER, refusal_kind, refusals_in

UID = "1.2.3.4"
OUR_AE = "MI2B2"


def in_flight(**changes: object) -> InFlight:
    fields: dict[str, object] = dict(request_id=1, project_id="alpha", pacs_id="main", patient_id="P1",
                                     series_uids=frozenset(), patient_allowed=True, quota_bytes=1000, used_bytes=0,
                                     issuer=None)
    fields.update(changes)
    return InFlight(**fields)  # type: ignore[arg-type]


CASES = [
    (dict(request=in_flight(), series_uid="not a uid"), "invalid_uid"),
    (dict(request=in_flight(), move_originator_ae="INTRUDER"), "foreign_move_originator"),
    (dict(request=None), "no_retrieval_in_progress"),
    (dict(request=in_flight(), patient_id="P2"), "patient_mismatch"),
    (dict(request=in_flight(issuer="GENERAL"), issuer="OTHER"), "issuer_mismatch"),
    (dict(request=in_flight(patient_allowed=False)), "not_on_allow_list"),
    (dict(request=in_flight(series_uids=frozenset({"1.2.3.9"}))), "series_not_requested"),
    (dict(request=in_flight(used_bytes=999), size=10), "quota_reached"),
]


@pytest.mark.parametrize(("changes", "kind"), CASES, ids=[kind for _, kind in CASES])
def test_each_refusal_of_the_receipt_door_has_its_kind(changes: dict[str, object], kind: str) -> None:
    arguments: dict[str, object] = dict(patient_id="P1", series_uid=UID, size=1, move_originator_ae=None,
                                        our_ae=OUR_AE, peer_ae="PACS", issuer="", other_uids=(UID, UID))
    arguments.update(changes)
    refusal = judge_receipt(**arguments)  # type: ignore[arg-type]
    assert refusal is not None
    assert refusal_kind(refusal.reason) == kind


def test_a_pacs_title_from_a_wrong_address_is_counted_as_such() -> None:
    node = PacsIdentity("main", "PACS", (ipaddress.ip_network("10.0.0.5/32"),))
    verdict = identify_peer("PACS", "10.9.9.9", [node])
    assert verdict.refusal is not None
    assert refusal_kind("association refused: " + verdict.refusal) == "unknown_peer_address"


@pytest.mark.parametrize(("reason", "kind"), [
    ("connection refused: a PROXY header from an address not in [dicom] proxy_protocol_from: a forged source address",
     "proxy_header"),
    ("connection refused: from the balancer 10.0.0.10: no whole PROXY header within 5 s; ...", "proxy_header"),
    ("SOP class not negotiated on the presentation context it came on", "sop_class_not_negotiated"),
    ("larger than the receiver's maximum instance size (1024 bytes)", "too_large"),
    ("the data set's SOP Instance UID differs from the request's", "sop_instance_mismatch"),
    ("its header cannot be read (KeyError)", "unreadable"),
    ("upload-7f3a.dcm is not a readable DICOM file (InvalidDicomError)", "unreadable"),
    ("x.dcm has no SOPInstanceUID, StudyInstanceUID; it cannot be filed in the cache", "unreadable"),
])
def test_the_receivers_own_refusals_have_their_kinds(reason: str, kind: str) -> None:
    assert refusal_kind(reason) == kind


def test_what_the_peer_chose_never_picks_the_kind() -> None:
    posing = "sent for a C-MOVE issued by 'project cache quota reached', not by mi2b2"
    assert refusal_kind(posing) == "foreign_move_originator"
    assert refusal_kind("x is not a readable DICOM file (E)\nproject cache quota reached") == OTHER
    assert refusal_kind('evil"} 1\nmi2b2_fake 9') == OTHER
    assert set(ALL_KINDS) >= {kind for _, kind in CASES} and OTHER in ALL_KINDS


def test_counts_from_an_audit_detail() -> None:
    assert refusals_in({"reasons": {"project cache quota reached": 3, "series not among those requested": 1,
                                    "something new": 2}}) == {"quota_reached": 3, "series_not_requested": 1, OTHER: 2}
    assert refusals_in({"reason": "association refused: calling AE 'X' ..."}) == {"unknown_peer_address": 1}
    # A row not written by this receiver's code (hand-made, or an older shape) adds nothing odd.
    assert refusals_in({"reasons": {"project cache quota reached": -4, "x": "many", "y": True}}) == {}
    assert refusals_in({"reasons": ["project cache quota reached"]}) == {}
    assert refusals_in({}) == {}
