"""De-identify one DICOM file with pydicom, leaving its pixel data as stored.

Only the header is parsed (everything before the pixel data); the decisions
come from ``domain.deid``. The output is the rewritten header followed by the
original file's pixel data bytes, copied from ``pixel_start`` to ``pixel_end``
unchanged: nothing is decoded, so nothing is recompressed or altered. Elements
after the pixel data (trailing padding, digital signatures) are dropped: the
profile removes them anyway.

    outcome = deidentify_file(open(path, "rb"), engine)
    if isinstance(outcome, Deidentified):
        out = outcome.header + original[outcome.pixel_start:outcome.pixel_end]
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from mi2b2.domain.deid.burned_in import burned_in_verdict
from mi2b2.domain.deid.profile import Profile, ProfileOption
from mi2b2.domain.deid.pseudonyms import Pseudonymizer, shift_date, shift_datetime
from mi2b2.domain.deid.table import Action, ActionTable, action_table

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
ISSUER = 0x00100021
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
ITEM_DELIMITER = 0xFFFEE0DD
LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR", b"SV", b"UV"})
# File meta elements that name the sending or storing systems, and private meta information.
META_REMOVED = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028, 0x00020100, 0x00020102)
DUMMY_TEXT = "ANONYMIZED"
DUMMIES: dict[str, Any] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D", "DS": "0", "IS": "0",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "UV": 0, "SV": 0,
    "OB": b"", "OW": b"", "OF": b"", "OD": b"", "OL": b"", "OV": b"", "UN": b"", "UR": "", "AT": None,
}


class UnreadableInstance(ValueError):
    """The cached file cannot be parsed as DICOM: it is withheld, never sent as it is."""


@dataclass(frozen=True)
class DeidEngine:
    """Everything one export needs to de-identify: the profile and the project's pseudonyms.

    ``withhold_burned_in`` False is for attribute values only (a search answer, a viewer's labels),
    where no pixel data leaves: the instance is de-identified all the same and its risk is named."""

    profile: Profile
    pseudonyms: Pseudonymizer
    withhold_burned_in: bool = True

    @property
    def table(self) -> ActionTable:
        return action_table(self.profile)


@dataclass(frozen=True)
class Deidentified:
    header: bytes
    pixel_start: int
    pixel_end: int
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    risk: str = ""  # why its pixels would be withheld (made with withhold_burned_in False); "" if they would not

    @property
    def size(self) -> int:
        return len(self.header) + self.pixel_end - self.pixel_start


@dataclass(frozen=True)
class Withheld:
    reason: str
    series_uid: str  # pseudonymous
    modality: str
    sop_class: str


@dataclass
class _Facts:
    """What the walk over one instance needs: its patient's pseudonym and shift, and values to clean out."""

    patient_pseudonym: str
    shift: timedelta
    issuer: str
    identifying: list[str] = field(default_factory=list)


def deidentify_bytes(data: bytes, engine: DeidEngine) -> tuple[bytes, Deidentified] | tuple[None, Withheld]:
    """A whole file in memory: the de-identified bytes, or why it is withheld."""
    outcome = deidentify_file(io.BytesIO(data), engine)
    if isinstance(outcome, Withheld):
        return None, outcome
    return outcome.header + data[outcome.pixel_start:outcome.pixel_end], outcome


def deidentify_file(fp: BinaryIO, engine: DeidEngine) -> Deidentified | Withheld:
    """Read the header of a seekable file, decide, and rewrite the header; the pixel data is only located."""
    try:
        ds = dcmread(fp, stop_before_pixels=True)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise UnreadableInstance("no transfer syntax")
        if syntax == DeflatedExplicitVRLittleEndian:
            # The whole body is one deflate stream: its pixel bytes cannot be copied apart, so the
            # file is read whole (pixel data stays bytes, never decoded) and written whole.
            fp.seek(0)
            ds = dcmread(fp)
            start = end = 0
        else:
            start = fp.tell()
            end = _pixel_extent(fp, start, syntax.is_little_endian, syntax.is_implicit_VR)
    except (InvalidDicomError, UnreadableInstance, ValueError, KeyError, EOFError, OSError, struct.error,
            RecursionError) as exc:  # RecursionError: sequences nested deeper than pydicom reads
        return Withheld(f"not readable as DICOM ({type(exc).__name__})", "", "", "")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
    if missing:  # e.g. a file cut short: pydicom reads what is there without complaint
        return Withheld(f"not readable as DICOM (no {missing[0]})", "", str(ds.get("Modality", "") or ""),
                        str(ds.get("SOPClassUID", "") or ""))
    series = engine.pseudonyms.uid(str(ds.get("SeriesInstanceUID", "")))
    verdict = burned_in_verdict(engine.profile, str(ds.get("BurnedInAnnotation", "") or ""),
                                str(ds.get("Modality", "") or ""), str(ds.get("SOPClassUID", "") or ""),
                                str(ds.get("SeriesInstanceUID", "") or ""))
    if verdict.withhold and engine.withhold_burned_in:
        return Withheld(verdict.reason, series, str(ds.get("Modality", "") or ""), str(ds.get("SOPClassUID", "")))
    header = io.BytesIO()
    try:
        _deidentify_dataset(ds, engine)
        ds.preamble = b"\0" * 128  # a preamble may hold a TIFF header naming the patient
        dcmwrite(header, ds, enforce_file_format=True)
    except Exception as exc:  # whatever a hostile header does, it is withheld, never sent as it is
        return Withheld(f"could not be de-identified ({type(exc).__name__})", series,
                        str(ds.get("Modality", "") or ""), str(ds.get("SOPClassUID", "") or ""))
    return Deidentified(header.getvalue(), start, end, str(ds.PatientID), str(ds.StudyInstanceUID),
                        str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                        verdict.reason if verdict.withhold else "")


def _pixel_extent(fp: BinaryIO, start: int, little: bool, implicit: bool) -> int:
    """Where the pixel data elements that begin at ``start`` end (undefined lengths walked item by item)."""
    size = fp.seek(0, io.SEEK_END)
    endian = "<" if little else ">"
    position = start
    while True:
        fp.seek(position)
        head = fp.read(8)
        if len(head) < 8:
            return position
        group, element = struct.unpack(endian + "HH", head[:4])
        if (group << 16 | element) not in PIXEL_TAGS:
            return position
        if implicit:
            length, header_length = struct.unpack(endian + "I", head[4:8])[0], 8
        elif head[4:6] in LONG_VRS:
            length, header_length = struct.unpack(endian + "I", fp.read(4))[0], 12
        else:
            length, header_length = struct.unpack(endian + "H", head[6:8])[0], 8
        position += header_length
        if length == 0xFFFFFFFF:
            while True:
                fp.seek(position)
                item = fp.read(8)
                if len(item) < 8:
                    raise UnreadableInstance("encapsulated pixel data is cut short")
                item_group, item_element, item_length = struct.unpack(endian + "HHI", item)
                position += 8
                if (item_group << 16 | item_element) == ITEM_DELIMITER:
                    break
                position += item_length
        else:
            position += length
        if position > size:
            raise UnreadableInstance("the pixel data is cut short")


def _deidentify_dataset(ds: Dataset, engine: DeidEngine) -> None:
    original_id = str(ds.get("PatientID", "") or "")
    issuer = str(ds.get("IssuerOfPatientID", "") or "")
    pseudonyms = engine.pseudonyms
    facts = _Facts(pseudonyms.patient_id(original_id, issuer), pseudonyms.date_shift(original_id, issuer), issuer)
    if engine.profile.has(ProfileOption.CLEAN_DESCRIPTORS):
        facts.identifying = _identifying_values(ds)
    _walk(ds, engine, facts)
    profile = engine.profile
    ds.PatientID = facts.patient_pseudonym
    ds.PatientName = facts.patient_pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = profile.method_text()
    codes = []
    for value, meaning in profile.codes():
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
    shifted = profile.has(ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if shifted else "REMOVED"
    meta = ds.file_meta
    for tag in META_REMOVED:
        if tag in meta:
            del meta[tag]
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _identifying_values(ds: Dataset) -> list[str]:
    values: list[str] = []
    for keyword in ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                    "NameOfPhysiciansReadingStudy"):
        for name in _values(ds.get(keyword)):
            values.append(str(name))
            values.extend(part for part in re.split(r"[\^= ,]+", str(name)) if len(part) >= 3)
    for keyword in ("PatientID", "AccessionNumber", "PatientBirthDate", "OtherPatientIDs", "StudyID",
                    "InstitutionName"):
        values.extend(str(v) for v in _values(ds.get(keyword)) if len(str(v).strip()) >= 3)
    return sorted({v.strip() for v in values}, key=len, reverse=True)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]


def _walk(ds: Dataset, engine: DeidEngine, facts: _Facts) -> None:
    table = engine.table
    safe_private = engine.profile.safe_private if engine.profile.has(ProfileOption.RETAIN_SAFE_PRIVATE) else None
    kept_creators: set[int] = set()
    for tag in list(ds.keys()):
        number = int(tag)
        if number & 0xFFFF == 0:  # group lengths: wrong once values change, and retired anyway
            del ds[tag]
            continue
        if tag.is_private:
            if tag.is_private_creator:
                continue  # decided below, once it is known whether any element it reserves stays
            if safe_private is not None and _safe(ds, number, safe_private):
                kept_creators.add((number & 0xFFFF0000) | ((number >> 8) & 0xFF))
                continue
            del ds[tag]
            continue
        if number == PATIENT_ID:
            ds[tag].value = engine.pseudonyms.patient_id(str(ds[tag].value or ""), facts.issuer)
            continue
        if number == PATIENT_NAME:
            ds[tag].value = facts.patient_pseudonym
            continue
        action = table.action_for(number)
        if action is None:
            if _vr_of(ds, number) == "SQ":
                action = Action.WALK
            else:
                continue
        _apply(ds, number, action, engine, facts)
    for tag in list(ds.keys()):
        if tag.is_private_creator and int(tag) not in kept_creators:
            del ds[tag]


def _safe(ds: Dataset, number: int, safe: frozenset[tuple[str, int]]) -> bool:
    creator_tag = (number & 0xFFFF0000) | ((number >> 8) & 0xFF)
    creator = ds.get(creator_tag)
    return creator is not None and (str(creator.value).strip(), number & 0xFF) in safe


def _vr_of(ds: Dataset, number: int) -> str:
    raw = ds.get_item(number)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(number))
    except KeyError:
        return ""


def _apply(ds: Dataset, number: int, action: Action, engine: DeidEngine, facts: _Facts) -> None:
    if action is Action.KEEP:
        return
    if action is Action.REMOVE:
        del ds[number]
        return
    element: DataElement = ds[number]
    vr = str(element.VR)
    if vr == "SQ":
        if action is Action.EMPTY:
            element.value = Sequence([])
        else:
            for item in element.value or []:
                _walk(item, engine, facts)
        return
    if action is Action.EMPTY:
        element.value = None
    elif action is Action.UID or vr == "UI":
        element.value = _mapped(element.value, engine.pseudonyms.uid)
    elif action is Action.SHIFT and vr in ("DA", "DT"):
        shift = shift_date if vr == "DA" else shift_datetime
        moved = [shift(str(v), facts.shift) for v in _values(element.value)]
        element.value = None if any(m is None for m in moved) or not moved else (
            moved[0] if len(moved) == 1 else moved)
    elif action is Action.CLEAN and isinstance(element.value, str):
        element.value = _cleaned(element.value, facts.identifying)
    elif action in (Action.DUMMY, Action.SHIFT, Action.CLEAN, Action.WALK):
        element.value = DUMMIES.get(vr, DUMMY_TEXT) if element.value not in (None, "", b"") else element.value


def _mapped(value: Any, remap: Any) -> Any:
    values = [remap(str(v)) for v in _values(value)]
    if not values:
        return value
    return values[0] if len(values) == 1 else values


def _cleaned(text: str, identifying: Iterable[str]) -> str:
    for value in identifying:
        text = re.sub(re.escape(value), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()
