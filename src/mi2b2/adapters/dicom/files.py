"""Reading just enough of a DICOM file to file it: never the pixel data."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from mi2b2.errors import InvalidInput

_HEADER_KEYWORDS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
]


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    study_description: str
    modality: str
    series_number: int | None
    instance_number: int | None
    transfer_syntax: str
    issuer: str = ""  # Issuer of Patient ID (0010,0021), when the sender gives it


class UnreadableInstance(InvalidInput):
    """The file is not DICOM, or lacks the identifiers mi2b2 files instances by."""


def read_instance_header(path: Path) -> InstanceHeader:
    try:
        with open(path, "rb") as file:
            head = file.read(_HEAD_BYTES)
    except OSError as exc:
        raise UnreadableInstance(f"{path.name} is not a readable DICOM file ({type(exc).__name__})") from None
    header = _fast_header(head)
    if header is not None:
        return header
    return _pydicom_header(path)


def _pydicom_header(path: Path) -> InstanceHeader:
    return header_from_file(path, path.name)


def header_from_file(source: Path | BinaryIO, name: str) -> InstanceHeader:
    """The header through pydicom, from a file or a Part 10 file held in memory."""
    try:
        ds = dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_KEYWORDS)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise UnreadableInstance(f"{name} is not a readable DICOM file ({type(exc).__name__})") from None
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise UnreadableInstance(f"{name} has no {', '.join(missing)}; it cannot be filed in the cache")
    meta = getattr(ds, "file_meta", None)
    return InstanceHeader(
        sop_class_uid=str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        series_number=_int(ds.get("SeriesNumber")),
        instance_number=_int(ds.get("InstanceNumber")),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "",
        issuer=str(ds.get("IssuerOfPatientID", "") or ""),
    )


def _int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None


# --- the fast path ------------------------------------------------------------------------
#
# The receiver reads a header for every instance it gets; through pydicom that
# is ~0.9 ms, more than it takes to receive a 512 KB image. Nearly every file
# is Part 10, little endian, with the wanted tags (all below 0020,0014) in its
# first few KB: those are walked here by hand. Anything else - deflate, big
# endian, other character sets, a tag beyond the first 64 KiB, a structure not
# understood - returns None and goes through pydicom as before.

_HEAD_BYTES = 64 * 1024
_LAST_WANTED = 0x00200013  # InstanceNumber
_WANTED = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00081030: "StudyDescription",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
}
# Single-byte or UTF-8 character sets; the ISO 2022 ones need pydicom.
_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_NOT_WALKED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})  # deflated, big endian
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _Unsupported(Exception):
    """The fast path does not handle this file: use pydicom."""


def parse_instance_header(head: bytes | bytearray) -> InstanceHeader | None:
    """The header from a Part 10 file's first bytes (64 KiB are plenty), or None.

    None means only that this fast path does not handle the file (see above);
    `read_instance_header` then reads it with pydicom and says what is wrong.
    For a receiver that still holds the bytes it just wrote.
    """
    return _fast_header(bytes(head))


def _fast_header(head: bytes) -> InstanceHeader | None:
    try:
        return _walk(head)
    except (_Unsupported, struct.error, UnicodeDecodeError, ValueError):
        return None


def _walk(head: bytes) -> InstanceHeader | None:
    if len(head) < 132 or head[128:132] != b"DICM":
        raise _Unsupported
    meta: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(head) and _TAG.unpack_from(head, offset)[0] == 0x0002:
        tag, value, offset = _element(head, offset, explicit=True)
        meta[tag] = value
    transfer_syntax = _ascii(meta.get(0x00020010, b""))
    if not transfer_syntax or transfer_syntax in _NOT_WALKED:
        raise _Unsupported
    found = _elements(head, offset, explicit=transfer_syntax != _IMPLICIT_LE)
    charset = _ascii(found.get(0x00080005, b""))
    if charset not in _CHARSETS:
        raise _Unsupported
    encoding = _CHARSETS[charset]

    def text(tag: int) -> str:
        return found.get(tag, b"").decode(encoding).rstrip(" \0")

    def uid(tag: int) -> str:
        return _ascii(found.get(tag, b""))

    if not (uid(0x00080018) and uid(0x0020000D) and uid(0x0020000E)):
        raise _Unsupported  # pydicom's path words the refusal
    return InstanceHeader(
        sop_class_uid=uid(0x00080016) or _ascii(meta.get(0x00020002, b"")),
        sop_instance_uid=uid(0x00080018),
        study_uid=uid(0x0020000D),
        series_uid=uid(0x0020000E),
        patient_id=text(0x00100020),
        patient_name=text(0x00100010),
        accession=text(0x00080050),
        study_date=text(0x00080020),
        study_description=text(0x00081030),
        modality=text(0x00080060),
        series_number=_int(text(0x00200011).strip() or None),
        instance_number=_int(text(0x00200013).strip() or None),
        transfer_syntax=transfer_syntax,
        issuer=text(0x00100021),
    )


def _elements(head: bytes, offset: int, explicit: bool) -> dict[int, bytes]:
    """The wanted top-level elements, walking until the last wanted tag is passed."""
    found: dict[int, bytes] = {}
    while True:
        if offset + 8 > len(head):
            raise _Unsupported  # the header goes on past what was read
        group, element = _TAG.unpack_from(head, offset)
        tag = group << 16 | element
        if tag > _LAST_WANTED:
            return found
        tag, value, offset = _element(head, offset, explicit)
        if tag in _WANTED:
            found[tag] = value


def _element(head: bytes, offset: int, explicit: bool) -> tuple[int, bytes, int]:
    """(tag, value bytes, offset after it); sequences of undefined length skipped."""
    group, element = _TAG.unpack_from(head, offset)
    tag = group << 16 | element
    if explicit:
        vr = head[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            length = _U32.unpack_from(head, offset + 8)[0]
            offset += 12
        else:
            length = _U16.unpack_from(head, offset + 6)[0]
            offset += 8
        if length == _UNDEFINED and vr != b"SQ":
            raise _Unsupported  # UN of undefined length switches to implicit VR inside
    else:
        length = _U32.unpack_from(head, offset + 4)[0]
        offset += 8
    if length == _UNDEFINED:
        return tag, b"", _skip_sequence(head, offset, explicit)
    end = offset + length
    if end > len(head):
        raise _Unsupported
    return tag, head[offset:end], end


def _skip_sequence(head: bytes, offset: int, explicit: bool) -> int:
    while True:
        if offset + 8 > len(head):
            raise _Unsupported
        group, element = _TAG.unpack_from(head, offset)
        tag = group << 16 | element
        length = _U32.unpack_from(head, offset + 4)[0]
        offset += 8
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise _Unsupported
        if length != _UNDEFINED:
            offset += length
            continue
        while True:  # an item of undefined length: elements up to its delimiter
            if offset + 8 > len(head):
                raise _Unsupported
            group, element = _TAG.unpack_from(head, offset)
            if (group << 16 | element) == _ITEM_END:
                offset += 8
                break
            _, _, offset = _element(head, offset, explicit)


def _ascii(value: bytes) -> str:
    return value.decode("ascii").strip(" \0")
