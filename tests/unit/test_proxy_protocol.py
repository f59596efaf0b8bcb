"""The PROXY protocol header (v1 and v2) as the receiver reads it: strictly, bounded, exactly.

Parsed from bytes, and read from real connected sockets (socketpair) where what follows
the header must stay unread for pynetdicom.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from mi2b2.adapters.dicom.proxy_protocol import (
    MAX_V2_PAYLOAD,
    NothingSent,
    ProxyHeader,
    ProxyHeaderError,
    ProxyTrust,
    looks_like_header,
    parse_v1,
    parse_v2,
    peek_start,
    read_header,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
ASSOCIATE_RQ = b"\x01\x00\x00\x00\x00\xcd"  # the first bytes of an A-ASSOCIATE-RQ PDU
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01"


def v2(command: int = 0x1, family: int = 0x1, transport: int = 0x1, addresses: bytes | None = None,
       length: int | None = None, version: int = 2) -> bytes:
    if addresses is None:
        addresses = bytes([127, 0, 0, 2]) + bytes([10, 0, 0, 1]) + struct.pack("!HH", 40000, 11112)
    size = len(addresses) if length is None else length
    return SIG + bytes([(version << 4) | command, (family << 4) | transport]) + struct.pack("!H", size) + addresses


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


# --- v1 --------------------------------------------------------------------------------------


def test_v1_tcp4_tcp6_and_unknown() -> None:
    assert parse_v1(b"PROXY TCP4 127.0.0.2 10.0.0.1 40000 11112\r\n") == ProxyHeader(1, ("127.0.0.2", 40000))
    assert parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 104\r\n") == ProxyHeader(1, ("2001:db8::7", 65535))
    # An IPv4 sender seen by a dual-stack balancer is judged by its IPv4 address.
    assert parse_v1(b"PROXY TCP6 ::ffff:10.2.3.4 ::1 1 2\r\n").source == ("10.2.3.4", 1)
    assert parse_v1(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None)
    assert parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == ProxyHeader(1, None)
    longest = b"PROXY UNKNOWN " + b"f" * (107 - 16) + b"\r\n"
    assert len(longest) == 107 and parse_v1(longest).source is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 127.0.0.2 10.0.0.1 40000 11112\n",  # LF only
    b"PROXY TCP4 127.0.0.2 10.0.0.1 40000 11112",  # no end
    b"PROXY TCP4 127.0.0.2 10.0.0.1 40000\r\n",  # a port missing
    b"PROXY TCP4 127.0.0.2 10.0.0.1 40000 11112 7\r\n",  # a field too many
    b"PROXY TCP4  127.0.0.2 10.0.0.1 40000 11112\r\n",  # two spaces
    b"PROXY TCP4 127.0.0.2 10.0.0.1 65536 11112\r\n",  # port out of range
    b"PROXY TCP4 127.0.0.2 10.0.0.1 +4000 11112\r\n",  # sign
    b"PROXY TCP4 127.0.0.2 10.0.0.1 04000 11112\r\n",  # leading zero
    b"PROXY TCP4 127.0.0.2 10.0.0.1 \xd9\xa1 11112\r\n",  # a non-ASCII digit int() would take
    b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 11112\r\n",  # IPv6 under TCP4
    b"PROXY TCP6 127.0.0.2 ::1 40000 11112\r\n",  # IPv4 under TCP6
    b"PROXY TCP4 127.0.0.002 10.0.0.1 40000 11112\r\n",  # octal-looking
    b"PROXY TCP4 localhost 10.0.0.1 40000 11112\r\n",  # a name
    b"PROXY UDP4 127.0.0.2 10.0.0.1 40000 11112\r\n",
    b"PROXY tcp4 127.0.0.2 10.0.0.1 40000 11112\r\n",
    b"PROXY TCP4 127.0.0.2\r\n10.0.0.1 40000 11112\r\n",  # CRLF inside
    b"PROXY UNKNOWN " + b"f" * 100 + b"\r\n",  # over 107 bytes
    b"PROXZ TCP4 127.0.0.2 10.0.0.1 40000 11112\r\n",
])
def test_malformed_v1_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_v1(line)


# --- v2 --------------------------------------------------------------------------------------


def test_v2_proxy_ipv4_ipv6_local_and_unspecified() -> None:
    header = v2()
    assert parse_v2(header[:16], header[16:]) == ProxyHeader(2, ("127.0.0.2", 40000))
    six = bytes(15) + b"\x07" + bytes(15) + b"\x01" + struct.pack("!HH", 104, 11112)
    header = v2(family=0x2, addresses=six)
    assert parse_v2(header[:16], header[16:]) == ProxyHeader(2, ("::7", 104))
    with_tlvs = v2(addresses=v2()[16:] + b"\x05\x00\x04abcd")  # PP2_TYPE_UNIQUE_ID, ignored
    assert parse_v2(with_tlvs[:16], with_tlvs[16:]).source == ("127.0.0.2", 40000)
    local = v2(command=0x0, family=0x0, transport=0x0, addresses=b"")  # HAProxy's health check
    assert parse_v2(local[:16], local[16:]) == ProxyHeader(2, None)
    unspecified = v2(family=0x0, transport=0x0, addresses=b"")
    assert parse_v2(unspecified[:16], unspecified[16:]).source is None


@pytest.mark.parametrize("header", [
    v2(version=1),
    v2(command=0x2),
    v2(family=0x4),
    v2(transport=0x2),  # UDP
    v2(addresses=bytes(11)),  # too short for two IPv4 addresses and ports
    v2(family=0x2),  # IPv6 family with IPv4-sized addresses
])
def test_malformed_v2_headers_are_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_v2(header[:16], header[16:])


# --- from a socket -----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [v2(), b"PROXY TCP4 127.0.0.2 10.0.0.1 40000 11112\r\n"])
@pytest.mark.parametrize("then", [ASSOCIATE_RQ, CLIENT_HELLO])
def test_reading_takes_the_header_and_not_a_byte_more(pair: tuple[socket.socket, socket.socket], header: bytes,
                                                      then: bytes) -> None:
    ours, theirs = pair
    theirs.sendall(header + then)
    assert read_header(ours, 2).source == ("127.0.0.2", 40000)
    assert ours.recv(100) == then
    assert ours.gettimeout() is None  # blocking again, as pynetdicom expects


def test_a_header_sent_in_pieces_is_read_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    whole = v2() + ASSOCIATE_RQ

    def dribble() -> None:
        for byte in whole:
            theirs.sendall(bytes([byte]))
            time.sleep(0.002)

    sender = threading.Thread(target=dribble)
    sender.start()
    assert read_header(ours, 5).source == ("127.0.0.2", 40000)
    sender.join()
    assert ours.recv(100) == ASSOCIATE_RQ


@pytest.mark.parametrize("sent", [
    ASSOCIATE_RQ,  # plain DICOM from the balancer's address: no header
    CLIENT_HELLO,
    b"PROXY UNKNOWN " + b"x" * 200,  # a v1 line that never ends within 107 bytes
    v2(length=MAX_V2_PAYLOAD + 1)[:16],  # v2 announcing more than the bound
    SIG[:11] + b"X" + bytes(4),  # a broken v2 signature
])
def test_what_is_no_valid_header_is_refused_without_waiting(pair: tuple[socket.socket, socket.socket],
                                                             sent: bytes) -> None:
    ours, theirs = pair
    theirs.sendall(sent)
    started = time.monotonic()
    with pytest.raises(ProxyHeaderError):
        read_header(ours, 5)
    assert time.monotonic() - started < 1


def test_a_huge_v2_length_is_refused_before_reading_it(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(v2(length=65535)[:16] + b"A" * 100)
    with pytest.raises(ProxyHeaderError, match="65535 bytes"):
        read_header(ours, 5)
    assert ours.recv(200) == b"A" * 100  # nothing of the announced payload was read


def test_a_silent_or_incomplete_header_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read_header(ours, 0.3)
    theirs.sendall(b"PROXY TCP4 127.0.0.2")  # never finished
    with pytest.raises(TimeoutError):
        read_header(ours, 0.3)
    assert time.monotonic() - started < 2


def test_a_peer_closing_without_a_byte_is_a_port_probe(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()
    with pytest.raises(NothingSent):
        read_header(ours, 2)


def test_a_peer_closing_mid_header_is_not_a_probe(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(v2()[:20])
    theirs.close()
    with pytest.raises(ConnectionError) as raised:
        read_header(ours, 2)
    assert not isinstance(raised.value, NothingSent)


# --- who must, and who must not, send one --------------------------------------------------------


def test_peeking_leaves_the_bytes_and_tells_a_header_from_dicom(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    assert peek_start(ours, 0.1) == b""
    theirs.sendall(ASSOCIATE_RQ)
    start = peek_start(ours, 1)
    assert start == ASSOCIATE_RQ and not looks_like_header(start)
    assert ours.recv(100) == ASSOCIATE_RQ
    assert not looks_like_header(CLIENT_HELLO) and not looks_like_header(b"")
    for forged in (v2(), b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"P", b"PROX", SIG[:3]):
        assert looks_like_header(forged), forged


def test_trust_is_by_address_or_network() -> None:
    trust = ProxyTrust.of(["10.0.0.5", "10.1.0.0/24", "2001:db8::/64"])
    assert trust.is_balancer("10.0.0.5") and trust.is_balancer("10.1.0.77") and trust.is_balancer("2001:db8::9")
    assert trust.is_balancer("::ffff:10.0.0.5")  # a dual-stack listener's view of the balancer
    assert not trust.is_balancer("10.0.0.6") and not trust.is_balancer("10.1.1.1") and not trust.is_balancer("")
    assert not ProxyTrust.of([]) and trust
