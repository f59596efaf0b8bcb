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
`_read_p_data_directly`), the file lands in `incoming_dir`, and the response
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
import logging
import os
import select
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import UID, AllTransferSyntaxes, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from mi2b2.adapters.dicom.errors import ReceiverUnavailable
from mi2b2.adapters.dicom.files import InstanceHeader, UnreadableInstance, parse_instance_header, read_instance_header
from mi2b2.adapters.dicom.scu import LocalAE, _prompt_dul, _set_nodelay

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "InstanceSink",
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
_HEAD_BYTES = 64 * 1024
_MAX_ASSOCIATIONS = 64


@dataclass(frozen=True)
class ReceivedInstance:
    peer_ae: str  # calling AE of the association (the PACS, for C-MOVE); for C-GET the PACS's AE
    move_originator_ae: str | None  # (0000,1030) when present
    move_originator_message_id: int | None  # (0000,1031) when present
    path: Path  # temp file in incoming_dir: full Part 10 file (preamble, file meta, data set bytes as received)
    size: int
    header: InstanceHeader  # the few tags mi2b2 files by; pixel data never decoded


class InstanceSink(Protocol):
    def accept(self, instance: ReceivedInstance) -> int:
        """Return the C-STORE status to answer; ``os.replace`` the file away to keep it.

        Called on the association's network thread: must be thread-safe. An
        exception is answered 0xA700 (out of resources) and the file dropped.
        """
        ...


# --- the server --------------------------------------------------------------------------


class StoreServer:
    """A C-STORE SCP (and C-ECHO, for the PACS admin's tests) on `host`:`port`.

    Accepts associations from any calling AE: deciding what to keep is the
    sink's job, per instance, because only the instance says which request
    and project it belongs to.
    """

    def __init__(self, local: LocalAE, host: str, port: int, sink: InstanceSink, incoming_dir: Path) -> None:
        self.local = local
        self.host = host
        self._requested_port = port
        self.sink = sink
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
        # 0 = unlimited; a smaller limit than 128 KiB costs round trips on every instance.
        ae.maximum_pdu_size = self.local.max_pdu if self.local.max_pdu == 0 else max(self.local.max_pdu, 131072)
        ae.maximum_associations = _MAX_ASSOCIATIONS
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 120
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, _prefer_the_senders_transfer_syntax),
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
            receiver.discard()

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
        receiver = _StoreReceiver(assoc, self.sink, self.incoming_dir, peer_ae=lambda: _ae_title(assoc.requestor.ae_title))
        assoc._mi2b2_receiver = receiver  # type: ignore[attr-defined]
        with self._lock:
            self._receivers.add(receiver)

    def _on_close(self, event: evt.Event) -> None:
        receiver: _StoreReceiver | None = getattr(event.assoc, "_mi2b2_receiver", None)
        if receiver is None:
            return
        receiver.discard()  # an instance cut off mid-transfer leaves nothing behind
        with self._lock:
            self._receivers.discard(receiver)


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
        order = preferred.get(str(supported.abstract_syntax))
        if order:
            supported._transfer_syntax = order  # already validated UIDs: skip the setter's checks


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
        context.transfer_syntax = ACCEPTED_TRANSFER_SYNTAXES
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
    STORE = "store"  # writing a C-STORE data set to its temp file
    DRAIN = "drain"  # reading a data set we refuse (bad context, disk error) to its end


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
    size: int = 0
    head: bytearray = field(default_factory=bytearray)  # the file's first bytes, to read the header from
    status: int = STATUS_SUCCESS  # what to answer if the data set is refused unread


class _StoreReceiver:
    """Takes C-STORE requests off one association's P-DATA stream (see module doc).

    Installed by replacing the association's ``dimse.receive_primitive``, which
    pynetdicom's network thread calls with every P-DATA primitive. Command
    fragments are collected here; a complete command that is not a C-STORE
    request with a data set is replayed to pynetdicom's decoder together with
    the rest of its message, so C-ECHO, C-GET responses and so on behave as
    usual.
    """

    def __init__(
        self,
        assoc: Association,
        sink: InstanceSink,
        incoming_dir: Path,
        peer_ae: Callable[[], str],
        after_each: Callable[[], None] | None = None,
    ) -> None:
        self._assoc = assoc
        self._sink = sink
        self._incoming_dir = incoming_dir
        self._peer_ae = peer_ae
        self._after_each = after_each
        self._pass_on_to = assoc.dimse.receive_primitive
        self._command = bytearray()
        self._mode = _Mode.IDLE
        self._current: _Arrival | None = None
        # Held while the current temp file is written or dropped: discard() may
        # come from another thread, and a closed fd number gets reused.
        self._lock = threading.Lock()
        self._contexts: dict[int, PresentationContext] | None = None
        assoc.dimse.receive_primitive = self.receive  # type: ignore[method-assign]
        _read_p_data_directly(assoc, self._fragment, self._mid_data_set)

    def receive(self, primitive: P_DATA) -> None:
        """pynetdicom's entry point, for P-DATA that did not take the direct path."""
        for context_id, data in primitive.presentation_data_value_list:
            self._fragment(context_id, data)

    def _mid_data_set(self) -> bool:
        return self._mode is _Mode.STORE or self._mode is _Mode.DRAIN

    def discard(self) -> None:
        """Drop a partly received instance (association closed or aborted)."""
        with self._lock:
            arrival, self._current = self._current, None
            if arrival is not None:
                _drop(arrival)
            self._mode = _Mode.IDLE

    # -- the P-DATA stream

    def _fragment(self, context_id: int, data: bytes | memoryview) -> None:
        if self._mode is _Mode.PASS_ON:
            self._pass_on(context_id, data)
            return
        header = data[0]
        if header & 0x01:  # a command set fragment
            self._command += memoryview(data)[1:]
            if header & 0x02:
                self._command_complete(context_id)
            return
        if self._mode is _Mode.IDLE:  # a data set with no command: pynetdicom's problem
            self._pass_on(context_id, data)
            return
        if self._mode is _Mode.STORE:
            self._write(memoryview(data)[1:])
        if header & 0x02:  # the last data set fragment
            self._answer(self._finish())

    def _pass_on(self, context_id: int, data: bytes | memoryview) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, bytes(data)]]
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
            self._mode = _Mode.DRAIN
            return
        try:
            self._open(arrival, str(context.transfer_syntax[0]))
        except OSError as exc:
            LOG.error("cannot create a temp file in the incoming folder (%s); answered 0x%04X", _os_error(exc), 0xA700)
            arrival.status = STATUS_OUT_OF_RESOURCES
            self._mode = _Mode.DRAIN
            return
        self._mode = _Mode.STORE

    def _accepted_context(self, context_id: int) -> PresentationContext | None:
        # Fixed once the association is established; pynetdicom's property sorts a copy per call.
        if self._contexts is None:
            self._contexts = {int(cx.context_id or 0): cx for cx in self._assoc.accepted_contexts}
        return self._contexts.get(context_id)

    # -- the temp file

    def _open(self, arrival: _Arrival, transfer_syntax: str) -> None:
        fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".dcm", dir=self._incoming_dir)
        arrival.fd, arrival.path = fd, name
        self._write(memoryview(_file_meta(arrival.sop_class, arrival.sop_instance, transfer_syntax, self._peer_ae())))

    def _write(self, chunk: memoryview) -> None:
        with self._lock:
            arrival = self._current
            if arrival is None or arrival.fd < 0:
                return
            if len(arrival.head) < _HEAD_BYTES:
                arrival.head += chunk[: _HEAD_BYTES - len(arrival.head)]
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
            response.presentation_data_value_list = [[arrival.context_id, b"\x03" + command]]
            dul.send_pdu(response)
        if self._after_each is not None:
            try:
                self._after_each()
            except Exception as exc:  # must not take the network thread down
                LOG.error("polling for cancellation failed (%s)", type(exc).__name__)

    def _settle(self, arrival: _Arrival) -> int:
        """Read the header, ask the sink; the temp file is gone when this returns."""
        peer = self._peer_ae()
        path = arrival.path
        if path is None or arrival.status != STATUS_SUCCESS:
            return arrival.status
        try:
            try:
                # From the bytes just written; the file only when the fast path declines.
                header = parse_instance_header(arrival.head) or read_instance_header(Path(path))
            except UnreadableInstance as exc:
                LOG.warning("refused a C-STORE from %s (0x%04X): %s", peer, STATUS_CANNOT_UNDERSTAND, exc)
                return STATUS_CANNOT_UNDERSTAND
            except Exception as exc:  # pydicom on malformed data: anything, warnings turned errors included
                LOG.warning(
                    "refused a C-STORE from %s (0x%04X): its header cannot be read (%s)",
                    peer,
                    STATUS_CANNOT_UNDERSTAND,
                    type(exc).__name__,
                )
                return STATUS_CANNOT_UNDERSTAND
            if header.sop_instance_uid != arrival.sop_instance:
                LOG.warning(
                    "refused a C-STORE from %s (0x%04X): the data set's SOP Instance UID differs from the request's",
                    peer,
                    STATUS_CANNOT_UNDERSTAND,
                )
                return STATUS_CANNOT_UNDERSTAND
            instance = ReceivedInstance(
                peer_ae=peer,
                move_originator_ae=arrival.originator_ae,
                move_originator_message_id=arrival.originator_message_id,
                path=Path(path),
                size=arrival.size,
                header=header,
            )
            try:
                return int(self._sink.accept(instance))
            except Exception as exc:
                LOG.error(
                    "the instance sink failed on a C-STORE from %s (%s); answered 0x%04X",
                    peer,
                    type(exc).__name__,
                    STATUS_OUT_OF_RESOURCES,
                )
                return STATUS_OUT_OF_RESOURCES
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # unless the sink moved it away


def _read_p_data_directly(
    assoc: Association, deliver: Callable[[int, memoryview], None], mid_message: Callable[[], bool]
) -> None:
    """Hand P-DATA-TF PDUs of an established association straight to `deliver`.

    pynetdicom turns every PDU into an object, fires two events, queues it
    for its state machine, and turns it into a primitive whose fragments are
    copied again; for a P-DATA-TF in state Sta6 (established) all that ends
    in ``dimse.receive_primitive`` with no state change (PS3.8 DT-2). That
    was ~40% of the CPU time of receiving an instance. Here the PDU is read
    into one buffer and its fragments are passed on as views of it. Any other
    PDU, any other state, and every error take pynetdicom's own path
    (`_read_pdu_data`), which sees the socket exactly as before: the PDU type
    is only peeked at. Side effect: EVT_DATA_RECV and EVT_PDU_RECV do not fire
    for these PDUs (nothing in mi2b2 binds them).
    """
    dul = assoc.dul
    read_pdu = dul._read_pdu_data
    # One buffer per association, reused: its fragments are written out (or
    # copied) before the next PDU is read, and a fresh 128 KiB bytearray per
    # PDU costs an allocation and 32 page faults.
    buffer = bytearray(_INITIAL_PDU_BUFFER)

    def receive_into(raw: socket.socket, total: int) -> memoryview | None:
        nonlocal buffer
        if len(buffer) < total:
            buffer = bytearray(total)
        view = memoryview(buffer)[:total]
        received = 0
        while received < total:
            count = raw.recv_into(view[received:])
            if not count:
                return None
            received += count
        return view

    def read() -> None:
        sock = dul.socket
        raw = sock.socket if sock is not None else None
        if sock is None or raw is None or dul.state_machine.current_state != "Sta6":
            read_pdu()
            return
        if not read_one(raw, read_pdu):
            return
        # The rest of a data set follows at once: read it here rather than one
        # PDU per pass of pynetdicom's loop, as long as it keeps coming.
        for _ in range(_PDUS_PER_PASS):
            if not mid_message() or not select.select([raw], [], [], _NEXT_FRAGMENT_WAIT)[0]:
                return
            if not read_one(raw, None):
                return

    def read_one(raw: socket.socket, otherwise: Callable[[], None] | None) -> bool:
        """Read and deliver one P-DATA-TF PDU; False if there was none to read."""
        try:
            head = raw.recv(6, socket.MSG_PEEK)
        except OSError:
            if otherwise is not None:
                otherwise()  # which reports the broken connection its way
            return False
        if len(head) < 6 or head[0] != _P_DATA_TF:
            if otherwise is not None:
                otherwise()
            return False
        try:
            pdu = receive_into(raw, 6 + _PDU_LENGTH.unpack_from(head, 2)[0])
        except (OSError, TimeoutError):
            pdu = None
        if pdu is None:
            dul.event_queue.put("Evt17")  # transport connection closed
            return False
        fragments = _fragments(pdu)
        if fragments is None:
            dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom aborts
            return False
        for context_id, data in fragments:
            deliver(context_id, data)
        return True

    dul._read_pdu_data = read  # type: ignore[method-assign]


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
