"""Every use mi2b2 makes of pynetdicom's internals, in one place, behind a version guard.

pynetdicom's public API (AE, Association, events, presentation contexts) is
used wherever it is needed. What is here reaches below it: private names,
replaced methods, the network (DUL) layer's queues and state machine. Each
piece says why it is needed. None of it is promised to survive a pynetdicom
release, so the range it was tested with is pinned in ``pyproject.toml``
(`TESTED_PYNETDICOM`) and `require_tested_pynetdicom` refuses to start a
server, worker or receiver on any other version. Nothing else in mi2b2
imports a pynetdicom private name (ruff's banned-api enforces the modules).

To support a new pynetdicom release: run the DICOM tests against it (unit,
test_dicom_adapter, test_receiver*, test_retrieve*, test_forward*), read its
changes to ``dul.py``, ``dimse.py``, ``association.py``, ``presentation.py`` and
``transport.py`` (its server's accept and per-connection handling)
against each function below, then widen `TESTED_PYNETDICOM` and the pin
together.
"""

from __future__ import annotations

import contextlib
import copy
import re
import select
import socket
import ssl
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol, cast

import pynetdicom
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom import association as _association_module
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from mi2b2.adapters.dicom.errors import UntestedPynetdicom

__all__ = [
    "TESTED_PYNETDICOM",
    "BeforeAssociation",
    "DimseTap",
    "NetworkLayer",
    "association_socket",
    "cheaply_copied_context",
    "files_sent_as_stored",
    "keep_responses_for_the_caller",
    "pinned_range",
    "prompt_network_thread",
    "readable",
    "reject_association",
    "require_tested_pynetdicom",
    "set_nodelay",
    "set_transfer_syntax_order",
    "start_receiving_server",
]

# --- the version guard -------------------------------------------------------------------

# The releases everything below was read against and tested with: from the first, up to
# (not including) the second. Keep in step with the pin in pyproject.toml.
TESTED_PYNETDICOM: tuple[tuple[int, ...], tuple[int, ...]] = ((3, 0, 4), (3, 1))
_VERSION = re.compile(r"(\d+(?:\.\d+)*)(.*)")
_PRE_RELEASE = re.compile(r"[.\-_]?(a|b|c|rc|alpha|beta|pre|preview|dev)", re.IGNORECASE)


def pinned_range() -> str:
    """The tested range as a pip requirement specifier, e.g. ``>=3.0.4,<3.1``."""
    low, high = TESTED_PYNETDICOM
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def require_tested_pynetdicom() -> None:
    """Refuse to go on with a pynetdicom release outside `TESTED_PYNETDICOM`.

    Called as a server, worker or receiver starts: a pynetdicom whose internals
    moved would fail later, mid-transfer, in ways that are hard to read.
    """
    installed = str(pynetdicom.__version__)
    if not _is_tested(installed):
        raise UntestedPynetdicom(installed, pinned_range())


def _is_tested(version: str) -> bool:
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        return False
    release = _padded(tuple(int(part) for part in match.group(1).split(".")))
    low, high = (_padded(bound) for bound in TESTED_PYNETDICOM)
    if _PRE_RELEASE.match(match.group(2)):
        return low < release < high  # 3.0.4rc1 comes before 3.0.4
    return low <= release < high


def _padded(release: tuple[int, ...]) -> tuple[int, ...]:
    return release + (0,) * (4 - len(release))


# --- sockets and the network thread --------------------------------------------------------


# What the receiver does with a new connection before pynetdicom sees it: the address the
# association is to have (the peer's, or the one a balancer's PROXY header names), or None to
# close the connection unread.
BeforeAssociation = Callable[[socket.socket, tuple[Any, ...]], "tuple[Any, ...] | None"]


class _ReceivingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with a say over each connection before its association.

    pynetdicom accepts (and wraps for TLS) in its accept loop, then builds the
    association on the connection's own thread (``finish_request``) from
    ``client_address``: EVT_CONN_OPEN's ``address`` and ``requestor.address``
    both come from it. Here the accept loop only accepts; on the connection's
    thread `before_association` may read a PROXY header off the raw socket
    (before any TLS byte) and name another address, and only then is the
    socket wrapped and handed to pynetdicom. A silent peer holds its own
    thread, never the accept loop.
    """

    share_port = False
    before_association: BeforeAssociation | None = None

    def server_bind(self) -> None:
        assert self.socket is not None
        if self.share_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        before = self.before_association
        if before is not None:
            address = before(request, tuple(client_address))
            if address is None:
                self.shutdown_request(request)
                return
            client_address = address
        if self.ssl_context is not None:
            request = self.ssl_context.wrap_socket(request, server_side=True)  # our contexts defer the handshake
        super().finish_request(request, client_address)


class _PortSharingServer(_ReceivingServer):
    """The same, with SO_REUSEPORT set before its bind."""

    share_port = True


def start_receiving_server(ae: pynetdicom.AE, address: tuple[str, int], handlers: list[evt.EventHandlerType],
                           contexts: list[PresentationContext], ssl_context: ssl.SSLContext | None,
                           share_port: bool = False, before_association: BeforeAssociation | None = None,
                           ) -> ThreadedAssociationServer:
    """`ae.start_server(address, block=False, ...)` on `_ReceivingServer`.

    With `share_port` the socket sets SO_REUSEPORT (Linux). `AE.start_server`
    has no say over its server class; `AE.make_server` has, but then the
    server must be listed in the AE's private ``_servers``, which its
    ``shutdown`` removes it from, and served on a thread, as `start_server` does."""
    server_class = _PortSharingServer if share_port else _ReceivingServer
    server = cast(_ReceivingServer, ae.make_server(address, evt_handlers=handlers, contexts=contexts,
                                                   ssl_context=ssl_context, server_class=server_class))
    server.before_association = before_association
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True).start()
    return server


def set_nodelay(assoc: Association) -> None:
    """TCP_NODELAY on the association's socket; from EVT_CONN_OPEN, before anything is sent.

    pynetdicom leaves Nagle's algorithm on and exposes the socket only through
    its DUL layer. A C-FIND request goes out as two small PDUs, and the second
    waits for the peer's delayed ACK of the first: ~40 ms per query on loopback.
    """
    raw = _raw_socket(assoc.dul.socket)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# How long the network thread of a prompt association waits in select() for
# incoming data before it looks at its other queues again.
_IDLE_WAIT = 0.001
_FIRST_READ = 1 << 20


def prompt_network_thread(assoc: Association) -> None:
    """Let the association's network (DUL) thread wake up when data arrives.

    pynetdicom's DUL loop polls: when a pass finds nothing to do it sleeps
    1 ms (``_run_loop_delay``) before it looks at the socket again. A PACS
    sending a study waits for our C-STORE response before it sends the next
    instance, so that sleep lands on every instance: ~1 ms each, about half of
    what DCMTK's storescp needs for a 512 KB image on loopback. Here the idle
    wait moves into select() on the socket (same 1 ms cadence for the DUL's
    other queues, so no extra CPU when idle: its ``_is_transport_event`` is
    wrapped) and data wakes the thread at once. Also reads each PDU with
    recv_into instead of 4 KiB recv() calls (its socket's ``recv`` is
    replaced). Per association, from its EVT_CONN_OPEN handler (before its
    reactor runs), so nothing else in the process changes.
    """
    dul = assoc.dul
    check_socket = dul._is_transport_event

    def wait_then_check() -> bool:
        raw = _raw_socket(dul.socket)
        if raw is not None:
            # Errors are left to pynetdicom's own check, which reports them (and sees TLS's pending bytes).
            with contextlib.suppress(OSError, ValueError):
                readable(raw, _IDLE_WAIT)
        return check_socket()

    dul._is_transport_event = wait_then_check  # type: ignore[method-assign]  # the per-association wrap described above
    dul._run_loop_delay = 0.0
    sock = dul.socket
    if sock is not None:
        sock.recv = _whole_reader(sock)  # type: ignore[method-assign]  # the per-association reader described above


class _SocketRead(Protocol):
    """AssociationSocket.recv's signature, keyword name included."""

    def __call__(self, nr_bytes: int) -> bytearray: ...


def _whole_reader(sock: AssociationSocket) -> _SocketRead:
    """AssociationSocket.recv, with one recv_into per kernel buffer instead of per 4 KiB."""

    def recv(nr_bytes: int) -> bytearray:
        raw = sock.socket
        if raw is None:
            return bytearray()  # closed: pynetdicom checks the length it got
        # Grown as bytes arrive, never sized by the length a peer claims: a PDU
        # header saying 4 GiB must not make us allocate 4 GiB.
        buffer = bytearray(min(nr_bytes, _FIRST_READ))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):
                buffer.extend(bytes(min(nr_bytes - received, max(len(buffer), _FIRST_READ))))
            view = memoryview(buffer)
            count = raw.recv_into(view[received:])
            del view
            if not count:  # connection closed: pynetdicom checks the length it got
                return buffer[:received]
            received += count
        return buffer

    return recv


def _raw_socket(sock: AssociationSocket | None) -> socket.socket | None:
    return sock.socket if sock is not None else None


def association_socket(assoc: Association) -> socket.socket | None:
    """The association's socket (an SSLSocket under DICOM TLS), for its EVT_CONN_OPEN handler."""
    return _raw_socket(assoc.dul.socket)


def readable(raw: socket.socket, timeout: float) -> bool:
    """Bytes to read within `timeout`: in the kernel, or already decrypted inside an SSLSocket.

    select() sees only the kernel's buffer; a TLS record read whole may hold
    more than the last read took, and select would then wait for bytes that
    already arrived.
    """
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return True
    return bool(select.select([raw], [], [], timeout)[0])


def keep_responses_for_the_caller(assoc: Association) -> None:
    """Close a pynetdicom race that silently loses answers (C-FIND, C-STORE) to the requestor.

    pynetdicom's reactor thread may pass its pause checkpoint just before
    ``send_c_find`` pauses it, then take the next DIMSE message off the queue
    and "serve" it as if it were a request. On a fast PACS (TCP_NODELAY) under
    CPU load that message is a pending C-FIND response: the answer vanishes and
    the find ends with Success (seen: 2 of 1,200 finds against Orthanc). We
    only ever act as the requestor on such an association, so anything the
    reactor picks up is a response meant for the caller: its ``_serve_request``
    puts it back at the head of the DIMSE queue.
    """
    queue = assoc.dimse.msg_queue

    def give_back(msg: Any, context_id: int) -> None:
        with queue.mutex:
            queue.queue.appendleft((context_id, msg))
            queue.unfinished_tasks += 1
            queue.not_empty.notify()

    assoc._serve_request = give_back  # type: ignore[method-assign]  # the race fix described above


# --- sending files as stored ---------------------------------------------------------------

_sending_as_stored: ContextVar[bool] = ContextVar("mi2b2_sending_files_as_stored", default=False)
_install_lock = threading.Lock()


class _ConfigSeenByAssociations(types.ModuleType):
    """pynetdicom's ``_config`` as ``Association.send_c_store`` reads it.

    Every setting reads through to the real module, except that
    ``STORE_SEND_CHUNKED_DATASET`` is also on in a thread (context) inside
    `files_sent_as_stored`.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(_config, name)

    @property
    def STORE_SEND_CHUNKED_DATASET(self) -> bool:
        return _sending_as_stored.get() or bool(_config.STORE_SEND_CHUNKED_DATASET)


@contextlib.contextmanager
def files_sent_as_stored() -> Iterator[None]:
    """While inside, this thread's ``send_c_store(path)`` sends the file's bytes as they are.

    pynetdicom streams a file path's data set without decoding it only when
    its process-wide ``_config.STORE_SEND_CHUNKED_DATASET`` is on; off, it
    decodes the file first. Flipping that module global for the duration of a
    forward races with every other thread sending at the same time. Instead
    ``pynetdicom.association`` is given, once, a read-through view of
    ``_config`` whose switch is also on in a context that entered this block:
    the setting follows the thread that sends, nothing process-wide changes
    value, and a path sent anywhere else is treated as pynetdicom's own
    setting says.
    """
    _see_config_through_view()
    token = _sending_as_stored.set(True)
    try:
        yield
    finally:
        _sending_as_stored.reset(token)


def _see_config_through_view() -> None:
    with _install_lock:
        # The module global ``association.py`` reads its settings through, replaced in its namespace.
        namespace = vars(_association_module)
        if not isinstance(namespace["_config"], _ConfigSeenByAssociations):
            namespace["_config"] = _ConfigSeenByAssociations(_config.__name__)


# --- accepting associations ----------------------------------------------------------------


def reject_association(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Reject from an EVT_REQUESTED handler, as pynetdicom rejects by itself.

    pynetdicom has no public way to reject an association a handler has seen
    (only its own checks of AE titles and contexts do): the A-ASSOCIATE-RJ goes
    out through its ACSE, EVT_REJECTED fires, and the association waits for the
    peer to close (at most its ARTIM timeout).
    """
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


class _SharedUidContext(PresentationContext):
    """A presentation context that deep-copies cheaply.

    pynetdicom deep-copies the server's supported contexts for every incoming
    association; with every storage class x every transfer syntax that is
    ~6,600 UID objects, copied one by one through __reduce_ex__: 100 ms per
    association, half of what storescp needs for a whole 150-instance study.
    UIDs are immutable strings, so the copies can share them (the list itself,
    ``_transfer_syntax``, is copied).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUidContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def cheaply_copied_context(abstract_syntax: UID, transfer_syntaxes: Sequence[UID]) -> PresentationContext:
    """A context for `AE.start_server`'s list that costs little to copy per association."""
    context = _SharedUidContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = list(transfer_syntaxes)
    return context


def set_transfer_syntax_order(context: PresentationContext, order: list[UID]) -> None:
    """Replace an acceptor context's transfer syntaxes with `order`, already validated UIDs.

    The public setter validates and appends one UID at a time; this runs for
    every storage class on every association (see the receiver's
    ``prefer_the_senders_transfer_syntax``), so it sets ``_transfer_syntax``.
    """
    context._transfer_syntax = order


# --- reading and answering P-DATA on the network thread ------------------------------------

_AWAITING_REQUEST = "Sta2"
_ESTABLISHED = "Sta6"
_AWAITING_CLOSE = "Sta13"
_CONNECTION_CLOSED = "Evt17"
_INVALID_PDU = "Evt19"


class NetworkLayer:
    """One association's DUL (network) layer, as far as the C-STORE receiver drives it by hand.

    pynetdicom's DUL thread reads a PDU (``_read_pdu_data``), queues the event
    for its state machine (``event_queue``) and the decoded PDU
    (``_recv_pdu``). The receiver takes over that read to bound it and to hand
    P-DATA straight to itself; this class is the part of the DUL it touches,
    with pynetdicom's names for states (Sta6, Sta13) and events (Evt17, Evt19)
    kept here.
    """

    def __init__(self, assoc: Association) -> None:
        self._dul = assoc.dul
        self._pynetdicom_read = self._dul._read_pdu_data

    def socket(self) -> socket.socket | None:
        return _raw_socket(self._dul.socket)

    def is_established(self) -> bool:
        """Data transfer state: P-DATA may flow."""
        return self._dul.state_machine.current_state == _ESTABLISHED

    def is_awaiting_close(self) -> bool:
        """We aborted or released: whatever still comes is dropped unread."""
        return self._dul.state_machine.current_state == _AWAITING_CLOSE

    def connection_closed(self) -> None:
        """Tell the state machine the transport is gone (closed, or too slow).

        Before the A-ASSOCIATE-RQ, pynetdicom's state machine just returns to
        idle and the acceptor's reactor goes on waiting for a request that can
        no longer come, for the whole ACSE timeout (30 s), counted all along
        among the AE's associations (at most 64). A balancer's health check
        that carries a PROXY header is such a connection, several a second:
        the reactor is given the None its wait returns on a timeout, and ends
        at once as it would then.
        """
        awaiting_request = self._dul.state_machine.current_state == _AWAITING_REQUEST
        self._dul.event_queue.put(_CONNECTION_CLOSED)
        if awaiting_request:
            self._dul.to_user_queue.put(None)  # what receive_pdu returns on a timeout

    def invalid_pdu(self) -> None:
        """Tell the state machine a PDU was invalid: it aborts the association."""
        self._dul.event_queue.put(_INVALID_PDU)

    def queue_pdu(self, pdu: bytes | memoryview) -> None:
        """Decode a whole PDU and queue it for the state machine, as pynetdicom's reader does.

        Raises whatever pynetdicom's decoder raises for an undecodable PDU.
        """
        decoded, event = self._dul._decode_pdu(bytearray(pdu))
        self._dul.event_queue.put(event)
        self._dul._recv_pdu.put(decoded)

    def read_pdu_as_pynetdicom_does(self) -> None:
        self._pynetdicom_read()

    def take_over_pdu_reading(self, read: Callable[[], None]) -> None:
        """From now on the DUL thread calls `read` wherever it would read a PDU itself."""
        self._dul._read_pdu_data = read  # type: ignore[method-assign]  # the receiver's bounded reader

    def send_now(self, pdu: bytes) -> bool:
        """On the network thread, established: send an encoded PDU at once; False if not possible.

        Sending a P-DATA-TF ourselves is what the state machine would do
        (DT-1), one pass of its loop later.
        """
        sock = self._dul.socket
        if not self.is_established() or sock is None:
            return False
        sock.send(pdu)
        return True

    def queue_p_data(self, context_id: int, value: bytes) -> None:
        """Queue one presentation data value for pynetdicom to send."""
        self._dul.send_pdu(_p_data(context_id, value))


class DimseTap:
    """Takes an association's P-DATA before its DIMSE layer decodes it.

    pynetdicom's network thread hands every P-DATA primitive to
    ``dimse.receive_primitive``, which collects whole messages and decodes them
    through pydicom. The C-STORE receiver replaces it, per association, to
    write C-STORE data sets to disk undecoded; whatever it does not take is
    passed on to pynetdicom's own method unchanged.
    """

    def __init__(self, assoc: Association, deliver: Callable[[int, bytes], None]) -> None:
        self._dimse = assoc.dimse
        self._pynetdicom_receive = self._dimse.receive_primitive

        def receive(primitive: P_DATA) -> None:
            for context_id, data in primitive.presentation_data_value_list:
                deliver(context_id, data)

        self._dimse.receive_primitive = receive  # type: ignore[method-assign]  # the interception described above

    def pass_on(self, context_id: int, data: bytes) -> None:
        """One presentation data value for pynetdicom's DIMSE layer."""
        self._pynetdicom_receive(_p_data(context_id, data))

    def mid_message(self) -> bool:
        """pynetdicom holds part of a message (it clears it once a whole one is decoded)."""
        return self._dimse.message is not None


def _p_data(context_id: int, value: bytes) -> P_DATA:
    primitive = P_DATA()
    # pynetdicom's setter accepts only [id, data] lists, although it is annotated with tuples.
    primitive.presentation_data_value_list = [[context_id, value]]  # type: ignore[list-item]  # see the line above
    return primitive
