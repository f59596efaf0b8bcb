"""One audit event as an IHE ATNA audit message (DICOM PS3.15 A.5, schema A.5.1, codes PS3.16 CID 400-405).

`atna_message` maps an event of the trail to the message model, `render` writes its XML. Both are
pure: the event, the site's description of itself and its peers in, bytes out; the same event
always gives the same message, so a redelivered message is recognisably the same one.

The security team's audit repository may hold patient identifiers (that is its job), so the
patient ID goes into the message; ordinary logs never see it.

Mapping of mi2b2 actions (Outcome: ok 0, failed 8 (a login 4: the user may try again),
denied 4 (a refusal: the safeguard worked; a throttled login 8)):

=================  ==========================================  ======  ==================================
action             EventID (DCM)                               Action  EventTypeCode
=================  ==========================================  ======  ==================================
login / logout     110114 User Authentication                  E       110122 Login / 110123 Logout
query              110112 Query                                E
retrieve, forward  110102 Begin Transferring DICOM Instances   E       (queued, changed by a user)
                   110104 DICOM Instances Transferred          C / R   (ended or retried by a worker)
receive            110104 DICOM Instances Transferred          C       (refused instances)
download           110106 Export                               R
view               110103 DICOM Instances Accessed             R
delete             110105 DICOM Study Deleted                  D
audit_read         110101 Audit Log Used                       R
denied             110113 Security Alert                       E       110132 Use of Restricted Function
user_admin, token  110113 Security Alert                       E       110137 User Security Attributes Changed
allow_list         110113 Security Alert                       E       110135 Object Security Attributes Changed
audit_key          110113 Security Alert                       E       110129 Security Configuration
cache_check        110113 Security Alert                       E       110141 Local Service Operation Started
config_reload      110100 Application Activity (at startup)    E       110120 Application Start
                   110113 Security Alert (a reload)            E       110131 Software Configuration
=================  ==========================================  ======  ==================================
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mi2b2.domain.audit_chain import ChainedEvent


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName`` and ``originalText`` (the code meaning)."""

    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EXPORT = _dcm("110106", "Export")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")

APPLICATION_START = _dcm("110120", "Application Start")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = _dcm("110135", "Object Security Attributes Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")
LOCAL_SERVICE_OPERATION_STARTED = _dcm("110141", "Local Service Operation Started")

APPLICATION_ROLE = _dcm("110150", "Application")
DESTINATION_ROLE = _dcm("110152", "Destination Role ID")
SOURCE_ROLE = _dcm("110153", "Source Role ID")
DESTINATION_MEDIA = _dcm("110154", "Destination Media")
MEDIA_URI = _dcm("110037", "URI")

PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
PROJECT = Code("project", "mi2b2", "Research project (IRB protocol)")
TRAIL_ROW = Code("audit-row", "mi2b2", "Row of the mi2b2 audit trail")

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

# ParticipantObjectTypeCode / ...TypeCodeRole / ...DataLifeCycle values (PS3.15 A.5.1.2)
PERSON, SYSTEM_OBJECT, ORGANIZATION, OTHER = 1, 2, 3, 4
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE, ROLE_DATA_DESTINATION, ROLE_JOB, ROLE_QUERY = 1, 3, 13, 16, 20, 24
LIFE_IMPORT, LIFE_ACCESS, LIFE_EXPORT, LIFE_LOGICAL_DELETION = 2, 6, 10, 14

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8
MACHINE_ACTORS = ("worker", "scheduler", "system")  # the trail's names for mi2b2's own processes
MAX_INSTANCES = 200  # SOP instance UIDs listed per message before the list gives way to its count
TRANSFER_EVENTS = ("completed", "incomplete", "failed", "canceled", "transient failure")


@dataclass(frozen=True)
class Participant:
    user_id: str
    requestor: bool
    alternative_user_id: str | None = None
    user_name: str | None = None
    access_point: str | None = None
    roles: tuple[Code, ...] = ()
    media_type: Code | None = None


@dataclass(frozen=True)
class SopClass:
    uid: str | None  # None when mi2b2 knows how many instances, not their SOP class
    count: int
    instances: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParticipantObject:
    object_id: str
    id_type: Code
    name: str | None = None
    query: bytes | None = None  # exactly one of name and query (the schema's choice)
    type_code: int | None = None
    role: int | None = None
    life_cycle: int | None = None
    details: tuple[tuple[str, bytes], ...] = ()
    sop_classes: tuple[SopClass, ...] = ()
    encrypted: bool | None = None


@dataclass(frozen=True)
class AuditSource:
    source_id: str
    enterprise_site_id: str | None = None


@dataclass(frozen=True)
class Node:
    """A DICOM peer the trail names by its configuration id: a PACS or a forward destination."""

    ae_title: str
    host: str


@dataclass(frozen=True)
class AtnaSite:
    """How mi2b2 describes itself and its peers in each message."""

    source: AuditSource
    ae_title: str  # mi2b2's own
    host: str  # the machine mi2b2 runs on (NetworkAccessPointID)
    nodes: Mapping[str, Node] = field(default_factory=dict)  # configuration id -> PACS or destination


@dataclass(frozen=True)
class AtnaMessage:
    event_id: Code
    event_types: tuple[Code, ...]
    action_code: str
    at: str
    outcome: int
    outcome_description: str | None
    participants: tuple[Participant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...]


def atna_message(event: ChainedEvent, site: AtnaSite) -> AtnaMessage:
    detail = _detail(event.detail)
    event_id, types, action_code = _event_kind(event.action, detail)
    return AtnaMessage(
        event_id=event_id,
        event_types=types,
        action_code=action_code,
        at=event.occurred_at,
        outcome=_outcome(event.action, event.outcome),
        outcome_description=_outcome_description(event.outcome, detail),
        participants=_participants(event, detail, site),
        source=site.source,
        objects=_objects(event, detail, site),
    )


def _detail(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event_kind(action: str, detail: Mapping[str, Any]) -> tuple[Code, tuple[Code, ...], str]:
    if action == "login":
        return USER_AUTHENTICATION, (LOGIN,), "E"
    if action == "logout":
        return USER_AUTHENTICATION, (LOGOUT,), "E"
    if action == "query":
        return QUERY, (), "E"
    if action in ("retrieve", "forward"):
        if detail.get("event") in TRANSFER_EVENTS:
            # mi2b2 creates copies in its cache; of a forward's receiver it knows nothing (A.5.3.4: then R).
            return INSTANCES_TRANSFERRED, (), "C" if action == "retrieve" else "R"
        return BEGIN_TRANSFERRING, (), "E"
    if action == "receive":
        return INSTANCES_TRANSFERRED, (), "C"
    if action == "download":
        return EXPORT, (), "R"
    if action in ("view", "list"):  # list: a de-identified project's studies shown under pseudonyms
        return INSTANCES_ACCESSED, (), "R"
    if action == "delete":
        return STUDY_DELETED, (), "D"
    if action == "audit_read":
        return AUDIT_LOG_USED, (), "R"
    if action == "config_reload" and detail.get("op") == "startup":
        return APPLICATION_ACTIVITY, (APPLICATION_START,), "E"
    alert_type = {
        "denied": USE_OF_RESTRICTED_FUNCTION,
        "user_admin": USER_SECURITY_ATTRIBUTES_CHANGED,
        "token_admin": USER_SECURITY_ATTRIBUTES_CHANGED,
        "allow_list": OBJECT_SECURITY_ATTRIBUTES_CHANGED,
        "audit_key": SECURITY_CONFIGURATION,
        "cache_check": LOCAL_SERVICE_OPERATION_STARTED,
        "config_reload": SOFTWARE_CONFIGURATION,
    }.get(action)
    # An action this table does not know yet still reaches the security team, as an alert.
    return SECURITY_ALERT, (alert_type,) if alert_type else (), "E"


def _outcome(action: str, outcome: str) -> int:
    if outcome == "ok":
        return SUCCESS
    if action == "login":
        return MINOR_FAILURE if outcome == "failed" else SERIOUS_FAILURE
    return MINOR_FAILURE if outcome == "denied" else SERIOUS_FAILURE


def _outcome_description(outcome: str, detail: Mapping[str, Any]) -> str | None:
    if outcome == "ok":
        return None
    said = [str(detail[key]) for key in ("reason", "error", "event", "reasons") if detail.get(key)]
    return f"{outcome}: {'; '.join(said)}" if said else outcome


def _is_person(actor: str) -> bool:
    return actor not in MACHINE_ACTORS and not actor.startswith("dicom:")


def _access_point(address: str) -> str | None:
    """An IP address or a host name, as NetworkAccessPointID (a token: no spaces)."""
    address = address.strip()
    return address if address and not any(c.isspace() for c in address) else None


def _access_point_type(address: str) -> str:
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _participants(event: ChainedEvent, detail: Mapping[str, Any], site: AtnaSite) -> tuple[Participant, ...]:
    person = _is_person(event.actor)
    remote_ae = event.actor[len("dicom:"):] if event.actor.startswith("dicom:") else None
    ours_role, peer, peer_role = _roles(event, detail, site)
    found: list[Participant] = []
    if person:
        client = event.client or str(detail.get("client", ""))
        found.append(Participant(event.actor, True, access_point=_access_point(client)))
    elif remote_ae is not None:
        found.append(Participant(remote_ae, True, alternative_user_id=f"AETITLES={remote_ae}",
                                 access_point=_access_point(str(detail.get("address", ""))), roles=(SOURCE_ROLE,)))
    # mi2b2 itself: the requestor when one of its own processes acted (a worker ending a retrieval).
    found.append(Participant(site.source.source_id, not person and remote_ae is None,
                             alternative_user_id=f"AETITLES={site.ae_title}", user_name="mi2b2",
                             access_point=_access_point(site.host), roles=(ours_role,) if ours_role else ()))
    if peer is not None and peer_role is not None:
        node = site.nodes.get(peer)
        found.append(Participant(node.ae_title if node else peer, False,
                                 alternative_user_id=f"AETITLES={node.ae_title}" if node else None,
                                 user_name=peer, access_point=_access_point(node.host) if node else None,
                                 roles=(peer_role,)))
    if event.action == "download" and event.outcome == "ok":
        via = str(detail.get("via", "download"))
        found.append(Participant(f"{via} to {event.client or 'the user'}", False, roles=(DESTINATION_MEDIA,),
                                 media_type=MEDIA_URI))
    return tuple(found)


def _roles(event: ChainedEvent, detail: Mapping[str, Any],
           site: AtnaSite) -> tuple[Code | None, str | None, Code | None]:
    """mi2b2's role, the peer (a configuration id) and its role in the transfer or query."""
    if event.action in ("retrieve", "query") and event.pacs_id:
        # A retrieval copies from the PACS to mi2b2; a query is asked of the PACS.
        if event.action == "retrieve":
            return DESTINATION_ROLE, event.pacs_id, SOURCE_ROLE
        return SOURCE_ROLE, event.pacs_id, DESTINATION_ROLE
    if event.action == "forward" and detail.get("destination"):
        return SOURCE_ROLE, str(detail["destination"]), DESTINATION_ROLE
    if event.action == "receive":
        return DESTINATION_ROLE, None, None
    if event.action == "download":
        return SOURCE_ROLE, None, None
    if event.action == "audit_read":
        return APPLICATION_ROLE, None, None
    return None, None, None


def _objects(event: ChainedEvent, detail: Mapping[str, Any], site: AtnaSite) -> tuple[ParticipantObject, ...]:
    found: list[ParticipantObject] = []
    life_cycle = {"retrieve": LIFE_IMPORT, "receive": LIFE_IMPORT, "download": LIFE_EXPORT, "forward": LIFE_EXPORT,
                  "view": LIFE_ACCESS, "delete": LIFE_LOGICAL_DELETION}.get(event.action)
    if event.patient_id:
        # mi2b2 keeps no patient names: the ID is the name it knows the patient by.
        found.append(ParticipantObject(event.patient_id, PATIENT_NUMBER, name=event.patient_id, type_code=PERSON,
                                       role=ROLE_PATIENT))
    if event.study_uid:
        found.append(ParticipantObject(event.study_uid, STUDY_INSTANCE_UID, name=event.study_uid,
                                       type_code=SYSTEM_OBJECT, role=ROLE_REPORT, life_cycle=life_cycle,
                                       sop_classes=_sop_classes(detail), encrypted=_encrypted(detail)))
    elif event.action == "receive" and detail.get("sop_instance_uids"):
        found.append(ParticipantObject("refused instances", Code("refused", "mi2b2", "Refused instances"),
                                       name="refused instances", type_code=SYSTEM_OBJECT, role=ROLE_REPORT,
                                       sop_classes=_sop_classes(detail)))
    if event.action == "query":
        sop_class = PATIENT_ROOT_FIND if str(detail.get("kind", "")).lower().startswith("patient") else STUDY_ROOT_FIND
        found.append(ParticipantObject(sop_class, SOP_CLASS_UID, query=event.detail.encode(), type_code=SYSTEM_OBJECT,
                                       role=ROLE_QUERY,
                                       details=(("TransferSyntax", IMPLICIT_VR_LITTLE_ENDIAN.encode()),)))
    if event.action == "audit_read":
        found.append(ParticipantObject(f"mi2b2://{site.source.source_id}/audit", URI, name="Security Audit Log",
                                       type_code=SYSTEM_OBJECT, role=ROLE_SECURITY_RESOURCE,
                                       details=(("Query", event.detail.encode()),)))
    if event.action in ("forward", "retrieve") and detail.get("request") is not None:
        found.append(ParticipantObject(f"request {detail['request']}", Code("request", "mi2b2", "mi2b2 request"),
                                       name=f"request {detail['request']}", type_code=SYSTEM_OBJECT, role=ROLE_JOB))
    if event.project_id:
        found.append(ParticipantObject(event.project_id, PROJECT, name=event.project_id, type_code=ORGANIZATION))
    pacs = event.pacs_id and site.nodes.get(event.pacs_id)
    if event.action == "denied" and event.pacs_id:
        found.append(ParticipantObject(pacs.ae_title if pacs else event.pacs_id, NODE_ID, name=event.pacs_id,
                                       type_code=SYSTEM_OBJECT, role=ROLE_DATA_DESTINATION))
    # Last: the trail row this message copies, so the SIEM can ask mi2b2 for it and notice a gap.
    found.append(ParticipantObject(f"{site.source.source_id}:{event.seq}", TRAIL_ROW, name=f"audit row {event.seq}",
                                   type_code=SYSTEM_OBJECT, role=ROLE_SECURITY_RESOURCE,
                                   details=(("mi2b2-action", event.action.encode()),
                                            ("mi2b2-detail", event.detail.encode()),
                                            ("mi2b2-hash", event.hash.encode()))))
    return tuple(found)


def _sop_classes(detail: Mapping[str, Any]) -> tuple[SopClass, ...]:
    instances = detail.get("sop_instance_uids")
    if isinstance(instances, list) and instances:
        return (SopClass(None, len(instances), tuple(str(uid) for uid in instances)),)
    for key in ("received", "files", "instances", "refused"):
        count = detail.get(key)
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return (SopClass(None, count),)
    return ()


def _encrypted(detail: Mapping[str, Any]) -> bool | None:
    encryption = detail.get("encryption")
    if encryption is None:
        return None
    return str(encryption).lower() not in ("", "none", "false")


# --- size ----------------------------------------------------------------------------


def shortened(message: AtnaMessage, step: int) -> AtnaMessage:
    """The message with less in it, for a collector's size limit: 1 drops instance lists (their
    counts stay), 2 replaces long texts (query, detail) by their SHA-256 (the trail row keeps them),
    3 keeps of the objects only the trail row's reference."""
    objects = []
    kept = [obj for obj in message.objects if obj.id_type == TRAIL_ROW] if step >= 3 else message.objects
    for obj in kept:
        if step >= 1:
            obj = replace(obj, sop_classes=tuple(replace(s, instances=()) for s in obj.sop_classes))
        if step >= 2:
            obj = replace(obj, query=_digest_note(obj.query) if obj.query is not None else None,
                          details=tuple((kind, _digest_note(value) if len(value) > 128 else value)
                                        for kind, value in obj.details))
        objects.append(obj)
    description = message.outcome_description
    if step >= 2 and description is not None and len(description) > 200:
        description = description[:200] + "..."
    return replace(message, objects=tuple(objects), outcome_description=description)


def _digest_note(value: bytes) -> bytes:
    return json.dumps({"shortened": True, "bytes": len(value),
                       "sha256": hashlib.sha256(value).hexdigest()}).encode()


# --- XML -----------------------------------------------------------------------------

# Characters XML 1.0 cannot carry (a PatientID from the network may hold them).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _token(value: str) -> str:
    """An xsd:token as the schema reads it: no control characters, single spaces."""
    return " ".join(_text(value).split())


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def render(message: AtnaMessage) -> bytes:
    """The ``AuditMessage`` element as UTF-8 XML on one line (no declaration: RFC 5424 MSG)."""
    root = ET.Element("AuditMessage")
    event = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": message.action_code, "EventDateTime": message.at,
        "EventOutcomeIndicator": str(message.outcome)})
    _coded(event, "EventID", message.event_id)
    for event_type in message.event_types:
        _coded(event, "EventTypeCode", event_type)
    if message.outcome_description is not None:
        # One line: a newline inside would be escaped by no serializer, and a message is one record.
        ET.SubElement(event, "EventOutcomeDescription").text = _token(message.outcome_description)
    for participant in message.participants:
        attributes = {"UserID": _text(participant.user_id),
                      "UserIsRequestor": "true" if participant.requestor else "false"}
        if participant.alternative_user_id is not None:
            attributes["AlternativeUserID"] = _text(participant.alternative_user_id)
        if participant.user_name is not None:
            attributes["UserName"] = _text(participant.user_name)
        if participant.access_point:
            attributes["NetworkAccessPointID"] = _token(participant.access_point)
            attributes["NetworkAccessPointTypeCode"] = _access_point_type(participant.access_point)
        element = ET.SubElement(root, "ActiveParticipant", attributes)
        for role in participant.roles:
            _coded(element, "RoleIDCode", role)
        if participant.media_type is not None:
            _coded(ET.SubElement(element, "MediaIdentifier"), "MediaType", participant.media_type)
    source = {"AuditSourceID": _token(message.source.source_id)}
    if message.source.enterprise_site_id:
        source["AuditEnterpriseSiteID"] = _token(message.source.enterprise_site_id)
    source_element = ET.SubElement(root, "AuditSourceIdentification", source)
    ET.SubElement(source_element, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    for obj in message.objects:
        _object(root, obj)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return xml


def _object(root: ET.Element, obj: ParticipantObject) -> None:
    attributes = {"ParticipantObjectID": _token(obj.object_id)}
    if obj.type_code is not None:
        attributes["ParticipantObjectTypeCode"] = str(obj.type_code)
    if obj.role is not None:
        attributes["ParticipantObjectTypeCodeRole"] = str(obj.role)
    if obj.life_cycle is not None:
        attributes["ParticipantObjectDataLifeCycle"] = str(obj.life_cycle)
    element = ET.SubElement(root, "ParticipantObjectIdentification", attributes)
    _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
    if obj.query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(obj.query).decode()
    else:
        ET.SubElement(element, "ParticipantObjectName").text = _token(obj.name or obj.object_id)
    for kind, value in obj.details:
        ET.SubElement(element, "ParticipantObjectDetail", {"type": kind, "value": base64.b64encode(value).decode()})
    if obj.sop_classes or obj.encrypted is not None:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        for sop_class in obj.sop_classes:
            attributes = {"NumberOfInstances": str(sop_class.count)}
            if sop_class.uid is not None:
                attributes["UID"] = sop_class.uid
            sop = ET.SubElement(description, "SOPClass", attributes)
            for uid in sop_class.instances[:MAX_INSTANCES]:
                ET.SubElement(sop, "Instance", {"UID": _token(uid)})
        if obj.encrypted is not None:
            ET.SubElement(description, "Encrypted").text = "true" if obj.encrypted else "false"


def render_within(event: ChainedEvent, site: AtnaSite, limit: int) -> bytes:
    """The message's XML, shortened (`shortened`) until it fits ``limit`` bytes; ValueError if it never does."""
    message = atna_message(event, site)
    for step in range(4):
        xml = render(shortened(message, step) if step else message)
        if len(xml) <= limit:
            return xml
    raise ValueError(f"the ATNA message of audit row {event.seq} is {len(xml)} bytes even shortened; "
                     f"raise [audit.atna] max_message_bytes")
