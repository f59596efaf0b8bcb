"""RFC 5424 messages to a syslog collector over TLS (RFC 5425), UDP (RFC 5426) or plain TCP.

Over TCP and TLS each message is framed by octet counting (``LEN SP MSG``, RFC 5425 4.3,
RFC 6587 3.4.1), so no byte inside a message can merge or split records. Over UDP one
datagram carries one message, with no framing.

`SyslogConnection` keeps one connection open for a stream of messages (the ATNA outbox);
`send` is the one-shot form (audit checkpoints, minutes apart). Syslog over TCP has no
acknowledgement: before each use an open connection is checked for a peer that closed it
meanwhile (a collector restarted), so a message is not written into a dead socket.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mi2b2.config import SyslogTarget

APP_NAME = "mi2b2"
FACILITY_LOG_AUDIT = 13  # RFC 5424 facility "log audit"
SEVERITY_NOTICE = 5
TIMEOUT_SECONDS = 3.0
UDP_MAX_BYTES = 65000
ACCEPTANCE_SECONDS = 0.3  # how long a new TLS connection waits for a refusal of mi2b2's certificate
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a MSG in UTF-8 starts with it


@dataclass(frozen=True)
class TlsSettings:
    ca_file: Path | None = None  # None: the system's CA certificates
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None  # None: the target's host


class SyslogTlsError(OSError):
    """The TLS handshake failed: the collector's certificate, or ours, was not accepted."""


def rfc5424_message(msgid: str, text: str, at: datetime, hostname: str | None = None, *,
                    utf8: bool = False) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` with a single-line MSG
    (``utf8``: the MSG is marked UTF-8 by a BOM)."""
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError("a syslog message is one line")
    host = "".join(c for c in (hostname or socket.gethostname()) if "!" <= c <= "~")[:255] or "-"
    pri = FACILITY_LOG_AUDIT * 8 + SEVERITY_NOTICE
    stamp = at.isoformat(timespec="microseconds")
    if stamp.endswith("+00:00"):
        stamp = stamp[:-6] + "Z"
    header = f"<{pri}>1 {stamp} {host} {APP_NAME} {os.getpid()} {msgid} - ".encode()
    return header + (BOM if utf8 else b"") + text.encode()


def tls_context(settings: TlsSettings) -> ssl.SSLContext:
    """Client context: the collector's certificate checked against the CA and the name, TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                          cafile=str(settings.ca_file) if settings.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None:
        context.load_cert_chain(str(settings.cert_file), str(settings.key_file) if settings.key_file else None)
    return context


class SyslogConnection:
    """One open connection to a collector, reopened when it was lost. Not thread-safe."""

    def __init__(self, target: SyslogTarget, tls: TlsSettings | None = None,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.target = target
        self._tls = tls or TlsSettings()
        self._context = tls_context(self._tls) if target.transport == "tls" else None
        self._timeout = timeout
        self._sock: socket.socket | None = None

    def send(self, message: bytes) -> None:
        """Deliver one message; OSError (refused, unreachable, timeout, TLS refused) when it cannot.
        After an error the connection is closed; the next send opens a new one."""
        try:
            if self.target.transport == "udp":
                if len(message) > UDP_MAX_BYTES:
                    raise OSError(f"message of {len(message)} bytes is too large for one UDP datagram")
                self._open().send(message)
                return
            sock = self._open()
            sock.sendall(str(len(message)).encode() + b" " + message)
        except OSError:
            self.close()
            raise

    def _open(self) -> socket.socket:
        if self._sock is not None and self._peer_closed(self._sock):
            self.close()
        if self._sock is None:
            self._sock = self._connect()
        return self._sock

    def _connect(self) -> socket.socket:
        kind = socket.SOCK_DGRAM if self.target.transport == "udp" else socket.SOCK_STREAM
        family, kind, proto, _name, address = socket.getaddrinfo(self.target.host, self.target.port, type=kind)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(self._timeout)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(address)
            if self._context is not None:
                try:
                    sock = self._context.wrap_socket(sock, server_hostname=self._tls.server_name or self.target.host)
                except ssl.SSLCertVerificationError as exc:
                    raise SyslogTlsError(
                        f"the collector at {self.target} presented a certificate mi2b2 does not trust "
                        f"({exc.verify_message}); check [audit.atna] ca_file (the CA that signed the collector's "
                        "certificate) and server_name (a name in that certificate)") from None
                except ssl.SSLError as exc:
                    raise self._refused(exc) from None
                if isinstance(sock, ssl.SSLSocket) and sock.version() == "TLSv1.3":
                    self._await_acceptance(sock)
            return sock
        except BaseException:
            sock.close()
            raise

    def _refused(self, exc: ssl.SSLError | None) -> SyslogTlsError:
        why = "it closed the connection" if exc is None else (exc.reason or str(exc))
        return SyslogTlsError(f"TLS with the collector at {self.target} failed ({why}); check that it speaks TLS 1.2 "
                              "or newer and, if it asks for a client certificate, that [audit.atna] cert_file and "
                              "key_file hold one it accepts")

    def _await_acceptance(self, sock: socket.socket) -> None:
        """In TLS 1.3 the client's handshake ends before the server has judged the client's certificate;
        a refusal comes as an alert just after. Wait for it briefly, once per connection, so that no
        message is written into a connection the collector is about to drop (and taken for sent)."""
        deadline = time.monotonic() + ACCEPTANCE_SECONDS
        sock.setblocking(False)
        try:
            while (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    return
                try:
                    if sock.recv(1) == b"":
                        raise self._refused(None)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue  # a session ticket: the server is still talking
                except ssl.SSLError as exc:
                    raise self._refused(exc) from None
        finally:
            sock.settimeout(self._timeout)

    def _peer_closed(self, sock: socket.socket) -> bool:
        """True when the collector closed (or reset) the connection since the last message."""
        if sock.type == socket.SOCK_DGRAM:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if isinstance(sock, ssl.SSLSocket):
                sock.setblocking(False)
                try:
                    return sock.recv(1) == b""  # a collector sends nothing: any readable state ends it
                except ssl.SSLWantReadError:
                    return False  # a TLS record (e.g. a session ticket) that carried no data
                finally:
                    sock.settimeout(self._timeout)
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:
            return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.settimeout(0.5)
                sock.unwrap()
        except (OSError, ValueError):
            pass
        finally:
            sock.close()


def send(target: SyslogTarget, message: bytes, tls: TlsSettings | None = None) -> None:
    """Deliver one message over a connection of its own; OSError when it cannot."""
    connection = SyslogConnection(target, tls)
    try:
        connection.send(message)
    finally:
        connection.close()
