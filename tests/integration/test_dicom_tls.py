"""DICOM TLS against real peers: Orthanc as a TLS PACS (C-ECHO, C-FIND, and C-MOVE into
mi2b2's TLS receiver), DCMTK storescu/findscu/storescp with +tls, and the doors: a
certificate from another CA, none at all, or plain DICOM on a TLS port.

The PKI is made by the test with openssl (support/pki.py): "Test CA" issues every
certificate the site trusts; "Other CA" issues the impostor's.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import textwrap
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import AuditEvent
from mi2b2.adapters.dicom.errors import PacsTimeout, TlsHandshakeFailed, TlsSettingsUnusable
from mi2b2.adapters.dicom.scu import DicomPeer, FindSession, LocalAE, echo
from mi2b2.adapters.dicom.store_receipt import ReceivedInstance, ReceiveLimits
from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.adapters.dicom.tls import TlsClient, TlsServer, client_context, server_context
from mi2b2.services.forward import add_forwards
from mi2b2.services.pacs import echo_pacs
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.services.search import search_studies
from mi2b2.synthetic import SyntheticStudy, write_study
from support import studies
from support.pacs import RunningPacs, free_port, start_orthanc, start_storescp
from support.pipeline import ALICE, Pipeline, by_sop, cache_files, retrieval_site, same_instance
from support.pki import Pki, make_pki
from support.site import pacs_block
from support.viewing import place

pytestmark = pytest.mark.pacs

ORTHANC_AE = "ORTHANCTLS"


@dataclass
class TlsPacs:
    orthanc: RunningPacs
    receiver_port: int  # where Orthanc sends its C-MOVEs, over TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# Instances of 128 KiB: several PDUs each, every PDU many TLS records.
BIG = SyntheticStudy(patient_id="77", patient_name="TEST^BIG", birth_date="19700101", sex="M", accession="ACC-TLS",
                     study_date="20240101", modality="CT", description="big CT", series_count=1,
                     instances_per_series=8, rows=256, cols=256)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(studies.TRAUMA, tmp_path_factory.mktemp("originals"))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_study(BIG, tmp_path_factory.mktemp("big"))


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory: pytest.TempPathFactory, pki: Pki, originals: list[Path],
             big: list[Path]) -> Iterator[TlsPacs]:
    """Orthanc speaking DICOM TLS only, requiring client certificates from Test CA."""
    receiver_port = free_port()
    orthanc = start_orthanc(tmp_path_factory.mktemp("orthanc-tls"), ae_title=ORTHANC_AE, extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server_cert),
        "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
        "DicomModalities": {"MI2B2": {"AET": "MI2B2", "Host": "127.0.0.1", "Port": receiver_port,
                                      "UseDicomTls": True}},
    })
    try:
        for path in originals + big:  # over HTTP: its DICOM port speaks TLS only
            upload = urllib.request.Request(f"{orthanc.http_url}/instances", data=path.read_bytes(), method="POST")
            with urllib.request.urlopen(upload, timeout=10) as response:
                assert json.load(response)["Status"] in ("Success", "AlreadyStored")
        yield TlsPacs(orthanc, receiver_port)
    finally:
        orthanc.stop()


def _tls_table(ca: Path, cert: Path | None = None, key: Path | None = None, extra: str = "") -> str:
    pair = f', cert_file = "{cert}", key_file = "{key}"' if cert and key else ""
    return f'tls = {{ ca_file = "{ca}"{pair}{extra} }}'


def _site(folder: Path, pki: Pki, tls_pacs: TlsPacs, pacs_ca: Path, retrieve: str = "c-move") -> Path:
    pacs = pacs_block("main", ORTHANC_AE, tls_pacs.orthanc.port, f'retrieve = "{retrieve}"\n'
                      + _tls_table(pacs_ca, pki.client_cert, pki.client_key) + "\n" + textwrap.dedent("""
        [institutions.departments.pacs.retries]
        max_attempts = 3
        first_delay = 0.3
        max_delay = 0.5
    """))
    receiver = (f'tls = {{ cert_file = "{pki.server_cert}", key_file = "{pki.server_key}", ca_file = "{pki.ca}", '
                "require_client_cert = true }")
    return retrieval_site(folder, tls_pacs.receiver_port, pacs, dicom_extra=receiver)


def _dcmtk(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, TCP_NODELAY="1"))


def _eventually(read: Callable[[], list[str]], count: int, timeout: float = 10.0) -> list[str]:
    """What `read` gives once it holds `count` items: refusals are recorded on the receiver's threads."""
    deadline = time.monotonic() + timeout
    while len(items := read()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return items


def _security_events(pipe: Pipeline) -> list[dict[str, object]]:
    with pipe.ctx.sessions() as session:
        details = session.execute(select(AuditEvent.detail).order_by(AuditEvent.seq)).scalars().all()
    return [d for d in (json.loads(text) for text in details if text) if d.get("security")]


def test_find_and_move_from_orthanc_into_the_tls_receiver(tmp_path: Path, pki: Pki, tls_pacs: TlsPacs,
                                                          originals: list[Path], big: list[Path]) -> None:
    with Pipeline(_site(tmp_path, pki, tls_pacs, pki.ca)) as pipe:
        (report,) = echo_pacs(pipe.ctx.config)  # `mi2b2 pacs check`
        assert report.reachable and report.address.endswith("(DICOM TLS)"), report.problem

        found = search_studies(pipe.ctx, ALICE, "alpha", "main", studies.TRAUMA.patient_id)  # C-FIND over TLS
        assert sorted(s.study_uid for s in found.studies) == sorted([studies.uid(studies.TRAUMA), studies.uid(BIG)])

        picks = [StudyPick(studies.uid(studies.TRAUMA)), StudyPick(studies.uid(BIG))]
        created = add_requests(pipe.ctx, ALICE, "alpha", "main", picks).created
        rows = pipe.wait(created, timeout=30)  # Orthanc C-STOREs into our receiver as a TLS client
        assert [(r.state, r.received, r.expected_instances) for r in rows] == [("completed", 2, 2),
                                                                              ("completed", 8, 8)], rows
        received = by_sop(cache_files(pipe.ctx.config.cache_dir()))
        assert sorted(received) == sorted(by_sop(originals + big))
        for sop, original in by_sop(originals + big).items():
            assert same_instance(original, received[sop])

        # An impostor with a certificate from another CA, and plain DICOM: refused, audited, nothing stored.
        impostor = _dcmtk("storescu", "+tls", str(pki.other_key), str(pki.other_cert), "+cf", str(pki.ca),
                          "-aet", ORTHANC_AE, "-aec", "MI2B2", "127.0.0.1", str(tls_pacs.receiver_port),
                          str(originals[0]))
        assert impostor.returncode != 0
        plain = _dcmtk("storescu", "-aet", ORTHANC_AE, "-aec", "MI2B2", "127.0.0.1", str(tls_pacs.receiver_port),
                       str(originals[0]))
        assert plain.returncode != 0
        refusals = _eventually(lambda: [str(d["reason"]) for d in _security_events(pipe)], 2)
        assert sorted(refusals) == ["TLS connection refused: certificate verify failed (unable to get local issuer "
                                    "certificate)", "TLS connection refused: not a TLS 1.2+ client (wrong version "
                                    "number)"], refusals
        assert len(cache_files(pipe.ctx.config.cache_dir())) == len(originals + big)


def test_get_over_tls_from_orthanc(tmp_path: Path, pki: Pki, tls_pacs: TlsPacs, big: list[Path]) -> None:
    """C-GET: Orthanc sends the instances back on our own TLS association, read by the receiver's PDU reader."""
    with Pipeline(_site(tmp_path, pki, tls_pacs, pki.ca, retrieve="c-get"), receiver=False) as pipe:
        created = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(BIG))]).created
        (row,) = pipe.wait(created, timeout=30)
        assert (row.state, row.received, row.expected_instances) == ("completed", 8, 8), row.last_error
        received = by_sop(cache_files(pipe.ctx.config.cache_dir()))
        assert sorted(received) == sorted(by_sop(big))
        for sop, original in by_sop(big).items():
            assert same_instance(original, received[sop])


def test_a_pacs_certificate_from_another_ca_is_a_clear_error(tmp_path: Path, pki: Pki, tls_pacs: TlsPacs) -> None:
    site = _site(tmp_path, pki, tls_pacs, pki.ca)
    with Pipeline(site, worker=False, receiver=False) as queued:  # queued while the site still trusted Test CA
        created = add_requests(queued.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(studies.TRAUMA))]).created
    # The PACS's CA (not the receiver's) becomes Other CA: the PACS now looks like an impostor.
    site.write_text(site.read_text().replace(f'ca_file = "{pki.ca}", cert_file', f'ca_file = "{pki.other_ca}", cert_file'))
    with Pipeline(site) as pipe:
        (report,) = echo_pacs(pipe.ctx.config)
        assert not report.reachable
        assert "TLS handshake with PACS ORTHANCTLS@127.0.0.1" in report.problem
        assert "certificate verify failed" in report.problem and "pacs['main'].tls.ca_file" in report.problem

        with pytest.raises(TlsHandshakeFailed, match=r"its certificate is not issued by a CA in pacs\['main'\]"):
            search_studies(pipe.ctx, ALICE, "alpha", "main", studies.TRAUMA.patient_id)

        (row,) = pipe.wait(created, timeout=30)  # permanent: no retries against an untrusted certificate
        assert row.state == "failed" and row.attempts == 1
        assert (row.last_error or "").startswith("TLS handshake with PACS ORTHANCTLS@127.0.0.1")
        assert "put the CA that issued the PACS's certificate in that file" in (row.last_error or "")
        assert "Traceback" not in (row.last_error or "")
        # Both audited as security events: the search (by the find opener) and the request's end.
        events = _security_events(pipe)
        assert sorted((str(e.get("event")), str(e.get("request"))) for e in events) == [
            ("None", "None"), ("failed", str(created[0]))], events
        assert all("certificate verify failed" in str(e.get("reason")) for e in events)


def test_a_server_name_the_certificate_does_not_carry_is_named(tmp_path: Path, pki: Pki, tls_pacs: TlsPacs) -> None:
    peer = DicomPeer(ORTHANC_AE, "127.0.0.1", tls_pacs.orthanc.port, connect_timeout=2, acse_timeout=5,
                     tls=TlsClient(pki.ca, pki.client_cert, pki.client_key, server_name="pacs.example.org",
                                   setting="pacs['main'].tls"))
    with pytest.raises(TlsHandshakeFailed, match=r"does not name 'pacs.example.org'; set pacs\['main'\].tls.server_name"):
        FindSession(LocalAE("MI2B2"), peer).find("study", "STUDY", {"PatientID": "77", "StudyInstanceUID": ""})
    # Orthanc wants a client certificate: without one it ends the handshake, and we say what is missing.
    anonymous = DicomPeer(ORTHANC_AE, "127.0.0.1", tls_pacs.orthanc.port, connect_timeout=2, acse_timeout=5,
                          tls=TlsClient(pki.ca, setting="pacs['main'].tls"))
    with pytest.raises(TlsHandshakeFailed, match=r"requires a client certificate \(mutual TLS\); set "
                                                 r"pacs\['main'\].tls.cert_file and key_file"):
        FindSession(LocalAE("MI2B2"), anonymous).find("study", "STUDY", {"PatientID": "77", "StudyInstanceUID": ""})


def test_findscu_with_tls_against_orthanc(pki: Pki, tls_pacs: TlsPacs) -> None:
    """The test PKI and Orthanc's TLS are what DCMTK expects too: a third implementation agrees."""
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=77", "-k", "StudyInstanceUID"]
    good = _dcmtk("findscu", "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca), "-aec",
                  ORTHANC_AE, *query, "127.0.0.1", str(tls_pacs.orthanc.port))
    assert good.returncode == 0 and studies.uid(studies.TRAUMA) in good.stderr + good.stdout, good.stderr
    wrong = _dcmtk("findscu", "+tls", str(pki.other_key), str(pki.other_cert), "+cf", str(pki.ca), "-aec",
                   ORTHANC_AE, *query, "127.0.0.1", str(tls_pacs.orthanc.port))
    assert wrong.returncode != 0 and studies.uid(studies.TRAUMA) not in wrong.stderr + wrong.stdout


class _Keep:
    """A sink that keeps everything, and hears of TLS refusals."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.refusals: list[tuple[str, str]] = []

    def accept(self, instance: ReceivedInstance) -> int:
        os.replace(instance.path, self.folder / f"{instance.header.sop_instance_uid}.dcm")
        return 0x0000

    def tls_refused(self, address: str, reason: str) -> None:
        self.refusals.append((address, reason))


def _old_tls_client(port: int, pki: Pki) -> None:
    """A TLS 1.1 client with a good certificate: refused for its protocol version alone."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # an outdated client, on purpose
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not even offer TLS 1.1 otherwise
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost"):
            pass


def test_storescu_with_tls_into_the_receiver(tmp_path: Path, pki: Pki, originals: list[Path]) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    sink = _Keep(kept)
    tls = TlsServer(pki.server_cert, pki.server_key, pki.ca, require_client_cert=True)
    limits = ReceiveLimits(network_timeout=3)
    with StoreServer(LocalAE("MI2B2"), "127.0.0.1", 0, sink, tmp_path / "incoming", limits, tls=tls) as server:
        port = str(server.port)
        # A client that connects and says nothing holds only its own thread, for the handshake's time limit:
        # everyone else still gets through meanwhile.
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        silent.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        good = _dcmtk("storescu", "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca),
                      "-aec", "MI2B2", "127.0.0.1", port, *map(str, originals))
        assert good.returncode == 0, good.stderr
        assert sorted(p.stem for p in kept.iterdir()) == sorted(by_sop(originals))

        wrong_ca = _dcmtk("storescu", "+tls", str(pki.other_key), str(pki.other_cert), "+cf", str(pki.ca),
                          "-aec", "MI2B2", "127.0.0.1", port, str(originals[0]))
        no_cert = _dcmtk("storescu", "+tla", "+cf", str(pki.ca), "-aec", "MI2B2", "127.0.0.1", port,
                         str(originals[0]))
        plain = _dcmtk("storescu", "-aec", "MI2B2", "127.0.0.1", port, str(originals[0]))
        distrusting = _dcmtk("storescu", "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.other_ca),
                             "-aec", "MI2B2", "127.0.0.1", port, str(originals[0]))
        assert [r.returncode != 0 for r in (wrong_ca, no_cert, plain, distrusting)] == [True] * 4
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            _old_tls_client(server.port, pki)
        # A port probe (a load balancer's health check) is no refusal.
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as probe:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reasons = sorted(_eventually(lambda: [reason for _, reason in sink.refusals], 6))
        assert silent.recv(1) == b""  # dropped after the handshake's time limit
        silent.close()
    assert reasons[:5] == ["certificate verify failed (unable to get local issuer certificate)",
                           "no answer during the handshake", "no client certificate",
                           "not a TLS 1.2+ client (unsupported protocol)",
                           "not a TLS 1.2+ client (wrong version number)"], reasons
    assert reasons[5].startswith("the sender refused the receiver's certificate"), reasons
    assert len(sink.refusals) == 6  # the probe is not among them
    assert sorted(p.stem for p in kept.iterdir()) == sorted(by_sop(originals))  # nothing more kept
    assert not any((tmp_path / "incoming").iterdir())


def test_forward_to_a_tls_destination(tmp_path: Path, pki: Pki, originals: list[Path]) -> None:
    storescp = start_storescp(tmp_path / "storescp", tls=(pki.server_key, pki.server_cert, pki.ca))
    try:
        destinations = textwrap.dedent(f"""
            [[destinations]]
            id = "secure"
            ae_title = "DEST"
            host = "127.0.0.1"
            port = {storescp.port}
            {_tls_table(pki.ca, pki.client_cert, pki.client_key)}

            [[destinations]]
            id = "impostor"
            ae_title = "DEST"
            host = "127.0.0.1"
            port = {storescp.port}
            {_tls_table(pki.other_ca, pki.client_cert, pki.client_key)}
        """)
        site = retrieval_site(tmp_path / "site", free_port(), pacs_block("main", "PACS", 11113),
                              projects=destinations)
        with Pipeline(site, receiver=False) as pipe:
            for path in originals:
                place(pipe.ctx, "alpha", path)
            uid = studies.uid(studies.TRAUMA)
            good = add_forwards(pipe.ctx, ALICE, "alpha", "secure", [uid]).created
            bad = add_forwards(pipe.ctx, ALICE, "alpha", "impostor", [uid]).created
            ok_row, bad_row = pipe.wait(good + bad, timeout=30)
            assert (ok_row.state, ok_row.received) == ("completed", 2), ok_row.last_error
            assert bad_row.state == "failed"
            assert "TLS handshake with destination DEST@127.0.0.1" in (bad_row.last_error or "")
            assert "destinations['impostor'].tls.ca_file" in (bad_row.last_error or "")
            assert [e["destination"] for e in _security_events(pipe)] == ["impostor"]
        arrived = sorted((storescp.workdir / "received").iterdir())
        assert sorted(by_sop(arrived)) == sorted(by_sop(originals))
    finally:
        storescp.stop()


def test_unusable_tls_files_name_the_setting_and_never_prompt(tmp_path: Path, pki: Pki) -> None:
    mismatched = TlsClient(pki.ca, pki.client_cert, pki.other_key, setting="pacs['main'].tls")
    with pytest.raises(TlsSettingsUnusable, match=r"pacs\['main'\].tls.cert_file and key_file cannot be used .* "
                                                  "check that key_file is the private key of cert_file"):
        client_context(mismatched)
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.client_key), "-aes256", "-passout", "pass:secret", "-out",
                    str(encrypted)], check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    # OpenSSL would ask for the passphrase on the terminal, and a worker would hang there.
    with pytest.raises(TlsSettingsUnusable, match="encrypted with a passphrase"):
        client_context(TlsClient(pki.ca, pki.client_cert, encrypted))
    with pytest.raises(TlsSettingsUnusable, match="dicom.tls.cert_file and key_file"):
        server_context(TlsServer(pki.server_cert, encrypted, pki.ca))

    strict = server_context(TlsServer(pki.server_cert, pki.server_key, pki.ca))
    anyone = server_context(TlsServer(pki.server_cert, pki.server_key, None, require_client_cert=False))
    checked_if_sent = server_context(TlsServer(pki.server_cert, pki.server_key, pki.ca, require_client_cert=False))
    assert [c.verify_mode for c in (strict, anyone, checked_if_sent)] == [ssl.CERT_REQUIRED, ssl.CERT_NONE,
                                                                          ssl.CERT_OPTIONAL]
    client = client_context(TlsClient(pki.ca))
    assert (client.verify_mode, client.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert {c.minimum_version for c in (strict, anyone, client)} == {ssl.TLSVersion.TLSv1_2}


def test_a_peer_silent_in_the_handshake_is_a_timeout_to_retry(pki: Pki) -> None:
    """Accepts TCP, never answers the ClientHello: a loaded PACS, maybe; retried, not failed for good."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = DicomPeer("SILENT", "127.0.0.1", listener.getsockname()[1], connect_timeout=2, acse_timeout=1,
                         tls=TlsClient(pki.ca))
        with pytest.raises(PacsTimeout, match=r"SILENT@127.0.0.1:\d+ did not answer within 1 s while we waited for "
                                              "its side of the TLS handshake"):
            echo(LocalAE("MI2B2"), peer)
