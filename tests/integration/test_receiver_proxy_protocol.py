"""The receiver behind a real HAProxy (TCP mode, ``send-proxy-v2`` and ``send-proxy``): it judges
senders by the address the PROXY header names, not the balancer's.

mi2b2's receiver runs in-process (`support.pipeline.Pipeline`, SQLite) with
``proxy_protocol_from = ["127.0.0.1"]``, the address HAProxy connects to it from. Senders are
pynetdicom SCUs bound to loopback aliases (every 127.0.0.0/8 address routes to lo on Linux):
127.0.0.2 and 127.0.0.4 are the PACS's configured addresses, 127.0.0.3 is not.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, Request
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.synthetic import write_study
from support import studies
from support.pacs import free_port
from support.pipeline import Pipeline, cache_files, retrieval_site, store_over
from support.pki import Pki, make_pki
from support.site import pacs_block

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy is not installed")

PACS_ADDRESS, OTHER_PACS_ADDRESS, STRANGER = "127.0.0.2", "127.0.0.4", "127.0.0.3"
BALANCER = "127.0.0.1"  # where HAProxy's connections to the receiver come from
HEADER_SECONDS = 5.0  # store_scp._PROXY_HEADER_SECONDS

HAPROXY = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend v2
    bind 127.0.0.1:{v2}
    default_backend v2
backend v2
    server receiver 127.0.0.1:{receiver} send-proxy-v2 check inter 300ms
frontend v1
    bind 127.0.0.1:{v1}
    default_backend v1
backend v1
    server receiver 127.0.0.1:{receiver} send-proxy check inter 300ms
"""


class Balancer:
    def __init__(self, v2: int, v1: int) -> None:
        self.v2, self.v1 = v2, v1


@pytest.fixture
def originals(tmp_path: Path) -> list[Path]:
    return write_study(studies.TRAUMA, tmp_path / "study")


def _site(tmp_path: Path, receiver_port: int, dicom_extra: str = "") -> Path:
    pacs = pacs_block("main", "PACS", 11199, f'addresses = ["{PACS_ADDRESS}", "{OTHER_PACS_ADDRESS}"]\n')
    return retrieval_site(tmp_path / "site", receiver_port, pacs, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                          dicom_extra=f'proxy_protocol_from = ["{BALANCER}"]\n' + dicom_extra)


@pytest.fixture
def balancer_for(tmp_path: Path) -> Iterator[Balancer]:
    """HAProxy in front of the receiver port the test's site names (started by `start`)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(receiver_port: int) -> Balancer:
        ports = Balancer(free_port(), free_port())
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY.format(v2=ports.v2, v1=ports.v1, receiver=receiver_port))
        checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        processes.append(subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdin=subprocess.DEVNULL,
                                          stdout=(tmp_path / "haproxy.log").open("wb"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10
        for port in (ports.v2, ports.v1):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
                    time.sleep(0.05)
        return ports

    yield start  # type: ignore[misc]  # the fixture hands out its starter
    for process in processes:
        process.terminate()
        process.wait(10)


def _in_flight(pipe: Pipeline) -> None:
    """A processing retrieval of the study from the PACS, as the worker leaves it when it starts one."""
    study = studies.TRAUMA
    with transaction(pipe.ctx.sessions) as session:
        session.add(Request(kind=RequestKind.RETRIEVE, batch_id="test", project_id="alpha", user_login="alice",
                            pacs_id="main", patient_id=study.patient_id, study_uid=studies.uid(study),
                            accession=study.accession, series_uids=[], priority=0, state=RequestState.PROCESSING,
                            waiting_reason="", expected_instances=2, expected_bytes=0,
                            created_at=pipe.ctx.clock.now(), worker="test"))


def _associate(port: int, bind: str, datasets: list[Dataset], calling_ae: str = "PACS",
               tls: ssl.SSLContext | None = None) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 10
    for ds in datasets[:1]:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", port, ae_title="MI2B2", bind_address=(bind, 0),
                        tls_args=(tls, "localhost") if tls is not None else None)


def _denials(pipe: Pipeline, expected: int, wait: float = 10) -> list[dict[str, object]]:
    """The receiver's audited refusals, once `expected` are there (and a moment more for any extra)."""
    deadline = time.monotonic() + wait
    while True:
        with pipe.ctx.sessions() as session:
            rows = list(session.scalars(select(AuditEvent).where(
                AuditEvent.action == "receive", AuditEvent.outcome == "denied").order_by(AuditEvent.seq)))
        if len(rows) >= expected or time.monotonic() > deadline:
            if len(rows) >= expected:
                time.sleep(0.5)
                with pipe.ctx.sessions() as session:
                    rows = list(session.scalars(select(AuditEvent).where(
                        AuditEvent.action == "receive", AuditEvent.outcome == "denied").order_by(AuditEvent.seq)))
            return [{"actor": row.actor, **json.loads(row.detail)} for row in rows]
        time.sleep(0.05)


def _v2_header(source: str, port: int = 40000) -> bytes:
    return (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", 12) + socket.inet_aton(source)
            + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 11112))


def _closed_by_receiver(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_receiver_judges_the_sender_behind_the_balancer(tmp_path: Path, originals: list[Path],
                                                            balancer_for, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="mi2b2.adapters.dicom.store_scp")
    receiver_port = free_port()
    with Pipeline(_site(tmp_path, receiver_port, "max_associations_per_peer = 1\n"), worker=False) as pipe:
        balancer = balancer_for(receiver_port)
        _in_flight(pipe)
        trauma = [pydicom.dcmread(path) for path in originals[:1]]
        stray = pydicom.dcmread(originals[0])
        stray.StudyInstanceUID = stray.SeriesInstanceUID = stray.SOPInstanceUID = "1.2.3.4.5.6.7"

        # A PACS's AE title through the balancer from an address not configured for it: refused, and the
        # audit names that address, not the balancer's.
        spoofed = _associate(balancer.v2, STRANGER, trauma)
        assert spoofed.is_rejected and not spoofed.is_established
        (refused,) = _denials(pipe, 1)
        assert refused["address"] == STRANGER and "association refused" in str(refused["reason"])

        # The PACS at its own address, through the balancer: admitted. An instance of no retrieval on the
        # same association is refused and audited with the PACS's real address.
        assert store_over(_associate(balancer.v2, PACS_ADDRESS, trauma), [*trauma, stray]) == [0x0000, 0x0124]
        assert pipe.sink.indexer.flush(10)
        assert len(cache_files(pipe.ctx.config.cache_dir())) == 1
        denials = _denials(pipe, 2)
        assert denials[1]["address"] == PACS_ADDRESS and denials[1]["actor"] == "dicom:PACS", denials
        ended = [r.getMessage() for r in caplog.records if r.getMessage().endswith("ended")]
        assert any(f"from PACS at {PACS_ADDRESS} ended" in line for line in ended), ended

        # The per-address limit counts the real source: one association from the PACS's address is all it
        # may hold (max_associations_per_peer = 1), while its other address still gets through.
        held = _associate(balancer.v2, PACS_ADDRESS, trauma)
        try:
            assert held.is_established
            second = _associate(balancer.v2, PACS_ADDRESS, trauma)
            assert second.is_rejected, "the limit did not count the PACS's own address"
            other = _associate(balancer.v2, OTHER_PACS_ADDRESS, trauma)
            assert other.is_established, "the limit counted the balancer's address"
            other.release()
        finally:
            held.release()

        # v1 (send-proxy) says the same.
        assert store_over(_associate(balancer.v1, PACS_ADDRESS, trauma), trauma) == [0x0000]
        assert _associate(balancer.v1, STRANGER, trauma).is_rejected
        denials = _denials(pipe, 3)
        assert denials[2]["address"] == STRANGER
        # HAProxy's health checks (every 300 ms on each line, with their own PROXY headers) were never
        # refusals, and each ended with its connection: none waits out the ACSE timeout, counted against
        # the receiver's 64 associations.
        assert len(denials) == 3, denials
        time.sleep(3)
        assert pipe.server is not None and pipe.server.open_associations <= 2


def test_a_forged_header_a_missing_one_and_a_silent_balancer_are_refused(
    tmp_path: Path, originals: list[Path], balancer_for,  # type: ignore[no-untyped-def]
) -> None:
    receiver_port = free_port()
    with Pipeline(_site(tmp_path, receiver_port), worker=False) as pipe:
        balancer = balancer_for(receiver_port)
        _in_flight(pipe)
        trauma = [pydicom.dcmread(path) for path in originals[:1]]

        # Straight to the receiver from an address that is no balancer, claiming to relay the PACS.
        with socket.create_connection(("127.0.0.1", receiver_port), timeout=10,
                                      source_address=(STRANGER, 0)) as forger:
            forger.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            forger.sendall(_v2_header(PACS_ADDRESS))
            assert _closed_by_receiver(forger, 5)
        (forged,) = _denials(pipe, 1)
        assert forged["address"] == STRANGER and forged["security"] is True
        assert "PROXY header from an address not in [dicom] proxy_protocol_from" in str(forged["reason"])

        # Plain DICOM from the balancer's address: a balancer without send-proxy would make every PACS look
        # like the balancer, so it is refused before the A-ASSOCIATE-RQ is read.
        direct = _associate(receiver_port, BALANCER, trauma)
        assert not direct.is_established and not direct.is_rejected
        missing = _denials(pipe, 2)[1]
        assert missing["address"] == BALANCER and "no PROXY header" in str(missing["reason"])
        assert "send-proxy-v2" in str(missing["reason"])

        # A connection from the balancer's address that says nothing holds its own thread only, and not
        # longer than the header's time limit: a sender behind the balancer gets through meanwhile.
        silent = socket.create_connection(("127.0.0.1", receiver_port), timeout=10, source_address=(BALANCER, 0))
        silent.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        try:
            assert store_over(_associate(balancer.v2, PACS_ADDRESS, trauma), trauma) == [0x0000]
            assert time.monotonic() - started < HEADER_SECONDS - 1
            assert _closed_by_receiver(silent, HEADER_SECONDS + 5)
            assert time.monotonic() - started >= HEADER_SECONDS - 0.5
        finally:
            silent.close()
        timed_out = _denials(pipe, 3)[2]
        assert timed_out["address"] == BALANCER and "no whole PROXY header within 5 s" in str(timed_out["reason"])

        # A plain sender from another address is judged as ever (no header expected, none needed).
        assert store_over(_associate(receiver_port, PACS_ADDRESS, trauma), trauma) == [0x0000]
        assert len(_denials(pipe, 3)) == 3


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def test_a_tls_receiver_reads_the_header_before_the_handshake(tmp_path: Path, originals: list[Path], pki: Pki,
                                                              balancer_for) -> None:  # type: ignore[no-untyped-def]
    receiver_port = free_port()
    tls = f'tls = {{ cert_file = "{pki.server_cert}", key_file = "{pki.server_key}", ca_file = "{pki.ca}" }}\n'
    with Pipeline(_site(tmp_path, receiver_port, tls), worker=False) as pipe:
        balancer = balancer_for(receiver_port)
        _in_flight(pipe)
        trauma = [pydicom.dcmread(path) for path in originals[:1]]
        client = ssl.create_default_context(cafile=str(pki.ca))
        client.load_cert_chain(pki.client_cert, pki.client_key)
        # HAProxy in TCP mode passes the TLS bytes through after its header.
        assert store_over(_associate(balancer.v2, PACS_ADDRESS, trauma, tls=client), trauma) == [0x0000]
        spoofed = _associate(balancer.v2, STRANGER, trauma, tls=client)
        assert spoofed.is_rejected
        (refused,) = _denials(pipe, 1)
        assert refused["address"] == STRANGER
