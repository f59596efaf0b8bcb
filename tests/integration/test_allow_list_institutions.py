"""One MRN string, two institutions, two people: the allow-list entry is (institution, MRN).

Northside's PACS is Orthanc, Lakeside's is DCMTK dcmqrscp. Both hold a patient
``000123``: Alice at Northside, Bob at Lakeside. Project alpha reaches both
institutions and its IRB allowed Alice only. Bob's studies must never be
asked for, found, requested or received: the Lakeside PACS's own log shows no
query for him, and mi2b2's receiver refuses his instances (0x0124) even while
Alice's same-MRN study is being retrieved. Lakeside writes MRNs as 6 digits
("555", "00-0555" and "000555" are one patient there); Northside writes them
as they are, and names itself as Issuer of Patient ID.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, CachedInstance, CachedStudy, Request
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.config import load_config
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.services import cache, search
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.requests import StudyPick, add_requests, show_request
from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study
from mi2b2.testing import FakeClock
from support.pacs import RunningPacs, free_port, start_dcmqrscp, start_orthanc
from support.pipeline import ADMIN as ROOT
from support.pipeline import ALICE, Pipeline, cache_files

pytestmark = pytest.mark.pacs


def _study(pid: str, name: str, accession: str, modality: str = "MR") -> SyntheticStudy:
    return SyntheticStudy(patient_id=pid, patient_name=name, birth_date="19700101", sex="O", accession=accession,
                          study_date="20240102", modality=modality, description=f"{modality} {accession}",
                          series_count=1, instances_per_series=3, rows=16, cols=16)


ALICE_NORTH = _study("000123", "NORTH^ALICE", "N-1001")
ELSEWHERE_NORTH = _study("000777", "ELSEWHERE^EVE", "N-1002")  # imported from another issuer's records
BOB_LAKE = _study("000123", "LAKE^BOB", "L-2001")
DORA_LAKE = _study("000555", "LAKE^DORA", "L-2002")
ISSUERS = {ALICE_NORTH: "NORTHSIDE", ELSEWHERE_NORTH: "ELSEWHERE", BOB_LAKE: "LAKESIDE", DORA_LAKE: "LAKESIDE"}


def _uid(study: SyntheticStudy) -> str:
    return study_instance_uid(study)


@dataclass
class TwoSites:
    north: RunningPacs
    lake: RunningPacs
    receiver_port: int
    files: dict[str, list[Path]]


def _with_issuer(files: list[Path], issuer: str) -> list[Path]:
    for path in files:
        ds = pydicom.dcmread(path)
        ds.IssuerOfPatientID = issuer
        ds.save_as(path, enforce_file_format=True)
    return files


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoSites]:
    folder = tmp_path_factory.mktemp("studies")
    files = {s.patient_name: _with_issuer(write_study(s, folder), ISSUERS[s]) for s in ISSUERS}
    receiver_port = free_port()
    destinations = {"MI2B2": ("127.0.0.1", receiver_port)}
    north = start_orthanc(tmp_path_factory.mktemp("north"), ae_title="NORTHPACS", move_destinations=destinations)
    try:
        lake = start_dcmqrscp(tmp_path_factory.mktemp("lake"), ae_title="LAKEPACS", move_destinations=destinations)
        try:
            north.load(files["NORTH^ALICE"] + files["ELSEWHERE^EVE"])
            lake.load(files["LAKE^BOB"] + files["LAKE^DORA"])
            yield TwoSites(north, lake, receiver_port, files)
        finally:
            lake.stop()
    finally:
        north.stop()


def _write_site(folder: Path, sites: TwoSites, database_url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpha.csv").write_text("institution,mrn\nnorthside,000123\nnorthside,000777\nlakeside,555\n")
    path = folder / "mi2b2.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        database_url = "{database_url}"
        cache_dir = "cache"

        [dicom]
        ae_title = "MI2B2"
        port = {sites.receiver_port}

        [[institutions]]
        id = "northside"
        issuer = "NORTHSIDE"

        [[institutions.departments]]
        id = "radiology"

        [[institutions.departments.pacs]]
        id = "north-pacs"
        ae_title = "NORTHPACS"
        host = "127.0.0.1"
        port = {sites.north.port}

        [[institutions]]
        id = "lakeside"
        mrn_format = {{ digits = 6, remove = "-" }}

        [[institutions.departments]]
        id = "radiology"

        [[institutions.departments.pacs]]
        id = "lake-pacs"
        ae_title = "LAKEPACS"
        host = "127.0.0.1"
        port = {sites.lake.port}

        [[projects]]
        id = "alpha"
        title = "Two institutions"
        irb = "2026P000001"
        expires = 2099-12-31
        mrn_file = "alpha.csv"
        quota = "1 GiB"
        institutions = ["northside", "lakeside"]
        members = [{{ login = "alice", role = "lead" }}]
    """))
    return path


@pytest.fixture
def site(tmp_path: Path, sites: TwoSites, database_url: str) -> Path:
    return _write_site(tmp_path / "site", sites, database_url)


@pytest.fixture
def ctx(site: Path) -> Iterator[ServiceContext]:
    context = build_context(load_config(site), clock=FakeClock())
    try:
        yield context
    finally:
        context.engine.dispose()


def test_the_other_institutions_patient_is_never_asked_found_or_requested(ctx: ServiceContext, sites: TwoSites) -> None:
    lake_log_start = len(sites.lake.log_text())

    # Every spelling of Bob's MRN at Lakeside is one patient there, and not one the IRB allowed.
    refused = search.search_studies(ctx, ALICE, "alpha", "lake-pacs", "000123\n123\n00-0123")
    assert refused.refused == ["000123"] and refused.studies == [] and refused.duplicates == ["123", "00-0123"]
    patients = search.search_patients(ctx, ALICE, "alpha", "lake-pacs", "123")
    assert patients.refused == ["000123"] and patients.patients == []

    # Dora, allowed as "555", is asked for in the form the Lakeside PACS stores.
    dora = search.search_studies(ctx, ALICE, "alpha", "lake-pacs", "555\n00-0555")
    assert [(s.patient_id, s.patient_name) for s in dora.studies] == [("000555", "LAKE^DORA")]
    asked = sites.lake.log_text()[lake_log_start:]
    assert "000555" in asked, "the PACS log must show query values for this proof to mean anything"
    assert "000123" not in asked and "LAKE^BOB" not in asked

    # At Northside the same string is Alice, and only her exact spelling is on the list.
    north = search.search_studies(ctx, ALICE, "alpha", "north-pacs", "000123\n123")
    assert north.refused == ["123"]
    assert [(s.patient_id, s.patient_name, s.institution_id) for s in north.studies] == [
        ("000123", "NORTH^ALICE", "northside")]

    # Asked by the other doors, the Lakeside PACS names Bob: withheld every time.
    accessions = search.search_accessions(ctx, ALICE, "alpha", "lake-pacs", "L-2001\nL-2002")
    assert accessions.not_permitted == ["L-2001"] and [s.accession for s in accessions.studies] == ["L-2002"]
    series = search.search_series(ctx, ALICE, "alpha", "lake-pacs", [_uid(BOB_LAKE)])
    assert series.not_permitted == [_uid(BOB_LAKE)] and series.series == []
    report = add_requests(ctx, ALICE, "alpha", "lake-pacs", [StudyPick(_uid(BOB_LAKE))])
    assert report.not_permitted == [_uid(BOB_LAKE)] and report.created == []
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Request).where(
            Request.study_uid == _uid(BOB_LAKE))) == 0
        denied = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "denied", AuditEvent.pacs_id == "lake-pacs")).all()
    assert {e.patient_id for e in denied} == {"000123"}
    assert len(denied) >= 4  # the search, the patient search, the accession, the series and the request
    # Whatever door was knocked at, the Lakeside PACS was never sent Bob's MRN as a key.
    keys = _find_request_identifiers(sites.lake.log_text()[lake_log_start:])
    assert any("[000555]" in k for k in keys) and any("[L-2001]" in k for k in keys)
    assert not [k for k in keys if "[000123]" in k]


def test_an_answer_from_another_issuer_is_dropped_and_audited(ctx: ServiceContext, sites: TwoSites) -> None:
    report = search.search_studies(ctx, ALICE, "alpha", "north-pacs", "000777\n000123")
    assert [s.patient_name for s in report.studies] == ["NORTH^ALICE"]
    assert report.not_found == ["000777"]
    with ctx.sessions() as session:
        (dropped,) = session.scalars(select(AuditEvent.detail).where(
            AuditEvent.action == "denied", AuditEvent.detail.contains("not asked for"))).all()
    assert {a["IssuerOfPatientID"] for a in json.loads(dropped)["answers"]} == {"ELSEWHERE"}
    refused = add_requests(ctx, ALICE, "alpha", "north-pacs", [StudyPick(_uid(ELSEWHERE_NORTH))])
    assert refused.not_permitted == [_uid(ELSEWHERE_NORTH)]


def test_the_receiver_refuses_the_other_person_while_the_allowed_one_is_in_flight(
    site: Path, sites: TwoSites, tmp_path: Path
) -> None:
    with Pipeline(site, worker=False) as pipe:
        alice = add_requests(pipe.ctx, ALICE, "alpha", "north-pacs", [StudyPick(_uid(ALICE_NORTH))]).created
        assert len(alice) == 1
        # A Lakeside retrieval of Bob, as a flat allow-list would have queued it.
        forged = _forge_request(pipe.ctx, "lake-pacs", BOB_LAKE, RequestState.PROCESSING)
        _force_processing(pipe.ctx, alice)

        bob = sites.files["LAKE^BOB"][0]
        assert _send(pipe, "LAKEPACS", bob) == 0x0124  # Bob is not on Lakeside's list
        assert _send(pipe, "NORTHPACS", bob) == 0x0124  # no Northside retrieval of Bob's study
        # Bob's instance dressed as Alice's study, from Northside's AE: same MRN, other issuer.
        disguised = _relabel(bob, tmp_path / "disguised.dcm", StudyInstanceUID=_uid(ALICE_NORTH))
        assert _send(pipe, "NORTHPACS", disguised) == 0x0124
        assert _send(pipe, "NORTHPACS", sites.files["NORTH^ALICE"][0]) == 0x0000  # Alice herself is welcome
        assert pipe.sink.indexer.flush(10)

        names = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientName) for f in cache_files(pipe.ctx.config.cache_dir())}
        assert names == {"NORTH^ALICE"}
        with pipe.ctx.sessions() as session:
            reasons = session.scalars(select(AuditEvent.detail).where(
                AuditEvent.action == "receive", AuditEvent.outcome == "denied")).all()
            studies = session.execute(select(CachedStudy.study_uid, CachedStudy.pacs_id)).all()
            assert session.scalar(select(func.count()).select_from(CachedInstance)) == 1
            assert session.get_one(Request, forged).received == 0
        assert studies == [(_uid(ALICE_NORTH), "north-pacs")]
        assert any("patient not on the project's IRB allow-list" in r for r in reasons)
        assert any("Issuer of Patient ID differs" in r for r in reasons)
        assert len(reasons) == 3


def test_fsck_adopts_an_orphan_by_the_institution_its_study_came_from(
    site: Path, sites: TwoSites, tmp_path: Path
) -> None:
    with Pipeline(site, worker=False) as pipe:
        alice = add_requests(pipe.ctx, ALICE, "alpha", "north-pacs", [StudyPick(_uid(ALICE_NORTH))]).created
        _force_processing(pipe.ctx, alice)
        _forge_request(pipe.ctx, "lake-pacs", BOB_LAKE, RequestState.FAILED)
        assert _send(pipe, "NORTHPACS", sites.files["NORTH^ALICE"][0]) == 0x0000
        assert pipe.sink.indexer.flush(10)
        with transaction(pipe.ctx.sessions) as session:
            session.get_one(Request, alice[0]).state = RequestState.INCOMPLETE  # no longer arriving
        # Files that reached the cache without an index row (a crash between rename and commit).
        store = cache.cache_store(pipe.ctx)
        placed = {name: _place(store, sites.files[name][1]) for name in ("NORTH^ALICE", "LAKE^BOB")}
        fixed = cache.fsck(pipe.ctx, ROOT, repair=True)
        assert fixed.orphans_indexed == [placed["NORTH^ALICE"]]
        assert fixed.files_deleted == [placed["LAKE^BOB"]]  # Bob's MRN, from Lakeside: not on the list
        with pipe.ctx.sessions() as session:
            assert session.execute(select(CachedStudy.study_uid, CachedStudy.pacs_id, CachedStudy.instance_count)).all() \
                == [(_uid(ALICE_NORTH), "north-pacs", 2)]


def test_retrieval_brings_the_allowed_person_and_the_scheduler_never_starts_the_other(
    site: Path, sites: TwoSites
) -> None:
    lake_log_start = len(sites.lake.log_text())
    with Pipeline(site) as pipe:
        forged = _forge_request(pipe.ctx, "lake-pacs", BOB_LAKE, RequestState.SCHEDULED)
        found = search.search_studies(pipe.ctx, ALICE, "alpha", "north-pacs", "000123")
        ids = add_requests(pipe.ctx, ALICE, "alpha", "north-pacs", [StudyPick(s.study_uid) for s in found.studies]).created
        (done,) = pipe.wait(ids)
        assert done.state == "completed" and done.received == 3
        held = show_request(pipe.ctx, ALICE, forged)  # the reason as users read it
        assert held["state"] == "scheduled" and "allow-list" in (held["waiting_reason"] or ""), held
        names = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientName) for f in cache_files(pipe.ctx.config.cache_dir())}
        assert names == {"NORTH^ALICE"}
    asked = sites.lake.log_text()[lake_log_start:]
    assert "000123" not in asked and "C-MOVE RQ" not in asked and "Move SCP" not in asked


# --- helpers ---------------------------------------------------------------------------


def _find_request_identifiers(log: str) -> list[str]:
    """The identifiers of the C-FIND requests dcmqrscp received (its -d log prints each, values included)."""
    blocks: list[str] = []
    lines = log.splitlines()
    for n, line in enumerate(lines):
        if "Find SCP Request Identifiers:" in line:
            block = []
            for following in lines[n + 1:]:
                if not following.startswith("I: ("):
                    if following.startswith("I: # ") or following.strip() in ("I:", "I: # Dicom-Data-Set"):
                        continue
                    break
                block.append(following)
            blocks.append("\n".join(block))
    return blocks


def _forge_request(ctx: ServiceContext, pacs_id: str, study: SyntheticStudy, state: RequestState) -> int:
    with transaction(ctx.sessions) as session:
        row = Request(kind=RequestKind.RETRIEVE, batch_id="forged", project_id="alpha", user_login="alice",
                      pacs_id=pacs_id, patient_id=study.patient_id, study_uid=_uid(study), accession=study.accession,
                      series_uids=[], priority=0, state=state, waiting_reason="waiting for the scheduler",
                      expected_instances=3, expected_bytes=0, created_at=ctx.clock.now(),
                      worker="test" if state == RequestState.PROCESSING else None)
        session.add(row)
        session.flush()
        return row.id


def _force_processing(ctx: ServiceContext, ids: list[int]) -> None:
    with transaction(ctx.sessions) as session:
        for request_id in ids:
            row = session.get_one(Request, request_id)
            row.state = RequestState.PROCESSING
            row.worker = "test"


def _place(store: CacheStore, file: Path) -> str:
    header = read_instance_header(file)
    relative = store.relative_path("alpha", header.study_uid, header.series_uid, header.sop_instance_uid)
    temp = store.incoming_dir() / f"{header.sop_instance_uid}.part"
    shutil.copyfile(file, temp)
    store.place(temp, relative)
    return relative


def _relabel(path: Path, out: Path, **changes: str) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out


def _send(pipe: Pipeline, calling_ae: str, path: Path) -> int:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", pipe.ctx.config.dicom.port, ae_title="MI2B2")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
