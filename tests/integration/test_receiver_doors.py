"""The receiver as an attacker meets it: a spoofed AE title from another host, oversized
and forged instances, refusals by the hundred, values too long for the audit columns.

mi2b2's store SCP runs in-process (`support.pipeline.Pipeline`) on a real database
(SQLite and PostgreSQL); senders are pynetdicom SCUs (one bound to 127.0.0.2: every
127.0.0.0/8 address routes to lo on Linux) and DCMTK storescu; the retrieval is a real
C-MOVE from Orthanc.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import func, select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, CachedInstance, Request
from mi2b2.domain.principal import Principal, Role
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.services.retrieval import run_retrieval
from mi2b2.synthetic import SyntheticStudy, write_study
from support import studies
from support.databases import fresh_database, postgres_available
from support.pacs import free_port, start_orthanc
from support.pipeline import Pipeline, cache_files, retrieval_site, store_over
from support.site import pacs_block

AUDITOR = Principal("audrey", Role.AUDITOR)
SPOOF_ADDRESS = "127.0.0.2"
BIG = SyntheticStudy(patient_id="77", patient_name="TEST^BIG", birth_date="19700101", sex="M", accession="ACC-BIG9",
                     study_date="20240101", modality="CT", description="big", series_count=1,
                     instances_per_series=1, rows=512, cols=512)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql" and not postgres_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    with fresh_database(request.param, tmp_path) as url:
        yield url


def _site(folder: Path, database_url: str, pacs_port: int = 11199, pacs_extra: str = "", dicom_extra: str = "",
          receiver_port: int | None = None) -> Path:
    return retrieval_site(folder, receiver_port or free_port(), pacs_block("main", "PACS", pacs_port, pacs_extra),
                          database_url=database_url, dicom_extra=dicom_extra)


def _in_flight(pipe: Pipeline, study: SyntheticStudy, expected: int = 1) -> int:
    """A processing retrieval of `study` from the PACS, as the worker leaves it when it starts one."""
    with transaction(pipe.ctx.sessions) as session:
        row = Request(kind=RequestKind.RETRIEVE, batch_id="test", project_id="alpha", user_login="alice",
                      pacs_id="main", patient_id=study.patient_id, study_uid=studies.uid(study),
                      accession=study.accession, series_uids=[], priority=0, state=RequestState.PROCESSING,
                      waiting_reason="", expected_instances=expected, expected_bytes=0,
                      created_at=pipe.ctx.clock.now(), worker="test")
        session.add(row)
        session.flush()
        return row.id


def _associate(pipe: Pipeline, calling_ae: str, contexts: list[Dataset], bind: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling_ae)
    for ds in contexts:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", pipe.ctx.config.dicom.port, ae_title="MI2B2", bind_address=(bind, 0))


def _store_all(pipe: Pipeline, calling_ae: str, datasets: list[Dataset], bind: str = "127.0.0.1") -> list[int]:
    return store_over(_associate(pipe, calling_ae, datasets[:1], bind), datasets)


def _denials(pipe: Pipeline, expected: int = 1) -> list[AuditEvent]:
    """The receipt refusals audited, once `expected` are (written as an association ends, just after
    the sender sees it released)."""
    deadline = time.monotonic() + 10
    while True:
        with pipe.ctx.sessions() as session:
            rows = list(session.scalars(select(AuditEvent).where(
                AuditEvent.action == "receive", AuditEvent.outcome == "denied").order_by(AuditEvent.seq)))
        if len(rows) >= expected or time.monotonic() > deadline:
            time.sleep(0.2)  # and no more than those come
            with pipe.ctx.sessions() as session:
                return list(session.scalars(select(AuditEvent).where(
                    AuditEvent.action == "receive", AuditEvent.outcome == "denied").order_by(AuditEvent.seq)))
        time.sleep(0.05)


def _incoming(pipe: Pipeline) -> list[Path]:
    folder = pipe.ctx.config.cache_dir() / ".incoming"
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _relabel(path: Path, **tags: str) -> Dataset:
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the forged values: that is the point
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
    return ds


def test_a_spoofed_ae_title_from_another_address_is_refused_and_audited(tmp_path: Path, database_url: str) -> None:
    files = write_study(studies.TRAUMA, tmp_path / "study")
    with Pipeline(_site(tmp_path / "site", database_url), worker=False) as pipe:
        _in_flight(pipe, studies.TRAUMA)
        trauma = pydicom.dcmread(files[0])

        spoofed = _associate(pipe, "PACS", [trauma], bind=SPOOF_ADDRESS)
        assert spoofed.is_rejected and not spoofed.is_established
        assert cache_files(pipe.ctx.config.cache_dir()) == [] and _incoming(pipe) == []
        (denial,) = _denials(pipe)
        detail = json.loads(denial.detail)
        assert detail["address"] == SPOOF_ADDRESS and detail["security"] is True
        assert "association refused" in detail["reason"] and denial.actor == "dicom:PACS"

        # The same AE title from the PACS's address (its host, resolved) is the PACS.
        assert _store_all(pipe, "PACS", [trauma]) == [0x0000]
        assert pipe.sink.indexer.flush(10)
        assert len(cache_files(pipe.ctx.config.cache_dir())) == 1


def test_configured_addresses_replace_the_hosts(tmp_path: Path) -> None:
    files = write_study(studies.TRAUMA, tmp_path / "study")
    site = _site(tmp_path / "site", f"sqlite:///{tmp_path / 'db.sqlite'}", pacs_extra=f'addresses = ["{SPOOF_ADDRESS}/32"]\n')
    with Pipeline(site, worker=False) as pipe:
        _in_flight(pipe, studies.TRAUMA)
        trauma = pydicom.dcmread(files[0])
        assert _associate(pipe, "PACS", [trauma], bind="127.0.0.1").is_rejected  # its host, not configured
        assert _store_all(pipe, "PACS", [trauma], bind=SPOOF_ADDRESS) == [0x0000]


def test_an_instance_is_judged_from_its_header_before_a_byte_is_written(tmp_path: Path) -> None:
    files = write_study(studies.TRAUMA, tmp_path / "study")
    with Pipeline(_site(tmp_path / "site", f"sqlite:///{tmp_path / 'db.sqlite'}"), worker=False) as pipe:
        _in_flight(pipe, studies.TRAUMA)
        incoming = pipe.sink.store.incoming_dir()
        # A receiver that writes before judging cannot now (a file where its folder was; permissions
        # would not stop root): it would answer 0xA700, out of resources, instead of refusing.
        incoming.rmdir()
        incoming.write_bytes(b"")
        try:
            other_patient = _relabel(files[0], PatientID="OFFLIST-9")
            assert _store_all(pipe, "PACS", [other_patient]) == [0x0124]
        finally:
            incoming.unlink()
            incoming.mkdir()
        assert _incoming(pipe) == []


def test_an_oversized_instance_is_refused_and_nothing_stays_in_incoming(tmp_path: Path) -> None:
    big = write_study(BIG, tmp_path / "big")  # 512 KiB of pixels
    small = write_study(studies.TRAUMA, tmp_path / "small")
    site = _site(tmp_path / "site", f"sqlite:///{tmp_path / 'db.sqlite'}", dicom_extra='max_instance_size = "256 KiB"')
    with Pipeline(site, worker=False) as pipe:
        _in_flight(pipe, BIG)
        _in_flight(pipe, studies.TRAUMA)
        env = {**os.environ, "TCP_NODELAY": "1"}
        command = ["storescu", "-v", "--no-halt", "-aet", "PACS", "-aec", "MI2B2", "127.0.0.1",
                   str(pipe.ctx.config.dicom.port), str(big[0]), str(small[0])]
        sent = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        log = sent.stdout + sent.stderr
        assert "Refused: OutOfResources" in log and "Success" in log, log
        assert _incoming(pipe) == []
        assert pipe.sink.indexer.flush(10)
        with pipe.ctx.sessions() as session:
            stored = session.scalars(select(CachedInstance.sop_instance_uid)).all()
        assert stored == [str(pydicom.dcmread(small[0], stop_before_pixels=True).SOPInstanceUID)]
        (denial,) = _denials(pipe)
        assert "maximum instance size" in denial.detail


def test_refusals_on_one_association_make_one_audit_row_and_long_values_fit(tmp_path: Path, database_url: str) -> None:
    files = write_study(studies.BRAIN, tmp_path / "study")
    long_patient = "P" * 100
    long_study = "1.2." + "3" * 90
    with Pipeline(_site(tmp_path / "site", database_url), worker=False) as pipe:
        _in_flight(pipe, studies.BRAIN)
        forged = [_relabel(f, PatientID=long_patient) for f in files[:4]]
        forged.append(_relabel(files[4], StudyInstanceUID=long_study))
        forged.append(_relabel(files[5], PatientID=long_patient + "\x00X"))
        assert _store_all(pipe, "PACS", forged) == [0x0124] * 6
        assert cache_files(pipe.ctx.config.cache_dir()) == [] and _incoming(pipe) == []
        (row,) = _denials(pipe)  # one association, one row
        detail = json.loads(row.detail)
        assert detail["refused"] == 6
        assert detail["reasons"] == {
            "the instance's PatientID differs from the requested study's patient": 5,
            "a Study, Series or SOP Instance UID is not a DICOM UID (digits and dots, at most 64)": 1,
        }
        assert row.patient_id is None  # several patients: named in the detail
        assert all(len(p) <= 64 for p in detail["patients"])
        assert len([p for p in detail["patients"] if p.startswith("P" * 40) and "~" in p]) == 2
        assert pipe.ctx.audit.verify(AUDITOR).ok


def test_a_long_patient_id_refused_alone_is_audited_in_its_column(tmp_path: Path, database_url: str) -> None:
    files = write_study(studies.TRAUMA, tmp_path / "study")
    with Pipeline(_site(tmp_path / "site", database_url), worker=False) as pipe:
        _in_flight(pipe, studies.TRAUMA)
        assert _store_all(pipe, "PACS", [_relabel(files[0], PatientID="9" * 300)]) == [0x0124]
        (row,) = _denials(pipe)
        assert row.patient_id is not None and len(row.patient_id) == 64 and row.patient_id.startswith("9" * 40)
        assert row.study_uid == studies.uid(studies.TRAUMA)
        assert pipe.ctx.audit.verify(AUDITOR).ok


@pytest.mark.pacs
def test_a_stray_with_a_bad_series_uid_does_not_fail_the_retrieval_in_flight(tmp_path: Path) -> None:
    files = write_study(studies.BRAIN, tmp_path / "study")
    receiver_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", ae_title="PACS", move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        pacs.load(files)
        site = _site(tmp_path / "site", f"sqlite:///{tmp_path / 'db.sqlite'}", pacs_port=pacs.port,
                     receiver_port=receiver_port)
        with Pipeline(site, worker=False) as pipe:
            request_id = _in_flight(pipe, studies.BRAIN, expected=len(files))
            stray = _relabel(files[0], SeriesInstanceUID="1.2.3.evil/../../x", SOPInstanceUID="1.2.3.999")
            assert _store_all(pipe, "PACS", [stray]) == [0x0124]
            assert run_retrieval(pipe.ctx, request_id, pipe.sink) == "completed"
            (row,) = pipe.requests([request_id])
            assert (row.received, row.expected_instances) == (len(files), len(files))
            assert len(cache_files(pipe.ctx.config.cache_dir())) == len(files)
            with pipe.ctx.sessions() as session:
                assert session.scalar(select(func.count()).select_from(CachedInstance)) == len(files)
            assert any("not a DICOM UID" in d.detail for d in _denials(pipe))
    finally:
        pacs.stop()
