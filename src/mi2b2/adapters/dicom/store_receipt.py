"""What the C-STORE receiver hands over and asks: received instances, sinks, guards, limits.

The receiver (`store_scp.StoreServer` for C-MOVE, `retrieve.get_study` for
C-GET, both through `store_receiver.StoreReceiver`) writes each instance to a
temp file and asks an `InstanceSink` for the C-STORE status; a sink that is
also a `ReceiptGuard` is asked earlier, per association and per header.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from mi2b2.adapters.dicom.files import InstanceHeader

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "InstanceSink",
    "Peer",
    "ProxyRefusals",
    "ReceiptGuard",
    "ReceiveLimits",
    "ReceivedInstance",
    "TlsRefusals",
    "ae_title_text",
    "guard_of",
    "next_association_number",
    "outbound_peer",
]

# C-STORE statuses (PS3.4 B.2.3) that the receiver itself answers.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # transient: the PACS may retry later
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

_association_ids = itertools.count(1)


@dataclass(frozen=True)
class ReceiveLimits:
    """What one peer may make the receiver hold (see config.DicomConfig)."""

    max_pdu: int = 1024 * 1024  # advertised; a longer P-DATA-TF aborts the association
    max_instance_bytes: int = 2 * 1024**3
    max_associations_per_peer: int = 8
    network_timeout: float = 60.0  # silence, and the time one PDU may take to arrive


@dataclass(frozen=True)
class Peer:
    """The other end of one association."""

    ae_title: str
    address: str
    association: int  # unique in this process: refusals are summed up per association


@dataclass(frozen=True)
class ReceivedInstance:
    peer_ae: str  # calling AE of the association (the PACS, for C-MOVE); for C-GET the PACS's AE
    move_originator_ae: str | None  # (0000,1030) when present
    move_originator_message_id: int | None  # (0000,1031) when present
    path: Path  # temp file in incoming_dir: full Part 10 file (preamble, file meta, data set bytes as received)
    size: int
    header: InstanceHeader  # the few tags mi2b2 files by; pixel data never decoded
    peer: Peer | None = None


class InstanceSink(Protocol):
    def accept(self, instance: ReceivedInstance) -> int:
        """Return the C-STORE status to answer; ``os.replace`` the file away to keep it.

        Called on the association's network thread: must be thread-safe. An
        exception is answered 0xA700 (out of resources) and the file dropped.
        """
        ...


@runtime_checkable
class ReceiptGuard(Protocol):
    """What a sink may also decide, earlier than `accept` (all on network threads).

    A sink that implements these gets asked before anything is written: the
    association when it is requested, each instance from its header alone.
    """

    def admit(self, peer: Peer) -> str | None:
        """None to accept an association from this peer, else the reason it is refused (the guard audits it)."""
        ...

    def judge(self, peer: Peer, header: InstanceHeader, move_originator_ae: str | None,
              move_originator_message_id: int | None = None) -> int | None:
        """From the header, before a byte is written: a status to refuse the instance with, or None.

        The move originator's AE title and message id name the C-MOVE the instance was sent for."""
        ...

    def refused(self, peer: Peer, header: InstanceHeader | None, status: int, reason: str) -> None:
        """The receiver refused an instance itself (too large, unreadable, lying about its UID)."""
        ...

    def association_ended(self, peer: Peer) -> None:
        """The association is gone: what was refused on it can be recorded once."""
        ...


@runtime_checkable
class TlsRefusals(Protocol):
    """A sink that also hears of senders refused in the TLS handshake (on the connection's thread)."""

    def tls_refused(self, address: str, reason: str) -> None:
        """Before any DICOM: no AE title is known, only the address and what was wrong (audit it)."""
        ...


@runtime_checkable
class ProxyRefusals(Protocol):
    """A sink that also hears of connections refused for their PROXY header (on the connection's thread)."""

    def proxy_refused(self, address: str, reason: str) -> None:
        """Before any DICOM: a balancer without a valid header, or a header from elsewhere (audit it)."""
        ...


class _NoGuard:
    def admit(self, peer: Peer) -> str | None:
        return None

    def judge(self, peer: Peer, header: InstanceHeader, move_originator_ae: str | None,
              move_originator_message_id: int | None = None) -> int | None:
        return None

    def refused(self, peer: Peer, header: InstanceHeader | None, status: int, reason: str) -> None:
        return None

    def association_ended(self, peer: Peer) -> None:
        return None


def guard_of(sink: InstanceSink) -> ReceiptGuard:
    return sink if isinstance(sink, ReceiptGuard) else _NoGuard()


def next_association_number() -> int:
    """A number unique in this process, to tell associations apart (`Peer.association`)."""
    return next(_association_ids)


def outbound_peer(ae_title: str, host: str) -> Peer:
    """The PACS at the other end of an association we opened (C-GET)."""
    return Peer(ae_title.strip(), host, next_association_number())


def ae_title_text(value: object) -> str:
    """An AE title as pynetdicom gives it (str or bytes, padded) as plain text."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()
