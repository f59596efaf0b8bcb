"""The RFC 5424 message and its TCP frame, byte for byte."""

from __future__ import annotations

import re
import socket
import threading
from datetime import UTC, datetime

import pytest

from mi2b2.adapters.syslog import rfc5424_message, send
from mi2b2.config import SyslogTarget

AT = datetime(2026, 12, 4, 21, 30, 0, 123456, tzinfo=UTC)
LINE = '{"seq":7,"hash":"ab","at":"2026-12-04T21:30:00.123456Z","keyed_from":1,"mac":"cd"}'


def test_the_header_names_mi2b2_the_msgid_and_the_log_audit_facility() -> None:
    message = rfc5424_message("audit-checkpoint", LINE, AT, hostname="gw 1\x00").decode()
    assert re.fullmatch(r"<109>1 2026-12-04T21:30:00\.123456Z gw1 mi2b2 \d+ audit-checkpoint - (.*)", message)
    assert message.endswith(" - " + LINE)


@pytest.mark.parametrize("text", ["a\nb", "a\rb", "a\x00b"])
def test_a_second_record_cannot_be_smuggled_into_one_message(text: str) -> None:
    with pytest.raises(ValueError, match="one line"):
        rfc5424_message("audit-checkpoint", text, AT)


def test_tcp_sends_one_octet_counted_frame_and_nothing_else() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        received: list[bytes] = []

        def accept() -> None:
            connection, _ = server.accept()
            with connection:
                chunks = []
                while chunk := connection.recv(65536):
                    chunks.append(chunk)
                received.append(b"".join(chunks))

        reader = threading.Thread(target=accept)
        reader.start()
        message = rfc5424_message("audit-checkpoint", LINE, AT)
        send(SyslogTarget("tcp", "127.0.0.1", server.getsockname()[1]), message)
        reader.join(timeout=10)
    assert received == [str(len(message)).encode() + b" " + message]


def test_a_closed_port_is_an_oserror_for_the_caller_to_report() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        send(SyslogTarget("tcp", "127.0.0.1", port), rfc5424_message("audit-checkpoint", LINE, AT))


def test_an_atna_message_is_marked_utf8_with_a_bom() -> None:
    message = rfc5424_message("IHE+RFC-3881", "<AuditMessage UserName=\"Zoë\"/>", AT, hostname="gw1", utf8=True)
    header, _, body = message.partition(b" - ")
    assert header.endswith(b" IHE+RFC-3881") and body == b"\xef\xbb\xbf" + '<AuditMessage UserName="Zoë"/>'.encode()


def test_udp_refuses_a_message_no_datagram_can_carry() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        target = SyslogTarget("udp", "127.0.0.1", receiver.getsockname()[1])
        with pytest.raises(OSError, match="too large for one UDP datagram"):
            send(target, b"x" * 70000)
        send(target, b"<109>1 - - - - - - one datagram")
        receiver.settimeout(5)
        assert receiver.recv(65536) == b"<109>1 - - - - - - one datagram", "no framing over UDP (RFC 5426)"
