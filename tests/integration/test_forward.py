"""Forwarding cached studies to real DICOM destinations: DCMTK storescp and a second Orthanc.

Studies are put into a project's cache the way the receiver does it (place
the file, index it); a worker in the test process schedules the forwards and
C-STOREs them. Destinations run on free 127.0.0.1 ports; a TCP proxy in
front of one makes it go away and come back.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pynetdicom._config
import pynetdicom.association
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, Request
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.forward import add_forwards, schedule_forwards
from mi2b2.services.requests import cancel_requests, list_requests, retry_requests, show_request
from mi2b2.synthetic import SyntheticStudy, write_study
from mi2b2.testing import FakeClock
from support import studies
from support.pacs import RunningPacs, free_port, start_orthanc, start_storescp
from support.pipeline import Pipeline
from support.proxy import Proxy
from support.site import write_site
from support.viewing import place, serving

ROOT = Principal("root", Role.ADMIN)
ALICE = Principal("alice", Role.RESEARCHER)  # lead of alpha, member of beta
BOB = Principal("bob", Role.RESEARCHER)  # researcher in alpha
PASSWORD = "a long enough password"
FAST = "max_attempts = {attempts}\nfirst_delay = 0.3\nmax_delay = 0.5\n"
PHI = [studies.BRAIN.patient_id, studies.BRAIN.patient_name, studies.BRAIN.accession, "TEST^JLS", "ACC-JLS"]


def destination(dest_id: str, ae_title: str, port: int, projects: list[str] | None = None, max_concurrent: int = 2,
                attempts: int = 6) -> str:
    return textwrap.dedent(f"""
        [[destinations]]
        id = "{dest_id}"
        ae_title = "{ae_title}"
        host = "127.0.0.1"
        port = {port}
        projects = {json.dumps(projects or [])}
        max_concurrent = {max_concurrent}
        [destinations.retries]
    """) + FAST.format(attempts=attempts)


def site(folder: Path, *destinations: str, database_url: str | None = None, expired_b: bool = True) -> Path:
    return write_site(folder, extra="".join(destinations), database_url=database_url, expired_b=expired_b)


def put_in_cache(ctx: ServiceContext, project: str, files: list[Path]) -> dict[str, Path]:
    """What the receiver does per instance: place the file, index it. Returns SOP -> cached file."""
    placed = {}
    for file in files:
        cached = place(ctx, project, file)
        placed[read_instance_header(cached).sop_instance_uid] = cached
    return placed


def jpeg_ls_file(folder: Path) -> Path:
    """pydicom's JPEG-LS lossless MR, re-identified as a study of an allowed patient (pixel data untouched)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "000123", "TEST^JLS", "ACC-JLS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jls.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def data_set_bytes(path: Path) -> bytes:
    """The file without its preamble and file meta group: what goes over the wire."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def received_by_sop(folder: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir() if p.is_file()}


def wait_for(pipe: Pipeline, ids: list[int], condition, timeout: float = 30.0) -> list[Request]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        rows = pipe.requests(ids)
        if rows and all(condition(r) for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError([(r.id, r.state, r.attempts, r.waiting_reason, r.last_error) for r in rows])
        time.sleep(0.05)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    peer = start_orthanc(tmp_path_factory.mktemp("orthanc2"), ae_title="ORTHANC2")
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def originals(tmp_path: Path) -> dict[str, list[Path]]:
    return {"brain": write_study(studies.BRAIN, tmp_path / "originals"), "jls": [jpeg_ls_file(tmp_path / "jls")]}


def _study_uid(files: list[Path]) -> str:
    return read_instance_header(files[0]).study_uid


def _orthanc_file(peer: RunningPacs, sop_uid: str, folder: Path) -> Path:
    lookup = urllib.request.Request(f"{peer.http_url}/tools/lookup", data=sop_uid.encode(), method="POST")
    with urllib.request.urlopen(lookup, timeout=10) as response:
        (found,) = [hit for hit in json.load(response) if hit["Type"] == "Instance"]
    with urllib.request.urlopen(f"{peer.http_url}/instances/{found['ID']}/file", timeout=10) as response:
        path = folder / f"{sop_uid}.dcm"
        path.write_bytes(response.read())
    return path


@pytest.mark.pacs
def test_forwarded_instances_arrive_identical_at_storescp_and_orthanc(
    tmp_path: Path, orthanc: RunningPacs, originals: dict[str, list[Path]], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mi2b2")

    def no_decoding(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a file whose stored syntax the destination accepts must be streamed, not decoded")

    monkeypatch.setattr(pynetdicom.association, "dcmread", no_decoding)
    storescp = start_storescp(tmp_path / "storescp")
    try:
        config = site(tmp_path / "site", destination("dcmtk", "DEST", storescp.port),
                      destination("orthanc2", "ORTHANC2", orthanc.port, projects=["alpha"]))
        with Pipeline(config, receiver=False) as pipe:
            cached = put_in_cache(pipe.ctx, "alpha", originals["brain"] + originals["jls"])
            uids = [_study_uid(originals["brain"]), _study_uid(originals["jls"])]
            ids = [*add_forwards(pipe.ctx, BOB, "alpha", "dcmtk", uids).created,
                   *add_forwards(pipe.ctx, BOB, "alpha", "orthanc2", uids, priority=3).created]
            rows = pipe.wait(ids, timeout=30)
            assert [(r.kind, r.state, r.received, r.expected_instances, r.failed, r.warnings) for r in rows] == [
                ("forward", "completed", 6, 6, 0, 0), ("forward", "completed", 1, 1, 0, 0)] * 2
            assert rows[0].bytes == sum(p.stat().st_size for sop, p in cached.items() if sop not in
                                        {read_instance_header(originals["jls"][0]).sop_instance_uid})

            # storescp wrote the data sets bit for bit as they came: the cached bytes, stored syntax kept.
            at_storescp = received_by_sop(storescp.workdir / "received")
            assert sorted(at_storescp) == sorted(cached)
            for sop, path in cached.items():
                assert data_set_bytes(at_storescp[sop]) == data_set_bytes(path)
                assert (pydicom.dcmread(at_storescp[sop]).file_meta.TransferSyntaxUID
                        == pydicom.dcmread(path).file_meta.TransferSyntaxUID)
            # Orthanc too, through its REST API.
            for sop, path in cached.items():
                stored = pydicom.dcmread(_orthanc_file(orthanc, sop, tmp_path))
                original = pydicom.dcmread(path)
                assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
                assert {e.tag: e.value for e in stored} == {e.tag: e.value for e in original}

            # The same request log as retrievals, and one audit event per study that ended.
            listed = list_requests(pipe.ctx, ALICE, "alpha")
            assert {(r["kind"], r["destination_id"]) for r in listed} == {("forward", "dcmtk"), ("forward", "orthanc2")}
            assert show_request(pipe.ctx, BOB, ids[0])["state"] == "completed"
            with pipe.ctx.sessions() as session:
                events = session.execute(select(AuditEvent).where(AuditEvent.action == "forward")).scalars().all()
            ended = [json.loads(e.detail) for e in events if '"event":"completed"' in e.detail]
            assert len(ended) == 4 and all(e.outcome == "ok" for e in events)
            assert {(d["destination"], d["stored"], d["expected"]) for d in ended} == {
                ("dcmtk", 6, 6), ("dcmtk", 1, 1), ("orthanc2", 6, 6), ("orthanc2", 1, 1)}
            assert {e.patient_id for e in events} == {"000123"} and {e.study_uid for e in events} == set(uids)
    finally:
        storescp.stop()
    # Streaming files is switched on only while forwards send: other path senders in the process are unaffected.
    assert pynetdicom._config.STORE_SEND_CHUNKED_DATASET is False
    assert "forwarding 6 instances to dcmtk" in caplog.text
    for phi in PHI:
        assert phi not in caplog.text


@pytest.mark.pacs
def test_destination_down_then_up_is_retried_and_a_failed_forward_can_be_retried(
    tmp_path: Path, originals: dict[str, list[Path]]
) -> None:
    storescp = start_storescp(tmp_path / "storescp")
    proxy = Proxy(storescp.port).start()
    try:
        config = site(tmp_path / "site", destination("flaky", "DEST", proxy.port),
                      destination("once", "DEST", proxy.port, attempts=1))
        with Pipeline(config, receiver=False) as pipe:
            cached = put_in_cache(pipe.ctx, "alpha", originals["brain"])
            study = _study_uid(originals["brain"])
            proxy.down()
            (flaky,) = add_forwards(pipe.ctx, BOB, "alpha", "flaky", [study]).created
            (once,) = add_forwards(pipe.ctx, BOB, "alpha", "once", [study]).created
            rows = wait_for(pipe, [flaky], lambda r: r.attempts >= 2 and r.state == "scheduled")
            assert "cannot connect to destination 'flaky'" in (rows[0].last_error or "")
            # Said by the worker ("attempt 2 failed ...; retrying after ...") or, once the scheduler looked, by it.
            assert "retry" in rows[0].waiting_reason and rows[0].not_before is not None
            (gave_up,) = pipe.wait([once])
            assert gave_up.state == "failed" and gave_up.last_error.startswith("gave up after 1 attempts: cannot connect")

            proxy.up()
            (done,) = pipe.wait([flaky])
            assert (done.state, done.received, done.failed) == ("completed", 6, 0) and done.attempts >= 3
            assert retry_requests(pipe.ctx, BOB, [once]) == [once]
            (again,) = pipe.wait([once])
            assert (again.state, again.received, again.attempts) == ("completed", 6, 1)
            assert sorted(received_by_sop(storescp.workdir / "received")) == sorted(cached)
            with pipe.ctx.sessions() as session:
                details = session.execute(select(AuditEvent.detail).where(AuditEvent.action == "forward")).scalars().all()
            assert sum('"event":"transient failure"' in d for d in details) >= 2
            assert sum('"event":"retry"' in d for d in details) == 1
    finally:
        proxy.down()
        storescp.stop()


@pytest.mark.pacs
def test_a_refused_transfer_syntax_is_converted_and_counted_as_a_warning(
    tmp_path: Path, originals: dict[str, list[Path]]
) -> None:
    storescp = start_storescp(tmp_path / "storescp", ae_title="IMPLICIT", implicit_only=True)
    try:
        config = site(tmp_path / "site", destination("old-pacs", "IMPLICIT", storescp.port))
        with Pipeline(config, receiver=False) as pipe:
            cached = put_in_cache(pipe.ctx, "alpha", originals["brain"] + originals["jls"])
            ids = add_forwards(pipe.ctx, ALICE, "alpha", "old-pacs",
                               [_study_uid(originals["brain"]), _study_uid(originals["jls"])]).created
            rows = pipe.wait(ids)
            assert [(r.state, r.received, r.failed, r.warnings) for r in rows] == [
                ("completed", 6, 0, 6), ("completed", 1, 0, 1)]
            at_storescp = received_by_sop(storescp.workdir / "received")
            assert sorted(at_storescp) == sorted(cached)
            for sop, path in cached.items():
                original, received = pydicom.dcmread(path), pydicom.dcmread(at_storescp[sop])
                assert received.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
                # Same instance, same pixel values: JPEG-LS lossless decoded, Explicit re-encoded as Implicit.
                assert received.SOPInstanceUID == original.SOPInstanceUID
                assert (received.pixel_array == original.pixel_array).all()
                if not original.file_meta.TransferSyntaxUID.is_compressed:
                    assert {e.tag: e.value for e in received} == {e.tag: e.value for e in original}
    finally:
        storescp.stop()


class StatusScp:
    """A pynetdicom storage SCP in the test process that answers chosen C-STORE statuses.

    ``answers[n]`` maps the position of an instance within association n to
    the status it gets; everything else succeeds."""

    def __init__(self, answers: list[dict[int, int]]) -> None:
        self.answers = answers
        self.associations: list[list[str]] = []  # SOP Instance UIDs received, per association
        ae = AE(ae_title="STATUS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_CONN_OPEN, self._nodelay), (evt.EVT_REQUESTED, self._opened), (evt.EVT_C_STORE, self._store)])

    @staticmethod
    def _nodelay(event: evt.Event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _opened(self, event: evt.Event) -> None:
        self.associations.append([])

    def _store(self, event: evt.Event) -> int:
        number = len(self.associations) - 1
        received = self.associations[number]
        received.append(str(event.request.AffectedSOPInstanceUID))
        plan = self.answers[number] if number < len(self.answers) else {}
        return plan.get(len(received) - 1, 0x0000)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.pacs
def test_per_instance_statuses_out_of_resources_retries_warnings_and_failures_count(
    tmp_path: Path, originals: dict[str, list[Path]]
) -> None:
    # First association: the destination runs out of resources at the third instance (retried later);
    # second: a warning for the first instance, a refusal of the second.
    scp = StatusScp([{2: 0xA700}, {0: 0xB000, 1: 0xA900}])
    try:
        config = site(tmp_path / "site", destination("picky", "STATUS", scp.port))
        with Pipeline(config, receiver=False) as pipe:
            put_in_cache(pipe.ctx, "alpha", originals["brain"])
            (request_id,) = add_forwards(pipe.ctx, ALICE, "alpha", "picky", [_study_uid(originals["brain"])]).created
            (row,) = pipe.wait([request_id])
            assert (row.state, row.attempts, row.received, row.failed, row.warnings, row.last_status) == (
                "incomplete", 2, 5, 1, 1, 0xA900)
            assert row.last_error.startswith("1 of 6 instances were not stored (first problem: status 0xA900")
            assert [len(a) for a in scp.associations] == [3, 6]  # one association per attempt; the study sent again
            with pipe.ctx.sessions() as session:
                details = [json.loads(d) for d in session.execute(
                    select(AuditEvent.detail).where(AuditEvent.action == "forward")).scalars()]
            assert [d["event"] for d in details] == ["requested", "transient failure", "incomplete"]
            assert "out of resources" in details[1]["error"].lower()
    finally:
        scp.stop()


@pytest.fixture
def live_server() -> Iterator[Callable[[ServiceContext], str]]:
    """The API on a free 127.0.0.1 port, in this process so it shares the test's context."""
    with ExitStack() as servers:
        yield lambda ctx: servers.enter_context(serving(create_app(ctx)))


def mi2b2(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mi2b2", *args], capture_output=True, text=True, timeout=120,
                            check=False, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


SLOW = SyntheticStudy(patient_id="77", patient_name="TEST^SLOW", birth_date="19700101", sex="M", accession="ACC-SLOW",
                      study_date="20240101", modality="CT", description="", series_count=1,
                      instances_per_series=30, rows=128, cols=128)


@pytest.mark.pacs
def test_cli_forward_and_a_cancel_stops_between_instances(
    tmp_path: Path, live_server: Callable[[ServiceContext], str]
) -> None:
    storescp = start_storescp(tmp_path / "storescp")
    proxy = Proxy(storescp.port, bytes_per_second=100_000).start()  # ~0.3 s per instance
    try:
        config = site(tmp_path / "site", destination("slow", "DEST", proxy.port),
                      destination("beta-only", "B", proxy.port, ["beta"]))  # not listed for alpha
        with Pipeline(config, receiver=False) as pipe:
            put_in_cache(pipe.ctx, "alpha", write_study(SLOW, tmp_path / "originals"))
            study = studies.uid(SLOW)
            pipe.ctx.accounts.add_user(ROOT, "bob", "researcher", PASSWORD)
            common = ["--server", live_server(pipe.ctx), "--token",
                      pipe.ctx.accounts.create_token(ROOT, "bob", "cli", 1).secret]

            listed = mi2b2("destinations", "alpha", *common, "--format", "csv")
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.splitlines() == ["id,name,ae_title,host,port,max_concurrent",
                                                  f"slow,slow,DEST,127.0.0.1,{proxy.port},2"]
            queued = mi2b2("forward", "alpha", "--to", "slow", study, "1.2.3", *common)
            assert queued.returncode == 0, queued.stderr
            assert "1 forwards to slow queued" in queued.stdout and "not in the project's cache: 1.2.3" in queued.stderr

            (row,) = pipe.requests()
            wait_for(pipe, [row.id], lambda r: r.state == "processing" and r.received >= 1)
            assert cancel_requests(pipe.ctx, BOB, [row.id]) == [row.id]  # the same call as `mi2b2 request cancel`
            (done,) = pipe.wait([row.id])
            assert done.state == "canceled" and done.last_error == "canceled by a user"
            assert 1 <= done.received < 30
            arrived = len(list((storescp.workdir / "received").iterdir()))
            assert done.received <= arrived < 30
    finally:
        proxy.down()
        storescp.stop()


# --- who may forward where, over the API (no DICOM traffic) ----------------------------


def _login(client: TestClient, login: str) -> TestClient:
    response = client.post("/api/v1/auth/login", json={"login": login, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


def test_the_doors_of_forwarding(tmp_path: Path, originals: dict[str, list[Path]]) -> None:
    config = site(tmp_path / "site", destination("xnat", "XNAT", 11199), destination("beta-only", "B", 11198, ["beta"]))
    ctx = build_context(load_config(config), clock=FakeClock())
    for login in ("alice", "bob", "carol"):
        ctx.accounts.add_user(ROOT, login, "researcher", PASSWORD)
    put_in_cache(ctx, "alpha", originals["brain"])
    study = _study_uid(originals["brain"])
    client = TestClient(create_app(ctx))
    body = {"destination": "xnat", "study_uids": [study]}

    # carol is in beta only: alpha's studies are not hers to send anywhere.
    _login(client, "carol")
    refused = client.post("/api/v1/projects/alpha/forward", json=body)
    assert refused.status_code == 403 and "not a member of the project" in refused.json()["error"]
    assert client.get("/api/v1/projects/alpha/destinations").status_code == 403
    # Nor can she name them under her own project: they are not in beta's cache (and beta's IRB expired).
    assert "IRB approval has expired" in client.post("/api/v1/projects/beta/forward", json=body).json()["error"]

    _login(client, "bob")
    assert [d["id"] for d in client.get("/api/v1/projects/alpha/destinations").json()] == ["xnat"]
    limited = client.post("/api/v1/projects/alpha/forward", json={**body, "destination": "beta-only"})
    assert limited.status_code == 403
    assert "destination 'beta-only' does not accept forwards from project 'alpha'" in limited.json()["error"]
    unknown = client.post("/api/v1/projects/alpha/forward", json={**body, "destination": "nowhere"})
    assert unknown.status_code == 404 and "mi2b2 destinations alpha" in unknown.json()["error"]
    assert client.post("/api/v1/projects/alpha/forward", json={**body, "study_uids": ["not a uid"]}).status_code == 422
    bad_series = client.post("/api/v1/projects/alpha/forward", json={**body, "series_uids": ["1.2.3.4"]})
    assert bad_series.status_code == 422 and "is not in the project's cache" in bad_series.json()["error"]

    series = read_instance_header(originals["brain"][0]).series_uid
    report = client.post("/api/v1/projects/alpha/forward",
                         json={**body, "study_uids": [study, "1.2.3"], "series_uids": [series]}).json()
    assert report["not_cached"] == ["1.2.3"] and len(report["created"]) == 1
    assert client.post("/api/v1/projects/alpha/forward", json=body).json()["already_queued"] == [study]
    (request_id,) = report["created"]
    shown = client.get(f"/api/v1/requests/{request_id}").json()
    assert (shown["kind"], shown["destination_id"], shown["series_uids"], shown["expected_instances"]) == (
        "forward", "xnat", [series], 2)
    assert client.post("/api/v1/requests/cancel", json={"ids": [request_id]}).json() == {"canceled": [request_id]}
    assert client.get(f"/api/v1/requests/{request_id}").json()["state"] == "canceled"

    with ctx.sessions() as session:
        denials = [json.loads(d) for d in session.execute(
            select(AuditEvent.detail).where(AuditEvent.action == "denied")).scalars()]
        forwards = [json.loads(d) for d in session.execute(
            select(AuditEvent.detail).where(AuditEvent.action == "forward")).scalars()]
    assert {(d.get("operation"), d["reason"]) for d in denials} >= {
        ("forward", "not a member of the project"), ("list destinations", "not a member of the project"),
        ("forward", "the project's IRB approval has expired"),
        ("forward", "destination 'beta-only' does not accept forwards from project 'alpha'"),
    }
    assert [d["event"] for d in forwards] == ["requested", "cancel"]


# --- scheduling, against SQLite and PostgreSQL -------------------------------------------


def _study(patient: str, accession: str) -> SyntheticStudy:
    return SyntheticStudy(patient_id=patient, patient_name=f"TEST^{accession}", birth_date="19700101", sex="F",
                          accession=accession, study_date="20240101", modality="CR", description="",
                          series_count=1, instances_per_series=1, rows=8, cols=8)


def _end(ctx: ServiceContext, ids: list[int]) -> None:
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id.in_(ids)).values(state="completed"))


def test_scheduler_cap_turns_and_what_ends_a_queued_forward(tmp_path: Path, database_url: str) -> None:
    clock = FakeClock()
    config = site(tmp_path / "site", destination("one", "ONE", 11197, max_concurrent=1),
                  destination("two", "TWO", 11196, ["alpha"]), database_url=database_url, expired_b=False)
    ctx = build_context(load_config(config), clock=clock)
    uids = {}
    for project, patient, accession in [("alpha", "000123", "A1"), ("alpha", "77", "A2"), ("beta", "B-1", "B1")]:
        files = write_study(_study(patient, accession), tmp_path / "originals")
        put_in_cache(ctx, project, files)
        uids[accession] = _study_uid(files)
    (a1,) = add_forwards(ctx, ALICE, "alpha", "one", [uids["A1"]]).created
    clock.advance(seconds=1)
    (a2,) = add_forwards(ctx, ALICE, "alpha", "one", [uids["A2"]], priority=5).created
    (b1,) = add_forwards(ctx, ALICE, "beta", "one", [uids["B1"]]).created

    assert schedule_forwards(ctx, "w1") == [a2]  # alpha first; its higher priority before its older request
    assert schedule_forwards(ctx, "w2") == []  # a second worker sees the same cap
    assert show_request(ctx, ALICE, b1)["waiting_reason"] == "destination busy: 1 of 1 forwards active"
    with ctx.sessions() as session:  # read so, not written on each tick
        assert session.get_one(Request, b1).waiting_reason == "waiting for the scheduler"
    _end(ctx, [a2])
    assert schedule_forwards(ctx, "w1") == [b1]  # beta's turn
    _end(ctx, [b1])
    assert schedule_forwards(ctx, "w1") == [a1]
    _end(ctx, [a1])

    # The destination stops taking alpha's forwards, another disappears from the configuration,
    # and then the IRB approval lapses: queued forwards end, with the reason, audited.
    (limited,) = add_forwards(ctx, ALICE, "alpha", "two", [uids["A1"]]).created
    (removed,) = add_forwards(ctx, ALICE, "alpha", "one", [uids["A2"]]).created
    ctx.config = ctx.config.model_copy(update={"destinations": [
        d.model_copy(update={"projects": ["beta"]}) for d in ctx.config.destinations if d.id == "two"]})
    assert schedule_forwards(ctx, "w1") == []
    assert show_request(ctx, ALICE, limited)["last_error"] == "destination 'two' no longer accepts forwards from project 'alpha'"
    assert show_request(ctx, ALICE, removed)["last_error"] == "destination 'one' is no longer configured"
    assert {show_request(ctx, ALICE, i)["state"] for i in (limited, removed)} == {"failed"}

    ctx.config = load_config(config)
    (late,) = add_forwards(ctx, ALICE, "beta", "one", [uids["B1"]]).created
    clock.set(datetime(2100, 1, 1, tzinfo=UTC))
    assert schedule_forwards(ctx, "w1") == []
    assert show_request(ctx, ALICE, late)["last_error"] == "canceled: the project's IRB approval has expired"
    with pytest.raises(AccessDenied, match="IRB approval has expired"):
        add_forwards(ctx, ALICE, "beta", "one", [uids["B1"]])
    with ctx.sessions() as session:
        ended = session.execute(select(AuditEvent).where(AuditEvent.actor == "scheduler")).scalars().all()
    assert sorted(json.loads(e.detail)["event"] for e in ended) == ["canceled", "failed", "failed"]
    assert {e.outcome for e in ended} == {"denied"}
