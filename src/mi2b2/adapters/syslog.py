"""Send one RFC 5424 message to a syslog server over plain TCP or UDP (TLS syslog comes later).

A fresh connection per message: checkpoints are minutes apart, and a server that
restarted in between is simply reached again. Over TCP the frame is RFC 6587
octet counting (``LEN SP MSG``), so no delimiter byte can merge or split records.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime

from mi2b2.config import SyslogTarget

APP_NAME = "mi2b2"
FACILITY_LOG_AUDIT = 13  # RFC 5424 facility "log audit"
SEVERITY_NOTICE = 5
TIMEOUT_SECONDS = 3.0
UDP_MAX_BYTES = 65000


def rfc5424_message(msgid: str, text: str, at: datetime, hostname: str | None = None) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` with a single-line ASCII/UTF-8 MSG."""
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError("a syslog message is one line")
    host = "".join(c for c in (hostname or socket.gethostname()) if "!" <= c <= "~")[:255] or "-"
    pri = FACILITY_LOG_AUDIT * 8 + SEVERITY_NOTICE
    stamp = at.isoformat(timespec="microseconds")
    if stamp.endswith("+00:00"):
        stamp = stamp[:-6] + "Z"
    return f"<{pri}>1 {stamp} {host} {APP_NAME} {os.getpid()} {msgid} - {text}".encode()


def send(target: SyslogTarget, message: bytes) -> None:
    """Deliver one message; OSError (refused, unreachable, timeout) when it cannot."""
    family_and_address = socket.getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM if target.transport == "tcp" else socket.SOCK_DGRAM)
    family, kind, proto, _name, address = family_and_address[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(TIMEOUT_SECONDS)
        if target.transport == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(address)
            sock.sendall(str(len(message)).encode() + b" " + message)
            sock.shutdown(socket.SHUT_WR)
        else:
            if len(message) > UDP_MAX_BYTES:
                raise OSError(f"message of {len(message)} bytes is too large for one UDP datagram")
            sock.sendto(message, address)
