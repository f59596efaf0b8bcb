"""DICOM fuzzing of `mi2b2 receiver` running as its own process, bounded in count and time.

Raw sockets for PDU-level abuse (PS3.8 9.3 layouts: malformed, truncated, lying lengths up
to 4 GiB, unknown types, a slow sender, an idle one, a flood of associations from one
address); pynetdicom for data-set-level abuse (garbage data sets, wrong presentation
contexts), with hypothesis generating the garbage. Afterwards the receiver must still
take a proper C-STORE (DCMTK storescu), have nothing in `.incoming`, and its resident
memory must have stayed bounded.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode

import mi2b2
from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.config import load_config
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.services.context import build_context
from mi2b2.synthetic import write_study
from support import studies
from support.pacs import free_port
from support.site import pacs_block, write_site

NETWORK_TIMEOUT = 1.5  # seconds, the receiver's [dicom] network_timeout in this site
PER_PEER = 4
SRC = Path(mi2b2.__file__).resolve().parents[1]  # the code under test, absolute: the child must run it too
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


@dataclass
class Receiver:
    process: subprocess.Popen[bytes]
    port: int
    site: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def incoming(self) -> list[Path]:
        folder = self.site.parent / "cache" / ".incoming"
        return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    folder = tmp_path_factory.mktemp("fuzzed")
    port = free_port()
    site = write_site(folder, pacs_blocks=pacs_block("main", "PACS", 11198), dicom_port=port,
                      dicom_extra=f"network_timeout = {NETWORK_TIMEOUT}\nmax_associations_per_peer = {PER_PEER}")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    log = (folder / "receiver.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "mi2b2", "receiver", "--config", str(site)], cwd=folder,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert process.poll() is None, (folder / "receiver.log").read_text()
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.1)
        yield Receiver(process, port, site)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- PS3.8 PDUs by hand ----------------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: str = "PACS", called: str = "MI2B2", abstract: str = CTImageStorage,
                 transfer: str = ExplicitVRLittleEndian, max_pdu: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) with one presentation context (ID 1)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode()) + _item(0x40, transfer.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, header: int, data: bytes) -> bytes:
    item = struct.pack(">IBB", len(data) + 2, context_id, header) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _established(port: int) -> socket.socket:
    sock = _connect(port)
    sock.sendall(associate_rq())
    reply = sock.recv(6)
    assert reply[:1] == b"\x02", f"association not accepted: {reply!r}"
    _read_exactly(sock, struct.unpack(">I", reply[2:6])[0])
    return sock


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _ends_within(sock: socket.socket, seconds: float) -> float:
    """Read (and drop) whatever the receiver sends until it closes; how long that took."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"the receiver kept the connection open for more than {seconds} s") from None
    finally:
        sock.close()
    return time.monotonic() - started


# --- the attacks --------------------------------------------------------------------------------


def test_fuzzing_leaves_the_receiver_working_clean_and_small(receiver: Receiver, tmp_path: Path) -> None:
    started = time.monotonic()
    rss_before = receiver.rss_kib()
    port = receiver.port

    # Before any association: garbage, an unknown PDU type, a truncated request, 4 GiB claims.
    for payload in [os.urandom(300), b"\x09\x00" + struct.pack(">I", 20) + bytes(20), associate_rq()[:40],
                    b"\x01\x00\xff\xff\xff\xff" + bytes(1000), b"\x01\x00\x00\x10\x00\x00" + bytes(1000)]:
        sock = _connect(port)
        sock.sendall(payload)
        if payload == associate_rq()[:40]:
            sock.shutdown(socket.SHUT_WR)
        _ends_within(sock, NETWORK_TIMEOUT + 5)

    # Established, then: a P-DATA-TF claiming 4 GiB, an item longer than its PDU, a data set on a
    # context never negotiated, an unknown PDU type.
    for payload in [b"\x04\x00\xff\xff\xff\xf0" + os.urandom(4096),
                    b"\x04\x00\x00\x00\x00\x10" + struct.pack(">IBB", 5000, 1, 3) + bytes(10),
                    p_data(99, 0x00, os.urandom(2000)) + p_data(99, 0x02, os.urandom(10)),
                    b"\x0a\x00\x00\x00\x00\x02\x00\x00"]:
        sock = _established(port)
        sock.sendall(payload)
        _ends_within(sock, NETWORK_TIMEOUT + 5)

    # A slow sender: one byte of a PDU at a time, each well inside the timeout, never finishing.
    sock = _established(port)
    sock.sendall(b"\x04\x00\x00\x00\x04\x00")
    trickle_started = time.monotonic()
    with pytest.raises(OSError):
        for _ in range(40):
            sock.send(b"\x00")
            time.sleep(NETWORK_TIMEOUT / 4)
            if sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                raise ConnectionResetError
    assert time.monotonic() - trickle_started < NETWORK_TIMEOUT + 3
    sock.close()

    # An idle association is aborted after the network timeout.
    assert _ends_within(_established(port), NETWORK_TIMEOUT + 5) < NETWORK_TIMEOUT + 4

    # One address may hold PER_PEER associations at once; the next is refused (A-ASSOCIATE-RJ, 0x03).
    time.sleep(NETWORK_TIMEOUT)  # the threads of the associations above wind down
    held = [_established(port) for _ in range(PER_PEER)]
    extra = _connect(port)
    extra.sendall(associate_rq())
    assert extra.recv(1) == b"\x03"
    extra.close()
    for sock in held:
        sock.close()

    _garbage_data_sets(port)
    assert time.monotonic() - started < 50

    # Still working: a proper C-STORE for a study in flight is taken, from a real sender.
    _proper_store_is_accepted(receiver, tmp_path)
    time.sleep(NETWORK_TIMEOUT)
    assert receiver.incoming() == []
    assert receiver.process.poll() is None
    assert receiver.rss_kib() - rss_before < 80 * 1024, (rss_before, receiver.rss_kib())


def _garbage_data_sets(port: int) -> None:
    """C-STORE requests encoded by pynetdicom around garbage data sets, over raw associations."""
    statuses: list[int] = []

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(min_size=0, max_size=70_000), st.sampled_from(["dicm", "raw"]))
    def send(garbage: bytes, shape: str) -> None:
        data = (bytes(128) + b"DICM" + garbage) if shape == "dicm" else garbage
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, str(generate_uid())
        request.DataSet = io.BytesIO(data)
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        sock = _established(port)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for primitive in message.encode_msg(1, 16384):
                    ((context_id, fragment),) = primitive.presentation_data_value_list
                    sock.sendall(p_data(context_id, fragment[0], fragment[1:]))
            statuses.append(_store_status(sock))
        finally:
            sock.close()

    send()
    assert statuses and all(status != 0x0000 for status in statuses)


def _store_status(sock: socket.socket) -> int:
    """The Status of the C-STORE-RSP the receiver sends back (one P-DATA-TF, one command PDV);
    -1 for an A-ABORT (a message the receiver cannot follow, e.g. a data set promised and never sent)."""
    sock.settimeout(NETWORK_TIMEOUT + 5)
    header = _read_exactly(sock, 6)
    if header[:1] == b"\x07":
        return -1
    assert header[:1] == b"\x04", f"no C-STORE response: {header!r}"
    body = _read_exactly(sock, struct.unpack(">I", header[2:6])[0])
    command = decode(io.BytesIO(body[6:]), True, True)
    return int(command.Status)


def _proper_store_is_accepted(receiver: Receiver, tmp_path: Path) -> None:
    (file,) = write_study(studies.TRAUMA, tmp_path / "study")[:1]
    ctx = build_context(load_config(receiver.site))
    try:
        with transaction(ctx.sessions) as session:
            study = studies.TRAUMA
            session.add(Request(kind=RequestKind.RETRIEVE, batch_id="fuzz", project_id="alpha", user_login="alice",
                                pacs_id="main", patient_id=study.patient_id, study_uid=studies.uid(study),
                                accession=study.accession, series_uids=[], priority=0, state=RequestState.PROCESSING,
                                waiting_reason="", expected_instances=1, expected_bytes=0,
                                created_at=ctx.clock.now(), worker="test"))
    finally:
        ctx.engine.dispose()
    sent = subprocess.run(["storescu", "-v", "-aet", "PACS", "-aec", "MI2B2", "127.0.0.1", str(receiver.port), str(file)],
                          env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=30)
    assert "Received Store Response (Success)" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
    cached = [p for p in (receiver.site.parent / "cache").rglob("*.dcm") if ".incoming" not in p.parts]
    assert [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in cached] == [
        pydicom.dcmread(file, stop_before_pixels=True).SOPInstanceUID]
