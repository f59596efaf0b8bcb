"""The pure mapping from an audit row to an IHE ATNA message (DICOM PS3.15 A.5), and its XML."""

from __future__ import annotations

import base64
import json
import shutil
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from pydantic import ValidationError

from mi2b2.config import AuditConfig
from mi2b2.domain.atna import AtnaSite, AuditSource, Node, atna_message, render, render_within
from mi2b2.domain.audit_chain import ChainedEvent, canonical_detail
from support.atna import schema_errors

SITE = AtnaSite(AuditSource("gw1.example.org", "General Hospital"), "MI2B2", "10.0.0.5",
                {"main": Node("PACS", "pacs.example.org"), "xnat": Node("XNAT", "10.0.0.9")})
STUDY = "1.2.826.0.1.3680043.8.498.1"


def event(action: str, outcome: str = "ok", actor: str = "alice", seq: int = 7, **fields: Any) -> ChainedEvent:
    detail = fields.pop("detail", {})
    return ChainedEvent(seq=seq, occurred_at="2026-12-04T21:30:00.123456Z", actor=actor, client=fields.pop("client", ""),
                        action=action, outcome=outcome, project_id=fields.pop("project_id", None),
                        pacs_id=fields.pop("pacs_id", None), patient_id=fields.pop("patient_id", None),
                        study_uid=fields.pop("study_uid", None), detail=canonical_detail(detail), prev_hash="0" * 64,
                        hash="ab" * 32)


def xml(e: ChainedEvent) -> ET.Element:
    return ET.fromstring(render(atna_message(e, SITE)))


def codes(root: ET.Element, path: str) -> list[str]:
    return [element.attrib["csd-code"] for element in root.iterfind(path)]


# Every kind of event mi2b2 records, as the services record it.
EVENTS = {
    "login ok": event("login", client="192.0.2.7", detail={"session": 3}),
    "login failed": event("login", "failed", detail={"client": "192.0.2.7"}),
    "login throttled": event("login", "denied", detail={"client": "192.0.2.7", "reason": "throttled"}),
    "query": event("query", project_id="alpha", pacs_id="main", client="192.0.2.7",
                   detail={"query": 4, "kind": "studies", "mrns": ["000123"], "results": 2}),
    "requested": event("retrieve", project_id="alpha", pacs_id="main", patient_id="000123", study_uid=STUDY,
                       detail={"request": 9, "event": "requested", "series": 0, "priority": 0}),
    "retrieved": event("retrieve", actor="worker", project_id="alpha", pacs_id="main", patient_id="000123",
                       study_uid=STUDY, detail={"request": 9, "event": "completed", "received": 6, "expected": 6}),
    "refused instances": event("receive", "denied", actor="dicom:ROGUE", patient_id="999",
                               detail={"refused": 2, "address": "10.9.9.9",
                                       "sop_instance_uids": ["1.2.3.1", "1.2.3.2"], "reasons": {"no request": 2}}),
    "download": event("download", project_id="alpha", patient_id="000123", study_uid=STUDY, client="192.0.2.7",
                      detail={"via": "zip", "files": 6, "bytes": 1000, "encryption": "age"}),
    "view": event("view", project_id="alpha", patient_id="000123", study_uid=STUDY),
    "pseudonymous list": event("list", project_id="gamma", detail={
        "operation": "cache list", "rows": 3, "view": "pseudonymous", "export": "deidentified", "profile": ["basic"]}),
    "forward requested": event("forward", project_id="alpha", patient_id="000123", study_uid=STUDY,
                               detail={"request": 10, "event": "requested", "destination": "xnat"}),
    "forwarded": event("forward", "failed", actor="worker", project_id="alpha", patient_id="000123", study_uid=STUDY,
                       detail={"request": 10, "event": "failed", "destination": "xnat", "reason": "refused"}),
    "delete": event("delete", project_id="alpha", patient_id="000123", study_uid=STUDY),
    "irb refusal": event("denied", "denied", project_id="beta", pacs_id="main",
                         detail={"reason": "the IRB protocol of project beta expired on 2026-01-01"}),
    "audit read": event("audit_read", actor="auditor", patient_id="000123", detail={"kind": "list"}),
    "user admin": event("user_admin", actor="root", detail={"op": "add", "login": "bob"}),
    "token admin": event("token_admin", actor="root", detail={"op": "revoke", "token": 3}),
    "allow list": event("allow_list", actor="root", project_id="alpha", detail={"mrns": 5}),
    "audit key": event("audit_key", actor="root"),
    "cache check": event("cache_check", actor="root", detail={"repair": False}),
    "startup": event("config_reload", actor="system", detail={"op": "startup"}),
    "reload": event("config_reload", actor="root", detail={"file": "/etc/mi2b2.toml"}),
    "future action": event("something_new", actor="root"),
}

EXPECTED = {  # EventID, EventActionCode, EventOutcomeIndicator, EventTypeCodes
    "login ok": ("110114", "E", "0", ["110122"]),
    "login failed": ("110114", "E", "4", ["110122"]),
    "login throttled": ("110114", "E", "8", ["110122"]),
    "query": ("110112", "E", "0", []),
    "requested": ("110102", "E", "0", []),
    "retrieved": ("110104", "C", "0", []),
    "refused instances": ("110104", "C", "4", []),
    "download": ("110106", "R", "0", []),
    "view": ("110103", "R", "0", []),
    "pseudonymous list": ("110103", "R", "0", []),
    "forward requested": ("110102", "E", "0", []),
    "forwarded": ("110104", "R", "8", []),
    "delete": ("110105", "D", "0", []),
    "irb refusal": ("110113", "E", "4", ["110132"]),
    "audit read": ("110101", "R", "0", []),
    "user admin": ("110113", "E", "0", ["110137"]),
    "token admin": ("110113", "E", "0", ["110137"]),
    "allow list": ("110113", "E", "0", ["110135"]),
    "audit key": ("110113", "E", "0", ["110129"]),
    "cache check": ("110113", "E", "0", ["110141"]),
    "startup": ("110100", "E", "0", ["110120"]),
    "reload": ("110113", "E", "0", ["110131"]),
    "future action": ("110113", "E", "0", []),
}


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_each_action_maps_to_its_dicom_event(name: str) -> None:
    root = xml(EVENTS[name])
    identification = root.find("EventIdentification")
    assert identification is not None
    got = (codes(root, "EventIdentification/EventID")[0], identification.attrib["EventActionCode"],
           identification.attrib["EventOutcomeIndicator"], codes(root, "EventIdentification/EventTypeCode"))
    assert got == EXPECTED[name]
    assert identification.attrib["EventDateTime"] == "2026-12-04T21:30:00.123456Z"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.attrib == {"AuditSourceID": "gw1.example.org",
                                                    "AuditEnterpriseSiteID": "General Hospital"}


@pytest.mark.skipif(shutil.which("jing") is None, reason="Debian jing is not installed (scripts/setup.sh installs it)")
def test_every_kind_of_message_is_valid_against_the_ps3_15_schema() -> None:
    documents = [render(atna_message(e, SITE)).decode() for e in EVENTS.values()]
    assert schema_errors(documents) == ""
    assert "syntax error" in schema_errors(["<AuditMessage>"]) or schema_errors(["<AuditMessage>"]) != ""


def test_exactly_one_requestor_and_mi2b2_is_a_participant() -> None:
    for name, e in EVENTS.items():
        participants = xml(e).findall("ActiveParticipant")
        assert sum(p.attrib["UserIsRequestor"] == "true" for p in participants) == 1, name
        ours = [p for p in participants if p.attrib.get("AlternativeUserID") == "AETITLES=MI2B2"]
        assert len(ours) == 1 and ours[0].attrib["UserID"] == "gw1.example.org", name
    person = xml(EVENTS["download"]).findall("ActiveParticipant")[0]
    assert person.attrib == {"UserID": "alice", "UserIsRequestor": "true", "NetworkAccessPointID": "192.0.2.7",
                             "NetworkAccessPointTypeCode": "2"}
    worker = [p for p in xml(EVENTS["retrieved"]).findall("ActiveParticipant") if p.attrib["UserIsRequestor"] == "true"]
    assert worker[0].attrib["UserID"] == "gw1.example.org", "a worker's event is requested by mi2b2 itself"


def test_a_retrieval_names_the_pacs_as_source_and_mi2b2_as_destination() -> None:
    participants = {p.attrib["UserID"]: p for p in xml(EVENTS["retrieved"]).findall("ActiveParticipant")}
    pacs, ours = participants["PACS"], participants["gw1.example.org"]
    assert pacs.attrib["AlternativeUserID"] == "AETITLES=PACS" and pacs.attrib["NetworkAccessPointTypeCode"] == "1"
    assert codes(pacs, "RoleIDCode") == ["110153"] and codes(ours, "RoleIDCode") == ["110152"]
    forward = {p.attrib["UserID"]: p for p in xml(EVENTS["forwarded"]).findall("ActiveParticipant")}
    assert codes(forward["XNAT"], "RoleIDCode") == ["110152"] and forward["XNAT"].attrib["NetworkAccessPointID"] == "10.0.0.9"


def test_patient_study_and_instances_are_participant_objects() -> None:
    root = xml(EVENTS["retrieved"])
    objects = {o.find("ParticipantObjectIDTypeCode").attrib["csd-code"]: o  # type: ignore[union-attr]
               for o in root.findall("ParticipantObjectIdentification")}
    patient, study = objects["2"], objects["110180"]
    assert patient.attrib["ParticipantObjectID"] == "000123" and patient.attrib["ParticipantObjectTypeCodeRole"] == "1"
    assert study.attrib["ParticipantObjectID"] == STUDY
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert sop is not None and sop.attrib == {"NumberOfInstances": "6"}
    refused = xml(EVENTS["refused instances"])
    assert [i.attrib["UID"] for i in refused.iter("Instance")] == ["1.2.3.1", "1.2.3.2"]
    encrypted = xml(EVENTS["download"]).find(".//Encrypted")
    assert encrypted is not None and encrypted.text == "true"
    media = xml(EVENTS["download"]).find("ActiveParticipant/MediaIdentifier/MediaType")
    assert media is not None and media.attrib["csd-code"] == "110037"


def test_the_query_travels_base64_and_the_trail_row_is_named() -> None:
    e = EVENTS["query"]
    root = xml(e)
    query = root.find(".//ParticipantObjectQuery")
    assert query is not None and query.text is not None
    assert json.loads(base64.b64decode(query.text)) == json.loads(e.detail)
    row = [o for o in root.findall("ParticipantObjectIdentification")
           if o.attrib["ParticipantObjectID"] == "gw1.example.org:7"]
    assert len(row) == 1
    details = {d.attrib["type"]: base64.b64decode(d.attrib["value"]) for d in row[0].findall("ParticipantObjectDetail")}
    assert details["mi2b2-hash"] == e.hash.encode() and details["mi2b2-action"] == b"query"


def test_the_outcome_description_says_why() -> None:
    description = xml(EVENTS["irb refusal"]).find("EventIdentification/EventOutcomeDescription")
    assert description is not None and description.text == "denied: the IRB protocol of project beta expired on 2026-01-01"
    assert xml(EVENTS["login ok"]).find("EventIdentification/EventOutcomeDescription") is None


@pytest.mark.parametrize("hostile", ["a\x00b\x1bc", "<x>&amp;]]>", "line\nbreak\r", "\ud800 lone surrogate",
                                     "'\"quotes\""])
def test_hostile_text_from_the_network_stays_inside_one_valid_message(hostile: str) -> None:
    e = event("receive", "denied", actor=f"dicom:{hostile}"[:64], patient_id=hostile, study_uid=hostile,
              detail={"reason": hostile, "address": hostile})
    data = render(atna_message(e, SITE))
    text = data.decode()
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    root = ET.fromstring(data)  # well-formed: the XML parser takes it
    assert root.tag == "AuditMessage" and len(root.findall("ParticipantObjectIdentification")) >= 2
    if shutil.which("jing"):
        assert schema_errors([text]) == ""


def test_a_message_too_long_for_the_collector_is_shortened_not_dropped() -> None:
    instances = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(500)]
    e = event("receive", "denied", actor="dicom:PACS", patient_id="000123",
              detail={"refused": 500, "sop_instance_uids": instances, "reason": "x" * 5000})
    full = render(atna_message(e, SITE))
    assert len(full) > 30000
    short = render_within(e, SITE, 4096)
    assert len(short) <= 4096
    root = ET.fromstring(short)
    assert root.find(".//SOPClass") is not None and root.find(".//SOPClass").attrib["NumberOfInstances"] == "500"  # type: ignore[union-attr]
    assert '"shortened": true' in " ".join(base64.b64decode(d.attrib["value"]).decode()
                                           for d in root.iter("ParticipantObjectDetail"))
    tiny = render_within(e, SITE, 2048)  # what is left: the event, its participants and the trail row's reference
    assert len(tiny) <= 2048 and ET.fromstring(tiny).find(".//ParticipantObjectIdentification") is not None


def test_the_same_row_always_gives_the_same_message() -> None:
    assert render(atna_message(EVENTS["download"], SITE)) == render(atna_message(EVENTS["download"], SITE))


@pytest.mark.parametrize(("atna", "names"), [
    ({"syslog": "udp://h:514", "ca_file": "ca.pem"}, "only apply to a tls:// collector"),
    ({"syslog": "tls://h:6514", "cert_file": "c.pem"}, "cert_file and key_file go together"),
    ({"syslog": "udp://h:514", "max_message_bytes": 100000}, "does not fit one UDP datagram"),
    ({"syslog": "http://h:514"}, "must start with tls://, tcp:// or udp://"),
    ({"syslog": "tls://h"}, "a host and a port"),
])
def test_bad_atna_configuration_is_refused_naming_the_fix(atna: dict[str, Any], names: str) -> None:
    with pytest.raises(ValidationError, match=names):
        AuditConfig.model_validate({"atna": atna})


def test_good_atna_configuration() -> None:
    config = AuditConfig.model_validate({"atna": {"syslog": "tls://siem.example.org:6514", "ca_file": "ca.pem",
                                                  "cert_file": "c.pem", "key_file": "k.pem"}})
    assert config.atna is not None and str(config.atna.target()) == "tls://siem.example.org:6514"
