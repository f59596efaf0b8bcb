"""Receiving one association's C-STOREs: straight from the P-DATA stream to a temp file.

Both ways a study reaches mi2b2 end here: the associations a PACS opens to
`store_scp.StoreServer` (C-MOVE), and the association `retrieve.get_study`
opened (C-GET). `StoreReceiver` writes each data set as received - never
decoded, never transcoded - behind a Part 10 preamble and file meta header
into a temp file in `incoming_dir`, reads the few header tags mi2b2 files
instances by, and asks the `InstanceSink` for the C-STORE status, all on the
association's network thread (see `store_scp` for why and what it gains).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from mi2b2.adapters.dicom.files import (
    InstanceHeader,
    UnreadableInstance,
    header_from_file,
    parse_instance_header,
    read_instance_header,
)
from mi2b2.adapters.dicom.netdicom_internals import DimseTap, NetworkLayer
from mi2b2.adapters.dicom.pdu_reader import read_pdus_bounded
from mi2b2.adapters.dicom.store_receipt import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    InstanceSink,
    Peer,
    ReceivedInstance,
    ReceiveLimits,
    ae_title_text,
    guard_of,
)
from mi2b2.adapters.dicom.store_wire import StoreRequest, file_meta, p_data_tf, parse_store_request, store_response

__all__ = ["StoreReceiver", "refuse_unexpected_store"]

LOG = logging.getLogger(__name__)

_TEMP_PREFIX = "incoming-"
_HEAD_BYTES = 64 * 1024  # an instance is judged from at most this much of its data set, held in memory
_MAX_COMMAND = 64 * 1024  # a command set is a dozen short elements


def refuse_unexpected_store(event: evt.Event) -> int:
    """pynetdicom's own C-STORE path: only reached if `StoreReceiver` passed a request on.

    That happens only for a command set it could not parse, which pynetdicom
    then could; refusing beats pynetdicom's default of answering Success for
    an instance nobody stored.
    """
    LOG.error("C-STORE from %s reached the fallback handler; answered 0x%04X",
              ae_title_text(event.assoc.requestor.ae_title), 0xC001)
    return 0xC001


class _Mode(Enum):
    IDLE = "idle"  # between messages, or collecting a command set
    PASS_ON = "pass-on"  # the message is not a C-STORE request: pynetdicom decodes it
    HEAD = "head"  # holding the first bytes of a data set in memory until its header can be judged
    STORE = "store"  # writing a C-STORE data set to its temp file
    DRAIN = "drain"  # reading a data set we refuse (judged, too large, bad context, disk error) to its end


@dataclass
class _Arrival:
    """One C-STORE request, and what has become of its data set so far."""

    request: StoreRequest
    path: str | None = None  # the temp file
    fd: int = -1
    size: int = 0  # bytes in the temp file
    received: int = 0  # bytes of the data set received so far
    meta: bytes = b""  # the file meta header the temp file starts with
    head: bytearray = field(default_factory=bytearray)  # the data set's first bytes, judged before any is written
    header: InstanceHeader | None = None
    status: int = STATUS_SUCCESS  # what to answer if the data set is refused unread


class StoreReceiver:
    """Takes C-STORE requests off one association's P-DATA stream (see module doc).

    Installed in the association's DIMSE layer (`netdicom_internals.DimseTap`),
    which pynetdicom's network thread hands every P-DATA primitive, and in its
    network layer, whose PDU reads it bounds (`pdu_reader`). Command
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
        self.guard = guard_of(sink)
        self._incoming_dir = incoming_dir
        self.peer = peer
        self.limits = limits or ReceiveLimits()
        self._after_each = after_each
        self._command = bytearray()
        self._mode = _Mode.IDLE
        self._current: _Arrival | None = None
        self._closed = False
        # Held while the current temp file is written or dropped: discard() may
        # come from another thread, and a closed fd number gets reused.
        self._lock = threading.Lock()
        self._contexts: dict[int, PresentationContext] | None = None
        # P-DATA that does not take the direct path of the PDU reader comes through the tap.
        self._dimse = DimseTap(assoc, self._fragment)
        self._network = NetworkLayer(assoc)
        read_pdus_bounded(self._network, self._fragment, self._mid_data_set, self.limits, on_release=self._ended)

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
        self._dimse.pass_on(context_id, bytes(data))
        self._mode = _Mode.PASS_ON if self._dimse.mid_message() else _Mode.IDLE

    def _command_complete(self, context_id: int) -> None:
        raw = bytes(self._command)
        self._command.clear()
        request = parse_store_request(raw, context_id)
        if request is None:
            # 0x03: command set, last fragment
            self._pass_on(context_id, b"\x03" + raw)
            return
        self._current = arrival = _Arrival(request)
        context = self._accepted_context(context_id)
        if context is None or context.abstract_syntax != request.sop_class:
            arrival.status = STATUS_SOP_CLASS_NOT_SUPPORTED
            self._refused(None, arrival.status, "SOP class not negotiated on the presentation context it came on")
            self._mode = _Mode.DRAIN
            return
        arrival.meta = file_meta(request.sop_class, request.sop_instance, str(context.transfer_syntax[0]),
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
            if header.sop_instance_uid != arrival.request.sop_instance:
                self._refuse_unread(arrival, STATUS_CANNOT_UNDERSTAND,
                                    "the data set's SOP Instance UID differs from the request's", header)
                return
            arrival.header = header
            try:
                status = self.guard.judge(self.peer(), header, arrival.request.originator_ae,
                                         arrival.request.originator_message_id)
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
        context_id = arrival.request.context_id
        command = store_response(arrival.request, status)
        # We are the network thread: established, the P-DATA-TF goes out at once.
        if not self._network.send_now(p_data_tf(context_id, command)):
            self._network.queue_p_data(context_id, b"\x03" + command)
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
                if header.sop_instance_uid != arrival.request.sop_instance:
                    self._refused(header, STATUS_CANNOT_UNDERSTAND,
                                  "the data set's SOP Instance UID differs from the request's")
                    return STATUS_CANNOT_UNDERSTAND
                status = self.guard.judge(peer, header, arrival.request.originator_ae, arrival.request.originator_message_id)
                if status is not None:
                    return int(status)
            instance = ReceivedInstance(
                peer_ae=peer.ae_title,
                move_originator_ae=arrival.request.originator_ae,
                move_originator_message_id=arrival.request.originator_message_id,
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

