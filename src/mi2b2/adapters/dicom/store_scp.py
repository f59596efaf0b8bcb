"""DICOM C-STORE receiver: the instances a PACS sends us, straight to disk.

A study reaches mi2b2 in C-STORE sub-operations: on associations the PACS
opens to `StoreServer` (C-MOVE), or on the association `retrieve.get_study`
opened (C-GET). Both end in `_StoreReceiver`, which writes the data set as
received - never decoded, never transcoded - behind a Part 10 preamble and
file meta header into a temp file in `incoming_dir`, reads the few header tags
mi2b2 files instances by, and asks the `InstanceSink` for the C-STORE status.
`incoming_dir` lies on the cache's filesystem so that a sink keeps a file with
one ``os.replace``; whatever the sink does, the temp file is gone before the
response goes out.

Why not pynetdicom's EVT_C_STORE handler: it hands over either the decoded
data set in memory, or (``_config.STORE_RECV_CHUNKED_DATASET``, a process-wide
switch) a NamedTemporaryFile in the system temp directory, flushed after every
fragment, with pynetdicom's implementation UID in its meta header; the handler
then runs on the association's reactor thread, which polls its queue every
1 ms, and the response is encoded through pydicom. Instead, per association
and nothing process-wide: C-STORE requests are taken off the P-DATA stream on
the network (DUL) thread that reads them (`_StoreReceiver`,
`_read_pdus_bounded`), the file lands in `incoming_dir`, and the response
goes out from that thread; every other DIMSE message still goes to pynetdicom.

Measured on this 2-core machine, 150 x 512 KB instances C-MOVEd by Orthanc
(median of 10, alternating with DCMTK storescp run with TCP_NODELAY=1):
stock pynetdicom handler 0.8-1.4 s; this receiver 0.46-0.65 s; storescp
0.24-0.30 s. What is left is Python: ~1.1 ms of network-thread CPU per
instance, plus the GIL shared with whatever else runs in the process.

Sinks are called from the network thread of each association, so concurrently
when several PACS (or several C-MOVEs) send at once: they must be thread-safe.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydicom.uid import UID, AllTransferSyntaxes, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from mi2b2.adapters.dicom.errors import ReceiverUnavailable
from mi2b2.adapters.dicom.files import (
    InstanceHeader,
    UnreadableInstance,
    header_from_file,
    parse_instance_header,
    read_instance_header,
)
from mi2b2.adapters.dicom.scu import LocalAE, _prompt_dul, _set_nodelay

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "InstanceSink",
    "Peer",
    "ReceiptGuard",
    "ReceiveLimits",
    "ReceivedInstance",
    "StoreServer",
]

LOG = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3) that the receiver itself answers.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # transient: the PACS may retry later
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

# Identifies mi2b2 as the writer of the received files' meta header.
IMPLEMENTATION_CLASS_UID: UID = generate_uid(entropy_srcs=["mi2b2 research imaging gateway"])
IMPLEMENTATION_VERSION = "MI2B2_0"

# Everything pydicom knows except JPIP-referenced pixel data, which is a URL
# into someone else's server rather than images we could cache.
_JPIP = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"})
ACCEPTED_TRANSFER_SYNTAXES: list[UID] = [ts for ts in AllTransferSyntaxes if ts not in _JPIP]
_ACCEPTED = frozenset(ACCEPTED_TRANSFER_SYNTAXES)

_VERIFICATION = UID("1.2.840.10008.1.1")
_TEMP_PREFIX = "incoming-"
_HEAD_BYTES = 64 * 1024  # an instance is judged from at most this much of its data set, held in memory
_MAX_ASSOCIATIONS = 64
_MAX_CONTROL_PDU = 1 << 20  # any PDU but P-DATA-TF (an A-ASSOCIATE-RQ with every context is ~200 KB)
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


def _guard_of(sink: InstanceSink) -> ReceiptGuard:
    return sink if isinstance(sink, ReceiptGuard) else _NoGuard()


# --- the server --------------------------------------------------------------------------


class StoreServer:
    """A C-STORE SCP (and C-ECHO, for the PACS admin's tests) on `host`:`port`.

    Which peers may send is the sink's decision when it is a `ReceiptGuard`
    (asked once per association, by AE title and address); what to keep is
    decided per instance, because only the instance says which request and
    project it belongs to. The server itself bounds what any peer can make it
    hold: associations per address, PDU length, instance size, and time.
    """

    def __init__(self, local: LocalAE, host: str, port: int, sink: InstanceSink, incoming_dir: Path,
                 limits: ReceiveLimits | None = None) -> None:
        self.local = local
        self.host = host
        self._requested_port = port
        self.sink = sink
        self.limits = limits or ReceiveLimits(max_pdu=local.max_pdu or ReceiveLimits.max_pdu)
        self.incoming_dir = Path(incoming_dir)
        self._server: ThreadedAssociationServer | None = None
        self._receivers: set[_StoreReceiver] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the one picked by the OS when started with port 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen on host:port in background threads; returns at once."""
        if self._server is not None:
            return
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.local.ae_title)
        # A smaller limit than 128 KiB costs round trips on every instance.
        ae.maximum_pdu_size = max(self.limits.max_pdu, 16384)
        ae.maximum_associations = _MAX_ASSOCIATIONS
        ae.acse_timeout = min(30, self.limits.network_timeout)
        ae.dimse_timeout = 60
        ae.network_timeout = self.limits.network_timeout
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_STORE, _refuse_unexpected_store),
        ]
        try:
            server = ae.start_server(
                (self.host, self._requested_port), block=False, evt_handlers=handlers, contexts=_scp_contexts()
            )
        except OSError as exc:
            raise ReceiverUnavailable(self.local.ae_title, self.host, self._requested_port, exc) from None
        assert server is not None
        self._server = server
        LOG.info("DICOM receiver %s listening on %s:%d", self.local.ae_title, self.host, self.port)

    def stop(self) -> None:
        """Stop listening, abort associations still open and drop their partial files."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for assoc in list(server.active_associations):
            assoc.abort()
        for assoc in list(server.active_associations):
            assoc.join(timeout=5)
        with self._lock:
            receivers, self._receivers = list(self._receivers), set()
        for receiver in receivers:
            receiver.close()

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, event: evt.Event) -> None:
        # Runs before the association's threads start: nothing has been read yet.
        assoc = event.assoc
        _set_nodelay(event)
        _prompt_dul(assoc)
        peer_address = getattr(event, "address", None)  # set on EVT_CONN_OPEN only, so Event does not declare it
        address = str(peer_address[0]) if peer_address else ""
        receiver = _StoreReceiver(assoc, self.sink, self.incoming_dir, peer=_peer_of(assoc, address),
                                  limits=self.limits)
        assoc._mi2b2_receiver = receiver  # type: ignore[attr-defined]  # carried by the association for its later events
        with self._lock:
            self._receivers.add(receiver)

    def _on_requested(self, event: evt.Event) -> None:
        """The A-ASSOCIATE-RQ is read: refuse a peer over its cap or not allowed, before negotiating."""
        assoc = event.assoc
        receiver: _StoreReceiver | None = getattr(assoc, "_mi2b2_receiver", None)
        if receiver is not None and self._open_from(receiver.peer().address) > self.limits.max_associations_per_peer:
            peer = receiver.peer()
            LOG.warning("refused an association from %s (%s): it already holds %d, the most one address may",
                        peer.address, peer.ae_title, self.limits.max_associations_per_peer)
            _reject(assoc, 0x02, 0x03, 0x02)  # transient, local limit exceeded
            return
        if receiver is not None:
            reason = receiver.guard.admit(receiver.peer())
            if reason is not None:
                LOG.warning("refused an association from %s: %s", receiver.peer().address, reason)
                _reject(assoc, 0x01, 0x01, 0x03)  # permanent, calling AE title not recognised
                return
        _prefer_the_senders_transfer_syntax(event)

    def _open_from(self, address: str) -> int:
        """Associations from `address` whose threads still run (this one included): never drifts."""
        server = self._server
        if server is None:
            return 0
        return sum(1 for assoc in server.active_associations if assoc.requestor.address == address)

    def _on_close(self, event: evt.Event) -> None:
        receiver: _StoreReceiver | None = getattr(event.assoc, "_mi2b2_receiver", None)
        if receiver is None:
            return
        with self._lock:
            self._receivers.discard(receiver)
        receiver.close()  # an instance cut off mid-transfer leaves nothing behind


def _peer_of(assoc: Association, address: str) -> Callable[[], Peer]:
    """The association's peer; its AE title is known once the A-ASSOCIATE-RQ is read."""
    number = next(_association_ids)

    def peer() -> Peer:
        # requestor.ae_title is set only once pynetdicom negotiates, after EVT_REQUESTED.
        request = assoc.requestor.primitive
        calling = request.calling_ae_title if request is not None else assoc.requestor.ae_title
        return Peer(_ae_title(calling), address, number)

    return peer


def outbound_peer(ae_title: str, host: str) -> Peer:
    """The PACS at the other end of an association we opened (C-GET)."""
    return Peer(ae_title.strip(), host, next(_association_ids))


def _reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    # As pynetdicom rejects by itself: the A-ASSOCIATE-RJ goes out, then the
    # association waits for the peer to close (at most its ARTIM timeout).
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _prefer_the_senders_transfer_syntax(event: evt.Event) -> None:
    """Accept, per presentation context, the first transfer syntax the sender proposed.

    pynetdicom picks the first of the *acceptor's* list that the requestor
    also proposed; with ours that would be Implicit VR for a PACS proposing
    [Explicit, Big Endian, Implicit] (dcmqrscp), which then converts every
    instance, and an uncompressed syntax where a PACS proposes its stored
    JPEG first. A sender lists first what it holds, so for this association
    our contexts are reordered to the sender's order (runs after the
    A-ASSOCIATE-RQ is read, before the contexts are negotiated).
    """
    assoc = event.assoc
    preferred: dict[str, list[UID]] = {}
    for requested in assoc.requestor.requested_contexts:
        order = preferred.setdefault(str(requested.abstract_syntax), [])
        order.extend(ts for ts in requested.transfer_syntax if ts in _ACCEPTED and ts not in order)
    for supported in assoc.acceptor.supported_contexts:
        sender_order = preferred.get(str(supported.abstract_syntax))
        if sender_order:
            supported._transfer_syntax = sender_order  # already validated UIDs: skip the setter's checks


def _refuse_unexpected_store(event: evt.Event) -> int:
    """pynetdicom's own C-STORE path: only reached if `_StoreReceiver` passed a request on.

    That happens only for a command set it could not parse, which pynetdicom
    then could; refusing beats pynetdicom's default of answering Success for
    an instance nobody stored.
    """
    LOG.error("C-STORE from %s reached the fallback handler; answered 0x%04X", _ae_title(event.assoc.requestor.ae_title), 0xC001)
    return 0xC001


class _SharedUidContext(PresentationContext):
    """A presentation context that deep-copies cheaply.

    pynetdicom deep-copies the server's supported contexts for every incoming
    association; with every storage class x every transfer syntax that is
    ~6,600 UID objects, copied one by one through __reduce_ex__: 100 ms per
    association, half of what storescp needs for a whole 150-instance study.
    UIDs are immutable strings, so the copies can share them.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUidContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def _scp_contexts() -> list[PresentationContext]:
    contexts: list[PresentationContext] = []
    for abstract in [_VERIFICATION, *(cx.abstract_syntax for cx in AllStoragePresentationContexts)]:
        context = _SharedUidContext()
        context.abstract_syntax = abstract
        context.transfer_syntax = list(ACCEPTED_TRANSFER_SYNTAXES)  # the setter copies it anyway
        contexts.append(context)
    return contexts


def _ae_title(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


# --- receiving one association's C-STOREs ------------------------------------------------


class _Mode(Enum):
    IDLE = "idle"  # between messages, or collecting a command set
    PASS_ON = "pass-on"  # the message is not a C-STORE request: pynetdicom decodes it
    HEAD = "head"  # holding the first bytes of a data set in memory until its header can be judged
    STORE = "store"  # writing a C-STORE data set to its temp file
    DRAIN = "drain"  # reading a data set we refuse (judged, too large, bad context, disk error) to its end


@dataclass
class _Arrival:
    """One C-STORE request as its command set described it."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    originator_ae: str | None
    originator_message_id: int | None
    path: str | None = None  # the temp file
    fd: int = -1
    size: int = 0  # bytes in the temp file
    received: int = 0  # bytes of the data set received so far
    meta: bytes = b""  # the file meta header the temp file starts with
    head: bytearray = field(default_factory=bytearray)  # the data set's first bytes, judged before any is written
    header: InstanceHeader | None = None
    status: int = STATUS_SUCCESS  # what to answer if the data set is refused unread


class _StoreReceiver:
    """Takes C-STORE requests off one association's P-DATA stream (see module doc).

    Installed by replacing the association's ``dimse.receive_primitive``, which
    pynetdicom's network thread calls with every P-DATA primitive. Command
    fragments are collected here; a complete command that is not a C-STORE
    request with a data set is replayed to pynetdicom's decoder together with
    the rest of its message, so C-ECHO, C-GET responses and so on behave as
    usual.

    A data set's first fragments are held in memory until its header tags can
    be read; the guard judges the instance from them, and only an instance it
    lets in gets a temp file. A refused one is read to its end and dropped: not
    a byte of it reaches the disk. (A header that cannot be read from the first
    64 KiB - deflated, big endian - is written and judged once complete, as
    before; refused, its file is removed before the answer goes out.)
    """

    def __init__(
        self,
        assoc: Association,
        sink: InstanceSink,
        incoming_dir: Path,
        peer: Callable[[], Peer],
        after_each: Callable[[], None] | None = None,
        limits: ReceiveLimits | None = None,
    ) -> None:
        self._assoc = assoc
        self._sink = sink
        self.guard = _guard_of(sink)
        self._incoming_dir = incoming_dir
        self.peer = peer
        self.limits = limits or ReceiveLimits()
        self._after_each = after_each
        self._pass_on_to = assoc.dimse.receive_primitive
        self._command = bytearray()
        self._mode = _Mode.IDLE
        self._current: _Arrival | None = None
        self._closed = False
        # Held while the current temp file is written or dropped: discard() may
        # come from another thread, and a closed fd number gets reused.
        self._lock = threading.Lock()
        self._contexts: dict[int, PresentationContext] | None = None
        assoc.dimse.receive_primitive = self.receive  # type: ignore[method-assign]  # this association's P-DATA comes here
        _read_pdus_bounded(assoc, self._fragment, self._mid_data_set, self.limits, on_release=self._ended)

    def receive(self, primitive: P_DATA) -> None:
        """pynetdicom's entry point, for P-DATA that did not take the direct path."""
        for context_id, data in primitive.presentation_data_value_list:
            self._fragment(context_id, data)

    def _mid_data_set(self) -> bool:
        return self._mode in (_Mode.HEAD, _Mode.STORE, _Mode.DRAIN)

    def discard(self) -> None:
        """Drop a partly received instance (association closed or aborted)."""
        with self._lock:
            arrival, self._current = self._current, None
            if arrival is not None:
                _drop(arrival)
            self._mode = _Mode.IDLE

    def close(self) -> None:
        """The association is over: drop what is partial, and tell the guard (once)."""
        self.discard()
        self._ended()

    def _ended(self) -> None:
        # On A-RELEASE-RQ (before the answer: what was refused is recorded before the peer
        # hears the association is over), or when the connection closes, whichever is first.
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.guard.association_ended(self.peer())
        except Exception as exc:  # must not take the network thread down
            LOG.error("recording the end of an association failed (%s)", type(exc).__name__)

    # -- the P-DATA stream

    def _fragment(self, context_id: int, data: bytes | memoryview) -> None:
        if self._mode is _Mode.PASS_ON:
            self._pass_on(context_id, data)
            return
        if not len(data):
            return  # an empty fragment carries no header byte: nothing to act on
        header = data[0]
        if header & 0x01:  # a command set fragment
            if len(self._command) + len(data) > _MAX_COMMAND:
                self._command.clear()
                self._pass_on(context_id, b"\x03")  # an impossible command: pynetdicom refuses it
                return
            self._command += memoryview(data)[1:]
            if header & 0x02:
                self._command_complete(context_id)
            return
        if self._mode is _Mode.IDLE:  # a data set with no command: pynetdicom's problem
            self._pass_on(context_id, data)
            return
        last = bool(header & 0x02)
        chunk = memoryview(data)[1:]
        if self._mode is not _Mode.DRAIN:
            self._take(chunk, last)
        if last:  # the last data set fragment
            self._answer(self._finish())

    def _pass_on(self, context_id: int, data: bytes | memoryview) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, bytes(data)]]  # type: ignore[list-item]  # setter demands lists
        self._pass_on_to(primitive)
        # pynetdicom clears its partial message once it has decoded a whole one.
        self._mode = _Mode.IDLE if self._assoc.dimse.message is None else _Mode.PASS_ON

    def _command_complete(self, context_id: int) -> None:
        raw = bytes(self._command)
        self._command.clear()
        arrival = _parse_store_request(raw, context_id)
        if arrival is None:
            # 0x03: command set, last fragment
            self._pass_on(context_id, b"\x03" + raw)
            return
        self._current = arrival
        context = self._accepted_context(context_id)
        if context is None or context.abstract_syntax != arrival.sop_class:
            arrival.status = STATUS_SOP_CLASS_NOT_SUPPORTED
            self._refused(None, arrival.status, "SOP class not negotiated on the presentation context it came on")
            self._mode = _Mode.DRAIN
            return
        arrival.meta = _file_meta(arrival.sop_class, arrival.sop_instance, str(context.transfer_syntax[0]),
                                  self.peer().ae_title)
        self._mode = _Mode.HEAD

    def _accepted_context(self, context_id: int) -> PresentationContext | None:
        # Fixed once the association is established; pynetdicom's property sorts a copy per call.
        if self._contexts is None:
            self._contexts = {int(cx.context_id or 0): cx for cx in self._assoc.accepted_contexts}
        return self._contexts.get(context_id)

    # -- judging the header, then the temp file

    def _take(self, chunk: memoryview, last: bool) -> None:
        arrival = self._current
        if arrival is None:
            return
        arrival.received += len(chunk)
        if arrival.received > self.limits.max_instance_bytes:
            self._refuse_unread(arrival, STATUS_OUT_OF_RESOURCES,
                                f"larger than the receiver's maximum instance size ({self.limits.max_instance_bytes} bytes)")
            return
        if self._mode is _Mode.STORE:
            self._write(chunk)
            return
        arrival.head += chunk
        if len(arrival.head) < _HEAD_BYTES and not last:
            header = parse_instance_header(arrival.meta + arrival.head)
            if header is None:
                return  # not enough yet
        else:
            header = self._header_at_last(arrival, last)
            if header is None and arrival.status != STATUS_SUCCESS:
                return
        if header is not None:
            if header.sop_instance_uid != arrival.sop_instance:
                self._refuse_unread(arrival, STATUS_CANNOT_UNDERSTAND,
                                    "the data set's SOP Instance UID differs from the request's", header)
                return
            arrival.header = header
            try:
                status = self.guard.judge(self.peer(), header, arrival.originator_ae, arrival.originator_message_id)
            except Exception as exc:
                LOG.error("judging a C-STORE failed (%s); answered 0x%04X", type(exc).__name__, STATUS_OUT_OF_RESOURCES)
                status = STATUS_OUT_OF_RESOURCES
            if status is not None:
                arrival.status = int(status)
                self._drain(arrival)
                return
        self._spill(arrival)

    def _header_at_last(self, arrival: _Arrival, last: bool) -> InstanceHeader | None:
        """All the data set is here, or 64 KiB of it: read the header the slow way if need be."""
        data = arrival.meta + arrival.head
        header = parse_instance_header(data)
        if header is not None or not last:
            return header  # not last: judged from the file once it is complete
        try:
            return _header_from_bytes(data)
        except Exception as exc:  # pydicom on malformed data: anything
            reason = str(exc) if isinstance(exc, UnreadableInstance) else f"its header cannot be read ({type(exc).__name__})"
            self._refuse_unread(arrival, STATUS_CANNOT_UNDERSTAND, reason)
            return None

    def _spill(self, arrival: _Arrival) -> None:
        """The instance may come in: its temp file gets what was held in memory, then the rest."""
        try:
            with self._lock:
                if self._current is not arrival:
                    return  # discarded meanwhile: the association is going away
                fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".dcm", dir=self._incoming_dir)
                arrival.fd, arrival.path = fd, name
        except OSError as exc:
            LOG.error("cannot create a temp file in the incoming folder (%s); answered 0x%04X", _os_error(exc), 0xA700)
            arrival.status = STATUS_OUT_OF_RESOURCES
            self._drain(arrival)
            return
        self._mode = _Mode.STORE
        head, arrival.head = arrival.meta + arrival.head, bytearray()
        self._write(memoryview(head))

    def _refuse_unread(self, arrival: _Arrival, status: int, reason: str, header: InstanceHeader | None = None) -> None:
        arrival.status = status
        self._refused(header or arrival.header, status, reason)
        self._drain(arrival)

    def _refused(self, header: InstanceHeader | None, status: int, reason: str) -> None:
        peer = self.peer()
        LOG.warning("refused a C-STORE from %s (0x%04X): %s", peer.ae_title, status, reason)
        try:
            self.guard.refused(peer, header, status, reason)
        except Exception as exc:  # must not take the network thread down
            LOG.error("recording a refused C-STORE failed (%s)", type(exc).__name__)

    def _drain(self, arrival: _Arrival) -> None:
        with self._lock:
            _drop(arrival)
            arrival.head = bytearray()
            self._mode = _Mode.DRAIN

    def _write(self, chunk: memoryview) -> None:
        with self._lock:
            arrival = self._current
            if arrival is None or arrival.fd < 0:
                return
            try:
                while chunk:
                    written = os.write(arrival.fd, chunk)
                    chunk = chunk[written:]
                    arrival.size += written
            except OSError as exc:
                LOG.error("cannot write a received instance to the incoming folder (%s); answered 0x%04X", _os_error(exc), 0xA700)
                arrival.status = STATUS_OUT_OF_RESOURCES
                _drop(arrival)
                self._mode = _Mode.DRAIN

    def _finish(self) -> _Arrival | None:
        with self._lock:
            arrival, self._current = self._current, None
            self._mode = _Mode.IDLE
            if arrival is not None and arrival.fd >= 0:
                try:
                    os.close(arrival.fd)
                except OSError as exc:  # NFS and friends report write errors here
                    LOG.error("cannot close a received instance (%s)", _os_error(exc))
                    arrival.status = STATUS_OUT_OF_RESOURCES
                    arrival.fd = -1
                    _drop(arrival)
                arrival.fd = -1
            return arrival

    # -- deciding and answering

    def _answer(self, arrival: _Arrival | None) -> None:
        if arrival is None:  # discarded meanwhile: the association is going away
            return
        status = self._settle(arrival)
        # Straight to the network thread's send queue (which this thread serves
        # next): pynetdicom's send_msg would encode these six elements through
        # pydicom, twice, ~0.5 ms per instance.
        command = _store_response(arrival, status)
        dul = self._assoc.dul
        if dul.state_machine.current_state == "Sta6" and dul.socket is not None:
            # We are the network thread, established: sending the P-DATA-TF
            # ourselves is what its state machine would do (DT-1), one pass later.
            dul.socket.send(_p_data_tf(arrival.context_id, command))
        else:
            response = P_DATA()
            command_pdv = [arrival.context_id, b"\x03" + command]
            response.presentation_data_value_list = [command_pdv]  # type: ignore[list-item]  # setter demands lists
            dul.send_pdu(response)
        if self._after_each is not None:
            try:
                self._after_each()
            except Exception as exc:  # must not take the network thread down
                LOG.error("polling for cancellation failed (%s)", type(exc).__name__)

    def _settle(self, arrival: _Arrival) -> int:
        """Read the header if it was not judged yet, ask the sink; the temp file is gone when this returns."""
        peer = self.peer()
        path = arrival.path
        if path is None or arrival.status != STATUS_SUCCESS:
            return arrival.status
        try:
            header = arrival.header
            if header is None:
                try:
                    header = read_instance_header(Path(path))
                except Exception as exc:  # pydicom on malformed data: anything, warnings turned errors included
                    reason = str(exc) if isinstance(exc, UnreadableInstance) else \
                        f"its header cannot be read ({type(exc).__name__})"
                    self._refused(None, STATUS_CANNOT_UNDERSTAND, reason)
                    return STATUS_CANNOT_UNDERSTAND
                if header.sop_instance_uid != arrival.sop_instance:
                    self._refused(header, STATUS_CANNOT_UNDERSTAND,
                                  "the data set's SOP Instance UID differs from the request's")
                    return STATUS_CANNOT_UNDERSTAND
                status = self.guard.judge(peer, header, arrival.originator_ae, arrival.originator_message_id)
                if status is not None:
                    return int(status)
            instance = ReceivedInstance(
                peer_ae=peer.ae_title,
                move_originator_ae=arrival.originator_ae,
                move_originator_message_id=arrival.originator_message_id,
                path=Path(path),
                size=arrival.size,
                header=header,
                peer=peer,
            )
            try:
                return int(self._sink.accept(instance))
            except Exception as exc:
                LOG.error(
                    "the instance sink failed on a C-STORE from %s (%s); answered 0x%04X",
                    peer.ae_title,
                    type(exc).__name__,
                    STATUS_OUT_OF_RESOURCES,
                )
                return STATUS_OUT_OF_RESOURCES
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # unless the sink moved it away


def _header_from_bytes(data: bytes) -> InstanceHeader:
    """The header of a whole Part 10 file held in memory, through pydicom."""
    return header_from_file(io.BytesIO(data), "the instance")


def _read_pdus_bounded(
    assoc: Association, deliver: Callable[[int, memoryview], None], mid_message: Callable[[], bool],
    limits: ReceiveLimits, on_release: Callable[[], None] = lambda: None,
) -> None:
    """Read every PDU of the association here, bounded in length and time.

    pynetdicom reads a PDU as long as its header says (4 GiB, if a peer says
    so) for as long as the peer takes. Here: a P-DATA-TF may be at most the
    maximum PDU we advertised, any other PDU 1 MiB; each must arrive whole
    within the network timeout; otherwise the association is aborted. A
    PDU's buffer grows as its bytes arrive, never to a claimed length.

    A P-DATA-TF of an established association goes straight to `deliver`:
    pynetdicom turns every PDU into an object, fires two events, queues it
    for its state machine, and turns it into a primitive whose fragments are
    copied again; for a P-DATA-TF in state Sta6 all that ends in
    ``dimse.receive_primitive`` with no state change (PS3.8 DT-2). That was
    ~40% of the CPU time of receiving an instance. Every other PDU is decoded
    and queued for pynetdicom's state machine exactly as its own reader does.
    Side effect: EVT_DATA_RECV and EVT_PDU_RECV do not fire for the direct
    PDUs (nothing in mi2b2 binds them).
    """
    dul = assoc.dul
    read_pdu = dul._read_pdu_data
    # One buffer per association, reused: its fragments are written out (or
    # copied) before the next PDU is read, and a fresh 128 KiB bytearray per
    # PDU costs an allocation and 32 page faults.
    buffer = bytearray(_INITIAL_PDU_BUFFER)

    def receive_into(raw: socket.socket, total: int, deadline: float, received: int = 0) -> memoryview | None:
        """buffer[:total] filled from the socket (from `received` on), or None if closed or too slow."""
        nonlocal buffer
        while received < total:
            if received == len(buffer):
                # Grown as bytes arrive: at most twice what the peer really sent.
                buffer.extend(bytes(min(total - received, max(len(buffer), _INITIAL_PDU_BUFFER))))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            raw.settimeout(remaining)
            with memoryview(buffer) as view:
                count = raw.recv_into(view[received : min(total, len(buffer))])
            if not count:
                return None
            received += count
        return memoryview(buffer)[:total]

    def read() -> None:
        sock = dul.socket
        raw = sock.socket if sock is not None else None
        if sock is None or raw is None:
            read_pdu()  # which reports the missing connection its way
            return
        state = dul.state_machine.current_state
        if state == "Sta13":  # we aborted or released: whatever still comes is dropped unread
            _drain_socket(raw, dul, limits.network_timeout)
            return
        if not read_one(raw) or state != "Sta6":
            return
        # The rest of a data set follows at once: read it here rather than one
        # PDU per pass of pynetdicom's loop, as long as it keeps coming.
        for _ in range(_PDUS_PER_PASS):
            if not mid_message() or dul.state_machine.current_state != "Sta6":
                return
            if not select.select([raw], [], [], _NEXT_FRAGMENT_WAIT)[0]:
                return
            if not read_one(raw):
                return

    def read_one(raw: socket.socket) -> bool:
        """Read one PDU and deliver it (P-DATA, established) or queue it; False when the association ends."""
        deadline = time.monotonic() + limits.network_timeout
        pdu: memoryview | None = None
        try:
            head = receive_into(raw, 6, deadline)
            if head is None:
                dul.event_queue.put("Evt17")  # closed, or too slow: transport connection closed
                return False
            pdu_type, length = head[0], _PDU_LENGTH.unpack_from(head, 2)[0]
            head.release()
            if pdu_type not in _PDU_TYPES or length > (limits.max_pdu if pdu_type == _P_DATA_TF else _MAX_CONTROL_PDU):
                LOG.warning("aborted an association: a PDU of type 0x%02X claiming %d bytes", pdu_type, length)
                dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts
                return False
            pdu = receive_into(raw, 6 + length, deadline, received=6)
        except (OSError, TimeoutError, ValueError, BufferError):
            pdu = None
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(limits.network_timeout)
        if pdu is None:
            dul.event_queue.put("Evt17")
            return False
        if pdu_type == _P_DATA_TF and dul.state_machine.current_state == "Sta6":
            fragments = _fragments(pdu)
            if fragments is None:
                dul.event_queue.put("Evt19")
                return False
            for context_id, data in fragments:
                deliver(context_id, data)
            return True
        if pdu_type == _A_RELEASE_RQ:
            on_release()
        try:
            decoded, event = dul._decode_pdu(bytearray(pdu))
        except Exception as exc:
            LOG.warning("aborted an association: undecodable PDU of type 0x%02X (%s)", pdu_type, type(exc).__name__)
            dul.event_queue.put("Evt19")
            return False
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)
        return True

    dul._read_pdu_data = read  # type: ignore[method-assign]  # patches this association's DUL only


def _drain_socket(raw: socket.socket, dul: Any, timeout: float) -> None:
    try:
        raw.settimeout(0)
        if not raw.recv(65536):
            dul.event_queue.put("Evt17")
    except BlockingIOError:
        pass
    except OSError:
        dul.event_queue.put("Evt17")
    finally:
        with contextlib.suppress(OSError):
            raw.settimeout(timeout)


def _fragments(pdu: memoryview) -> list[tuple[int, memoryview]] | None:
    """The (context ID, message fragment) pairs of a P-DATA-TF PDU (PS3.8 9.3.5)."""
    fragments: list[tuple[int, memoryview]] = []
    offset, end = 6, len(pdu)
    while offset < end:
        if offset + 6 > end:
            return None
        length = _PDU_LENGTH.unpack_from(pdu, offset)[0]
        if length < 2 or offset + 4 + length > end:
            return None
        fragments.append((pdu[offset + 4], pdu[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return fragments or None


def _drop(arrival: _Arrival) -> None:
    if arrival.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(arrival.fd)
        arrival.fd = -1
    if arrival.path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(arrival.path)
        arrival.path = None


def _os_error(exc: OSError) -> str:
    # The errno name says what is wrong (ENOSPC, EACCES) without the file name.
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


# --- encoding ----------------------------------------------------------------------------

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
_P_DATA_TF = 0x04
_A_RELEASE_RQ = 0x05
_PDU_TYPES = frozenset(range(0x01, 0x08))
_MAX_COMMAND = 64 * 1024  # a command set is a dozen short elements
_PDU_LENGTH = struct.Struct(">I")
_INITIAL_PDU_BUFFER = 131072 + 6
_PDUS_PER_PASS = 64  # then pynetdicom's loop gets a turn (timers, aborts), mid data set or not
_NEXT_FRAGMENT_WAIT = 0.05  # seconds; a sender that pauses longer goes back to the normal loop
_US = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _parse_store_request(raw: bytes, context_id: int) -> _Arrival | None:
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
        return _Arrival(
            context_id=context_id,
            message_id=message_id,
            sop_class=sop_class,
            sop_instance=sop_instance,
            originator_ae=_text(originator) or None if originator is not None else None,
            originator_message_id=_US.unpack(originator_id)[0] if originator_id and len(originator_id) == 2 else None,
        )
    except (KeyError, struct.error, UnicodeDecodeError):
        return None


def _store_response(arrival: _Arrival, status: int) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), Implicit VR Little Endian."""
    elements = b"".join(
        [
            _implicit(_AFFECTED_SOP_CLASS, _uid(arrival.sop_class)),
            _implicit(_COMMAND_FIELD, _US.pack(_C_STORE_RSP)),
            _implicit(_MESSAGE_ID_RESPONDED, _US.pack(arrival.message_id)),
            _implicit(_DATA_SET_TYPE, _US.pack(_NO_DATA_SET)),
            _implicit(_STATUS, _US.pack(status)),
            _implicit(_AFFECTED_SOP_INSTANCE, _uid(arrival.sop_instance)),
        ]
    )
    return _implicit(0x0000, _U32.pack(len(elements))) + elements


def _p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding one whole command set (PS3.8 9.3.5, E.2)."""
    item = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", _P_DATA_TF, 0, len(item)) + item


def _implicit(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _text(value: bytes) -> str:
    return value.decode("ascii").strip(" \0")


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
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
