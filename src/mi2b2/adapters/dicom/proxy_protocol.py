"""The PROXY protocol (HAProxy's, v1 text and v2 binary) in front of the receiver.

Behind an L4 balancer every association comes from the balancer's address,
so the receiver's check of a PACS's address (`domain.receipt.identify_peer`)
would only prove that the balancer was used. A balancer configured with
``send-proxy`` (v1) or ``send-proxy-v2`` (v2) first sends one header naming
the real source, then the sender's bytes unchanged (the A-ASSOCIATE-RQ, or
a TLS ClientHello). `read_header` takes exactly that header off the socket,
no byte more, so that pynetdicom (or the TLS handshake) starts on the
sender's first byte.

Which peers must send a header is the site's (``[dicom] proxy_protocol_from``,
`ProxyTrust`): from a balancer it is required (one that does not send it
would make every PACS look like the balancer), from anyone else it is a
forged source address (`looks_like_header`).

Parsed here, strictly, rather than with the PyPI ``proxy-protocol`` package
(0.11, alpha, asyncio-only reading, no bound on a v1 line, lenient numbers):
the part worth having is the bounded, exact reading from a blocking socket,
which it does not do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_V2_PAYLOAD",
    "V1_MAX",
    "NothingSent",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyTrust",
    "looks_like_header",
    "parse_v1",
    "parse_v2",
    "peek_start",
    "read_header",
]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/protocol, length
# Addresses (at most 216 bytes, AF_UNIX) plus TLVs; HAProxy sends well under 1 KiB. A larger
# length is refused before any of it is read.
MAX_V2_PAYLOAD = 2048
_V1_ADDRESS = {b"TCP4": 4, b"TCP6": 6}
_PORT = re.compile(rb"(0|[1-9][0-9]{0,4})\Z")
_V1_IPV4 = re.compile(rb"[0-9.]{7,15}\Z")
_V1_IPV6 = re.compile(rb"[0-9a-fA-F:.]{2,45}\Z")


class ProxyHeaderError(ValueError):
    """A PROXY header that is malformed, too long, incomplete or absent; the message says which."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a header says: the sender's address, or None when the balancer speaks for itself.

    None is v2's LOCAL command (the balancer's own health check) and v1's
    ``UNKNOWN`` / v2's unspecified or AF_UNIX family: the spec says to use
    the connection's own address then."""

    version: int
    source: tuple[str, int] | None


@dataclass(frozen=True)
class ProxyTrust:
    """The balancers' networks (``[dicom] proxy_protocol_from``); empty: no PROXY protocol at all."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, networks: Iterable[str]) -> ProxyTrust:
        return cls(tuple(ipaddress.ip_network(network, strict=False) for network in networks))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def is_balancer(self, address: str) -> bool:
        try:
            ip = _plain(ipaddress.ip_address(address))
        except ValueError:
            return False
        return any(ip.version == network.version and ip in network for network in self.networks)


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 peer) as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def looks_like_header(start: bytes) -> bool:
    """The first bytes a peer sent begin a PROXY header (v1 or v2).

    Neither can begin DICOM (PDU types are 0x01-0x07) nor TLS (record types
    0x14-0x18), so even one byte that matches is no sender's mistake."""
    if not start:
        return False
    v1, v2 = start[:len(V1_PREFIX)], start[:len(V2_SIGNATURE)]
    return V1_PREFIX.startswith(v1) or V2_SIGNATURE.startswith(v2)


def parse_v1(line: bytes) -> ProxyHeader:
    """One whole v1 line, CRLF included: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT`` or ``PROXY UNKNOWN ...``."""
    if len(line) > V1_MAX:
        raise ProxyHeaderError(f"a PROXY v1 line longer than {V1_MAX} bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n") or b"\r\n" in line[:-2] or b"\n" in line[:-1]:
        raise ProxyHeaderError("not a PROXY v1 line ending in CRLF")
    fields = line[len(V1_PREFIX):-2].split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(1, None)  # the rest of the line is to be ignored (spec 2.1)
    version = _V1_ADDRESS.get(fields[0])
    if version is None:
        raise ProxyHeaderError("a PROXY v1 line whose protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise ProxyHeaderError("a PROXY v1 line without exactly source, destination and both ports")
    source = _v1_address(fields[1], version)
    _v1_address(fields[2], version)
    source_port = _v1_port(fields[3])
    _v1_port(fields[4])
    return ProxyHeader(1, (source, source_port))


def _v1_address(text: bytes, version: int) -> str:
    shape = _V1_IPV4 if version == 4 else _V1_IPV6
    try:
        if shape.match(text) is None:
            raise ValueError
        ip = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"a PROXY v1 line with an address that is not IPv{version}") from None
    if ip.version != version:
        raise ProxyHeaderError(f"a PROXY v1 line with an address that is not IPv{version}")
    return str(_plain(ip))


def _v1_port(text: bytes) -> int:
    if _PORT.match(text) is None or int(text) > 65535:
        raise ProxyHeaderError("a PROXY v1 line with a port that is not 0-65535 in plain digits")
    return int(text)


def parse_v2(fixed: bytes, payload: bytes) -> ProxyHeader:
    """A v2 header: its 16 fixed bytes and the `payload` of the length they give."""
    if len(fixed) != _V2_FIXED or not fixed.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("not a PROXY v2 signature")
    version_command, family_protocol, length = struct.unpack("!BBH", fixed[12:])
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"a PROXY v2 header of version {version_command >> 4}")
    if length != len(payload):
        raise ProxyHeaderError(f"a PROXY v2 header announcing {length} bytes of addresses, with {len(payload)}")
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection (its health check); addresses are ignored
        return ProxyHeader(2, None)
    if command != 0x1:
        raise ProxyHeaderError(f"a PROXY v2 header with the unknown command {command}")
    family, transport = family_protocol >> 4, family_protocol & 0x0F
    if family in (0x0, 0x3):  # unspecified, AF_UNIX: no IP source to judge by
        return ProxyHeader(2, None)
    if transport != 0x1:
        raise ProxyHeaderError("a PROXY v2 header for a transport other than TCP")
    if family == 0x1:
        size, build = 4, ipaddress.IPv4Address
    elif family == 0x2:
        size, build = 16, ipaddress.IPv6Address  # type: ignore[assignment]  # both take packed bytes
    else:
        raise ProxyHeaderError(f"a PROXY v2 header with the unknown address family {family}")
    if length < 2 * size + 4:
        raise ProxyHeaderError("a PROXY v2 header too short for its addresses")
    source = build(payload[:size])
    (source_port,) = struct.unpack("!H", payload[2 * size:2 * size + 2])
    return ProxyHeader(2, (str(_plain(source)), source_port))


def read_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Take one PROXY header (v1 or v2) off a blocking socket within `timeout` seconds.

    Reads exactly the header's bytes: what follows is the sender's and stays
    in the socket. Raises ProxyHeaderError for anything but a valid header,
    TimeoutError when it does not arrive whole in time, `NothingSent` when the
    peer closes without a byte (a port probe), another OSError when it closes
    or fails midway."""
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        start = _exactly(sock, len(V1_PREFIX), deadline, first=True)
        if start == V1_PREFIX:
            line = bytearray(start)
            # Byte by byte: a recv of more could take the sender's first bytes with it.
            while not line.endswith(b"\r\n"):
                if len(line) >= V1_MAX:
                    raise ProxyHeaderError(f"a PROXY v1 line longer than {V1_MAX} bytes")
                line += _exactly(sock, 1, deadline)
            return parse_v1(bytes(line))
        if V2_SIGNATURE.startswith(start):
            fixed = start + _exactly(sock, _V2_FIXED - len(start), deadline)
            if not fixed.startswith(V2_SIGNATURE):
                raise ProxyHeaderError("not a PROXY v2 signature")
            (length,) = struct.unpack("!H", fixed[14:16])
            if length > MAX_V2_PAYLOAD:
                raise ProxyHeaderError(f"a PROXY v2 header announcing {length} bytes, over {MAX_V2_PAYLOAD}")
            return parse_v2(fixed, _exactly(sock, length, deadline))
        raise ProxyHeaderError("no PROXY header: the connection began with other bytes")
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)


def peek_start(sock: socket.socket, timeout: float) -> bytes:
    """The first bytes a peer sent (up to 16), left in the socket; b"" if none came within `timeout`."""
    if not select.select([sock], [], [], timeout)[0]:
        return b""
    previous = sock.gettimeout()
    try:
        sock.settimeout(0)
        return sock.recv(_V2_FIXED, socket.MSG_PEEK)
    except OSError:
        return b""  # closed or reset: pynetdicom finds that out by itself
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)


class NothingSent(ConnectionError):
    """The peer closed the connection without sending a byte (a port probe)."""


def _exactly(sock: socket.socket, count: int, deadline: float, first: bool = False) -> bytes:
    data = bytearray()
    while len(data) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no whole PROXY header in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(count - len(data))
        except TimeoutError:  # socket.timeout is TimeoutError
            raise TimeoutError("no whole PROXY header in time") from None
        if not chunk:
            if first and not data:
                raise NothingSent("closed without a byte")
            raise ConnectionError("closed in the middle of its PROXY header")
        data += chunk
    return bytes(data)
