"""DICOM C-STORE receiver: the instances a PACS sends us, straight to disk.

A study reaches mi2b2 in C-STORE sub-operations: on associations the PACS
opens to `StoreServer` (C-MOVE), or on the association `retrieve.get_study`
opened (C-GET). Both end in `store_receiver.StoreReceiver`, which writes the
data set as received - never decoded, never transcoded - behind a Part 10
preamble and file meta header into a temp file in `incoming_dir`, reads the
few header tags mi2b2 files instances by, and asks the `InstanceSink` for the
C-STORE status. `incoming_dir` lies on the cache's filesystem so that a sink
keeps a file with one ``os.replace``; whatever the sink does, the temp file is
gone before the response goes out.

Why not pynetdicom's EVT_C_STORE handler: it hands over either the decoded
data set in memory, or (``_config.STORE_RECV_CHUNKED_DATASET``, a process-wide
switch) a NamedTemporaryFile in the system temp directory, flushed after every
fragment, with pynetdicom's implementation UID in its meta header; the handler
then runs on the association's reactor thread, which polls its queue every
1 ms, and the response is encoded through pydicom. Instead, per association
and nothing process-wide: C-STORE requests are taken off the P-DATA stream on
the network (DUL) thread that reads them (`store_receiver`, `pdu_reader`), the
file lands in `incoming_dir`, and the response goes out from that thread;
every other DIMSE message still goes to pynetdicom. What this needs of
pynetdicom's internals is in `netdicom_internals`.

Measured on this 2-core machine, 150 x 512 KB instances C-MOVEd by Orthanc
(median of 10, alternating with DCMTK storescp run with TCP_NODELAY=1):
stock pynetdicom handler 0.8-1.4 s; this receiver 0.46-0.65 s; storescp
0.24-0.30 s. What is left is Python: ~1.1 ms of network-thread CPU per
instance, plus the GIL shared with whatever else runs in the process.

Sinks are called from the network thread of each association, so concurrently
when several PACS (or several C-MOVEs) send at once: they must be thread-safe.

The modules of the receiver, by role: this one (the server: who may
associate, which transfer syntaxes), `store_receipt` (what it hands over:
instances, sinks, guards, limits), `store_receiver` (one association's
C-STOREs), `pdu_reader` (bounded reading on the network thread), `store_wire`
(the command sets and file meta, by hand).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from mi2b2.adapters.dicom.errors import ReceiverUnavailable
from mi2b2.adapters.dicom.netdicom_internals import (
    association_socket,
    cheaply_copied_context,
    prompt_network_thread,
    reject_association,
    set_nodelay,
    set_transfer_syntax_order,
    start_receiving_server,
)
from mi2b2.adapters.dicom.proxy_protocol import (
    NothingSent,
    ProxyHeaderError,
    ProxyTrust,
    looks_like_header,
    peek_start,
    read_header,
)
from mi2b2.adapters.dicom.scu import LocalAE
from mi2b2.adapters.dicom.store_receipt import (
    InstanceSink,
    Peer,
    ProxyRefusals,
    ReceiveLimits,
    TlsRefusals,
    ae_title_text,
    next_association_number,
)
from mi2b2.adapters.dicom.store_receiver import StoreReceiver, refuse_unexpected_store
from mi2b2.adapters.dicom.tls import TlsServer, describe_refusal, server_context, shake_hands

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "StoreServer", "scp_contexts"]

LOG = logging.getLogger(__name__)

# Everything pydicom knows except JPIP-referenced pixel data, which is a URL
# into someone else's server rather than images we could cache.
_JPIP = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205"})
ACCEPTED_TRANSFER_SYNTAXES: list[UID] = [ts for ts in AllTransferSyntaxes if ts not in _JPIP]
_ACCEPTED = frozenset(ACCEPTED_TRANSFER_SYNTAXES)

_VERIFICATION = UID("1.2.840.10008.1.1")
_MAX_ASSOCIATIONS = 64
# How long a balancer has to send its PROXY header (it sends it with its connect), and how long
# another peer's first bytes are waited for to see whether they are one.
_PROXY_HEADER_SECONDS = 5.0


class StoreServer:
    """A C-STORE SCP (and C-ECHO, for the PACS admin's tests) on `host`:`port`.

    Which peers may send is the sink's decision when it is a `ReceiptGuard`
    (asked once per association, by AE title and address); what to keep is
    decided per instance, because only the instance says which request and
    project it belongs to. The server itself bounds what any peer can make it
    hold: associations per address, PDU length, instance size, and time.

    With `tls`, every association is DICOM TLS: a sender that does not
    complete the handshake (plain DICOM, a certificate from another CA, none
    where one is required) is disconnected before a DICOM byte is read, and
    told to the sink when it keeps `TlsRefusals`.

    With `share_port`, the listening socket sets SO_REUSEPORT (Linux): several
    receiver processes of one user bind the same host:port and the kernel
    spreads incoming connections over them (`mi2b2 receiver --processes N`).
    The kernel refuses the port when a process of another user, or one without
    SO_REUSEPORT, holds it; that is the same clear `ReceiverUnavailable`.

    With `proxies` (the balancers' networks), a connection from a balancer
    must begin with a PROXY header (HAProxy's ``send-proxy``/``send-proxy-v2``),
    and the association's peer is the address it names: admission, audit and
    the per-address limit judge the PACS, not the balancer. A connection from
    anywhere else carrying one is a forged source address. Either refusal
    closes the connection before pynetdicom reads a byte, and is told to a
    sink that keeps `ProxyRefusals`. The header comes before TLS, as HAProxy
    sends it in TCP mode: the handshake starts after it.
    """

    def __init__(self, local: LocalAE, host: str, port: int, sink: InstanceSink, incoming_dir: Path,
                 limits: ReceiveLimits | None = None, tls: TlsServer | None = None, share_port: bool = False,
                 proxies: ProxyTrust | None = None) -> None:
        self.local = local
        self.proxies = proxies or ProxyTrust()
        self.share_port = share_port
        self.tls = tls
        self.host = host
        self._requested_port = port
        self.sink = sink
        self.limits = limits or ReceiveLimits(max_pdu=local.max_pdu or ReceiveLimits.max_pdu)
        self.incoming_dir = Path(incoming_dir)
        self._server: ThreadedAssociationServer | None = None
        # The receiver of each association, from its TCP connect to its close.
        self._receivers: dict[Association, StoreReceiver] = {}
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the one picked by the OS when started with port 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def open_associations(self) -> int:
        """Associations whose threads still run, from the TCP connect on (requested or not)."""
        server = self._server
        return 0 if server is None else len(server.active_associations)

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
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_STORE, refuse_unexpected_store),
        ]
        ssl_context = server_context(self.tls) if self.tls is not None else None
        address = (self.host, self._requested_port)
        server: ThreadedAssociationServer | None
        before = self._before_association if self.proxies else None
        try:
            server = start_receiving_server(ae, address, handlers, scp_contexts(), ssl_context, self.share_port,
                                            before)
        except OSError as exc:
            raise ReceiverUnavailable(self.local.ae_title, self.host, self._requested_port, exc) from None
        assert server is not None
        self._server = server
        LOG.info("DICOM receiver %s listening on %s:%d%s%s", self.local.ae_title, self.host, self.port,
                 " (DICOM TLS)" if self.tls is not None else "",
                 f" (PROXY protocol from {', '.join(map(str, self.proxies.networks))})" if self.proxies else "")

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
            receivers, self._receivers = list(self._receivers.values()), {}
        for receiver in receivers:
            receiver.close()

    def __enter__(self) -> StoreServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _before_association(self, sock: socket.socket, client: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """On the connection's thread, before pynetdicom: the peer's address, or None to close it.

        From a balancer: the address its PROXY header names (its own for a
        LOCAL header, its health check). From anyone else: its own, unless it
        sends a PROXY header of its own making."""
        address = str(client[0])
        timeout = min(_PROXY_HEADER_SECONDS, self.limits.network_timeout)
        if not self.proxies.is_balancer(address):
            if looks_like_header(peek_start(sock, timeout)):
                self._proxy_refused(address, "a PROXY header from an address not in [dicom] proxy_protocol_from: "
                                             "a forged source address")
                return None
            return client
        try:
            header = read_header(sock, timeout)
        except NothingSent:
            LOG.debug("a connection from the balancer %s closed before its PROXY header", address)
            return None
        except ProxyHeaderError as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"no whole PROXY header within {timeout:g} s"
        except OSError as exc:
            LOG.debug("a connection from the balancer %s failed during its PROXY header: %s", address, exc)
            return None
        else:
            if header.source is None:
                return client  # the balancer speaking for itself
            LOG.debug("a connection from %s:%d through the balancer %s (PROXY v%d)", header.source[0],
                      header.source[1], address, header.version)
            return header.source
        self._proxy_refused(address, f"from the balancer {address}: {reason}; it must send a PROXY header "
                                     "(HAProxy: send-proxy-v2 on its server lines), or be removed from "
                                     "[dicom] proxy_protocol_from")
        return None

    def _proxy_refused(self, address: str, reason: str) -> None:
        LOG.warning("refused a DICOM connection from %s: %s", address, reason)
        if isinstance(self.sink, ProxyRefusals):
            try:
                self.sink.proxy_refused(address, reason)
            except Exception:  # the refusal stands whatever the sink does; it logs its own trouble
                LOG.exception("could not record the refused connection from %s", address)

    def _on_connect(self, event: evt.Event) -> None:
        # Runs on the connection's own thread before the association's start: nothing has been read yet.
        assoc = event.assoc
        set_nodelay(assoc)
        address = _connection_address(event)
        if self.tls is not None and not self._tls_handshake(assoc, address):
            return
        prompt_network_thread(assoc)
        receiver = StoreReceiver(assoc, self.sink, self.incoming_dir, peer=_peer_of(assoc, address),
                                 limits=self.limits)
        with self._lock:
            self._receivers[assoc] = receiver

    def _tls_handshake(self, assoc: Association, address: str) -> bool:
        """The sender's TLS handshake; False (and the connection closed) if it failed."""
        sock = association_socket(assoc)
        try:
            shake_hands(sock, min(30.0, self.limits.network_timeout))
        except OSError as exc:
            if sock is not None:
                sock.close()  # pynetdicom then finds the connection gone
            # No A-ASSOCIATE-RQ can come now: the association ends at once instead of after the ACSE timeout.
            assoc.acse_timeout = 0
            if _closed_unspoken(exc):
                # A port probe (a load balancer's health check) or a sender that gave up: nothing to refuse.
                LOG.debug("a connection from %s closed before its TLS handshake", address)
                return False
            reason = describe_refusal(exc)
            LOG.warning("refused a DICOM TLS connection from %s: %s", address, reason)
            if isinstance(self.sink, TlsRefusals):
                try:
                    self.sink.tls_refused(address, reason)
                except Exception:  # the refusal stands whatever the sink does; it logs its own trouble
                    LOG.exception("could not record the refused TLS connection from %s", address)
            return False
        return True

    def _on_requested(self, event: evt.Event) -> None:
        """The A-ASSOCIATE-RQ is read: refuse a peer over its cap or not allowed, before negotiating."""
        assoc = event.assoc
        with self._lock:
            receiver = self._receivers.get(assoc)
        if receiver is not None and self._open_from(receiver.peer().address) > self.limits.max_associations_per_peer:
            peer = receiver.peer()
            LOG.warning("refused an association from %s (%s): it already holds %d, the most one address may",
                        peer.address, peer.ae_title, self.limits.max_associations_per_peer)
            reject_association(assoc, 0x02, 0x03, 0x02)  # transient, local limit exceeded
            return
        if receiver is not None:
            reason = receiver.guard.admit(receiver.peer())
            if reason is not None:
                LOG.warning("refused an association from %s: %s", receiver.peer().address, reason)
                reject_association(assoc, 0x01, 0x01, 0x03)  # permanent, calling AE title not recognised
                return
        _prefer_the_senders_transfer_syntax(event)

    def _open_from(self, address: str) -> int:
        """Associations from `address` whose threads still run (this one included): never drifts.
        One already released, rejected or aborted no longer counts: its thread lingers a moment,
        and a PACS that releases and at once associates again must not be refused for it."""
        server = self._server
        if server is None:
            return 0
        return sum(1 for assoc in server.active_associations if assoc.requestor.address == address
                   and not (assoc.is_released or assoc.is_rejected or assoc.is_aborted))

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            receiver = self._receivers.pop(event.assoc, None)
        if receiver is None:
            return
        receiver.close()  # an instance cut off mid-transfer leaves nothing behind
        peer = receiver.peer()
        # One line per association (no PHI): which receiver process a PACS's association reached.
        LOG.info("association %d from %s at %s ended", peer.association, peer.ae_title or "(no AE title)", peer.address)


def _closed_unspoken(error: OSError) -> bool:
    return isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError))


def _peer_of(assoc: Association, address: str) -> Callable[[], Peer]:
    """The association's peer; its AE title is known once the A-ASSOCIATE-RQ is read."""
    number = next_association_number()

    def peer() -> Peer:
        # requestor.ae_title is set only once pynetdicom negotiates, after EVT_REQUESTED.
        request = assoc.requestor.primitive
        calling = request.calling_ae_title if request is not None else assoc.requestor.ae_title
        return Peer(ae_title_text(calling), address, number)

    return peer


def _connection_address(event: evt.Event) -> str:
    """The peer's IP address, from EVT_CONN_OPEN's ``address`` (set per event, so untyped)."""
    address = getattr(event, "address", None)
    return str(address[0]) if address else ""


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
        senders_order = preferred.get(str(supported.abstract_syntax))
        if senders_order:
            set_transfer_syntax_order(supported, senders_order)


def scp_contexts() -> list[PresentationContext]:
    """Verification and every storage class, each in every accepted transfer syntax."""
    abstracts = [_VERIFICATION, *(cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax)]
    return [cheaply_copied_context(abstract, ACCEPTED_TRANSFER_SYNTAXES) for abstract in abstracts]

