"""DICOM TLS: the SSL contexts of every association, and what a failed handshake means.

All of mi2b2's DICOM TLS is built here: TLS 1.2 or newer, the peer's
certificate always verified against the CA file the site names (and, for
associations we open, its name against the host or ``server_name``), our own
certificate offered when the site gives one.

pynetdicom wraps the socket with the context we give it (``tls_args`` for an
association we open, ``ssl_context`` for the receiver) and lets the handshake
happen inside its connect or accept. A failure there ends as an association
that is simply not established (client), or in the receiver's accept loop,
where one silent client would hold up every other sender (server). So our
contexts never shake hands inside ``wrap_socket``: `shake_hands` does it, with
a deadline, on the association's own thread (from EVT_CONN_OPEN, before any
DICOM byte is sent), and a failure is kept to be explained by `explain`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mi2b2.adapters.dicom.errors import TlsHandshakeFailed, TlsSettingsUnusable

__all__ = ["TlsClient", "TlsServer", "client_context", "explain", "recorded_failure", "server_context", "shake_hands"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsClient:
    """TLS for an association we open (paths already resolved)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    setting: str = "tls"  # where the site configured it, for messages: "pacs['main'].tls"
    peer_kind: str = "PACS"  # or "destination"


@dataclass(frozen=True)
class TlsServer:
    """TLS on the receiver's port."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = True
    setting: str = "dicom.tls"


class _WatchedSocket(ssl.SSLSocket):
    """An SSLSocket that keeps the first TLS error its reads met.

    pynetdicom turns any read error into "connection closed". With TLS 1.3 a
    server checks our client certificate after our side of the handshake is
    done, so its refusal (an alert) arrives on the first read; this keeps it.
    """

    tls_failure: ssl.SSLError | None = None

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        try:
            return super().read(len, buffer)
        except ssl.SSLError as exc:
            if self.tls_failure is None and not isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
                self.tls_failure = exc
            raise


class _DeferredHandshake(ssl.SSLContext):
    """A context whose sockets shake hands only when `shake_hands` says so (see the module doc)."""

    sslsocket_class = _WatchedSocket

    def wrap_socket(  # the same parameters; only the moment of the handshake differs
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


def _refuse_passphrase() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal and hang a worker.
    raise ValueError("the private key is encrypted with a passphrase")


def client_context(tls: TlsClient) -> ssl.SSLContext:
    """The context for an association to a PACS or destination; TlsSettingsUnusable if the files are not."""
    context = _DeferredHandshake(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checking by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, tls.setting, ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file)
    return context


def server_context(tls: TlsServer) -> ssl.SSLContext:
    """The receiver's context: our certificate, and the senders' checked against ca_file."""
    context = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, tls.setting, ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file)
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _load(context: ssl.SSLContext, setting: str, *, ca_file: Path | None, cert_file: Path | None,
          key_file: Path | None) -> None:
    name = "ca_file"
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        name = "cert_file and key_file"
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None, password=_refuse_passphrase)
    except (OSError, ValueError) as exc:
        detail = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        hint = ("check that key_file is the private key of cert_file" if "KEY_VALUES_MISMATCH" in str(detail)
                else "check that the files exist, are readable and hold PEM data")
        raise TlsSettingsUnusable(f"{setting}.{name}", str(detail), hint) from None


def shake_hands(sock: socket.socket | None, timeout: float) -> None:
    """The TLS handshake of a wrapped socket, within `timeout` seconds; raises ssl.SSLError or OSError."""
    if not isinstance(sock, ssl.SSLSocket):
        return
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)


def recorded_failure(sock: socket.socket | None) -> ssl.SSLError | None:
    """The TLS error a socket's reads met after the handshake (the peer's alert), if any."""
    return sock.tls_failure if isinstance(sock, _WatchedSocket) else None


# Alerts a peer sends when it does not accept our certificate (or our lack of one).
_REFUSED_US = ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED",
               "ALERT_CERTIFICATE_UNKNOWN", "ALERT_ACCESS_DENIED", "ALERT_CERTIFICATE_EXPIRED",
               "ALERT_UNSUPPORTED_CERTIFICATE", "ALERT_DECRYPT_ERROR")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
            "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "ALERT_PROTOCOL_VERSION")


def explain(error: BaseException, peer: str, tls: TlsClient, server_name: str) -> TlsHandshakeFailed:
    """What a failed handshake with a PACS or destination means, and what the site should change."""
    kind, setting = tls.peer_kind, tls.setting
    reason = _reason(error)
    security = False
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        security = True  # the peer presented a certificate we cannot trust: maybe not the peer at all
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            fix = (f"its certificate does not name {server_name!r}; set {setting}.server_name to a name the "
                   f"{kind}'s certificate carries, or have that certificate reissued for this name")
        elif code in (9, 10):  # not yet valid, expired
            fix = f"ask the {kind}'s admin to renew its certificate (and check this machine's clock)"
        else:
            fix = (f"its certificate is not issued by a CA in {setting}.ca_file ({tls.ca_file}); put the CA that "
                   f"issued the {kind}'s certificate in that file, or ask the {kind}'s admin which CA that is")
    elif any(mark in reason.upper().replace(" ", "_") for mark in _REFUSED_US):
        fix = (f"the {kind} refused our client certificate; set {setting}.cert_file and key_file to a certificate "
               f"from a CA the {kind} trusts" if tls.cert_file is not None else
               f"the {kind} requires a client certificate (mutual TLS); set {setting}.cert_file and key_file")
    elif any(mark in reason.upper().replace(" ", "_") for mark in _NOT_TLS):
        fix = (f"the {kind} does not speak TLS 1.2 or newer on this port; check its TLS port, or remove {setting} "
               "if it only speaks plain DICOM")
    elif isinstance(error, (TimeoutError, socket.timeout)):
        fix = f"the {kind} did not complete the handshake in time; check that this port is its DICOM TLS port"
    else:
        fix = (f"check that the {kind} speaks DICOM TLS on this port, trusts our certificate and that its "
               f"certificate chains to {setting}.ca_file")
    LOG.warning("TLS handshake with %s %s failed: %s", kind, peer, reason)
    return TlsHandshakeFailed(peer, kind, reason, fix, security)


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed ({error.verify_message})"
    if isinstance(error, ssl.SSLError):
        return (error.reason or str(error)).replace("_", " ").lower()
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "no answer during the handshake"
    if isinstance(error, ConnectionError):
        return "the connection was closed during the handshake"
    return str(error) or type(error).__name__


def describe_refusal(error: BaseException) -> str:
    """A sender's failed handshake at the receiver, in words for the log and the audit trail."""
    reason = _reason(error)
    if isinstance(error, ssl.SSLError) and any(mark in reason.upper().replace(" ", "_") for mark in _NOT_TLS):
        return f"not a TLS 1.2+ client ({reason})"
    if isinstance(error, ssl.SSLError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in (error.reason or ""):
        return "no client certificate"
    if isinstance(error, ssl.SSLError) and "ALERT" in (error.reason or ""):
        return f"the sender refused the receiver's certificate ({reason}); it must trust the CA of dicom.tls.cert_file"
    return reason
