"""The bytes of a C-STORE exchange, encoded and parsed by hand.

The receiver (`store_receiver`) reads C-STORE requests off the P-DATA stream
and answers them without pydicom or pynetdicom's DIMSE layer: these dozen
fixed elements cost more to decode and encode through them than writing a
512 KB instance does. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID, generate_uid

__all__ = [
    "A_RELEASE_RQ",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "PDU_LENGTH",
    "PDU_TYPES",
    "P_DATA_TF",
    "StoreRequest",
    "file_meta",
    "p_data_fragments",
    "p_data_tf",
    "parse_store_request",
    "store_response",
]

# Identifies mi2b2 as the writer of the received files' meta header.
IMPLEMENTATION_CLASS_UID: UID = generate_uid(entropy_srcs=["mi2b2 research imaging gateway"])
IMPLEMENTATION_VERSION = "MI2B2_0"

# PDU types (PS3.8 9.3) and the length field of a PDU header and of a PDV item.
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
PDU_TYPES = frozenset(range(0x01, 0x08))
PDU_LENGTH = struct.Struct(">I")

# Command set elements (group 0000, Implicit VR Little Endian, PS3.7 E.1).
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_DATA_SET_TYPE = 0x0800
_AFFECTED_SOP_CLASS = 0x0002
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031
_MESSAGE_ID_RESPONDED = 0x0120
_STATUS = 0x0900
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE request as its command set describes it (PS3.7 9.3.1.1)."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    originator_ae: str | None
    originator_message_id: int | None


def parse_store_request(raw: bytes, context_id: int) -> StoreRequest | None:
    """The C-STORE request in a command set, or None for anything else.

    A dozen fixed elements: parsed by hand because pydicom's decoder costs more
    than writing a 512 KB instance. Whatever does not parse cleanly goes to
    pynetdicom, which knows how to complain about it.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            return None
        values[element] = raw[offset : offset + length]
        offset += length
    try:
        if _US.unpack(values[_COMMAND_FIELD])[0] != _C_STORE_RQ:
            return None
        if _US.unpack(values.get(_DATA_SET_TYPE, b"\x01\x01"))[0] == _NO_DATA_SET:
            return None
        message_id = _US.unpack(values[_MESSAGE_ID])[0]
        sop_class = _text(values[_AFFECTED_SOP_CLASS])
        sop_instance = _text(values[_AFFECTED_SOP_INSTANCE])
        originator = values.get(_MOVE_ORIGINATOR_AE)
        originator_id = values.get(_MOVE_ORIGINATOR_ID)
        return StoreRequest(
            context_id=context_id,
            message_id=message_id,
            sop_class=sop_class,
            sop_instance=sop_instance,
            originator_ae=_text(originator) or None if originator is not None else None,
            originator_message_id=_US.unpack(originator_id)[0] if originator_id and len(originator_id) == 2 else None,
        )
    except (KeyError, struct.error, UnicodeDecodeError):
        return None


def store_response(request: StoreRequest, status: int) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), Implicit VR Little Endian."""
    elements = b"".join(
        [
            _implicit(_AFFECTED_SOP_CLASS, _uid(request.sop_class)),
            _implicit(_COMMAND_FIELD, _US.pack(_C_STORE_RSP)),
            _implicit(_MESSAGE_ID_RESPONDED, _US.pack(request.message_id)),
            _implicit(_DATA_SET_TYPE, _US.pack(_NO_DATA_SET)),
            _implicit(_STATUS, _US.pack(status)),
            _implicit(_AFFECTED_SOP_INSTANCE, _uid(request.sop_instance)),
        ]
    )
    return _implicit(0x0000, _U32.pack(len(elements))) + elements


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding one whole command set (PS3.8 9.3.5, E.2)."""
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item


def p_data_fragments(pdu: memoryview) -> list[tuple[int, memoryview]] | None:
    """The (context ID, message fragment) pairs of a P-DATA-TF PDU (PS3.8 9.3.5)."""
    fragments: list[tuple[int, memoryview]] = []
    offset, end = 6, len(pdu)
    while offset < end:
        if offset + 6 > end:
            return None
        length = PDU_LENGTH.unpack_from(pdu, offset)[0]
        if length < 2 or offset + 4 + length > end:
            return None
        fragments.append((pdu[offset + 4], pdu[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return fragments or None


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _text(value: bytes) -> str:
    return value.decode("ascii").strip(" \0")


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1).

    Encoded by hand for the same reason as the command set: pydicom's writer
    takes ~0.4 ms for these eight elements.
    """
    elements = b"".join(
        [
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _uid(sop_class)),
            _explicit(0x0003, b"UI", _uid(sop_instance)),
            _explicit(0x0010, b"UI", _uid(transfer_syntax)),
            _explicit(0x0012, b"UI", _uid(str(IMPLEMENTATION_CLASS_UID))),
            _explicit(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION)),
            *([_explicit(0x0016, b"AE", _padded(source_ae))] if source_ae else []),
        ]
    )
    group_length = _explicit(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii", "replace")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def _padded(value: str) -> bytes:
    encoded = value.encode("ascii", "replace")[:16]
    return encoded + b" " if len(encoded) % 2 else encoded
