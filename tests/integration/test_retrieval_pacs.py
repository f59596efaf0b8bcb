"""Governed retrieval end to end against real PACS: request, schedule, C-MOVE or
C-GET, receive, file into the cache, and judge completeness.

Orthanc and DCMTK dcmqrscp send by C-MOVE to mi2b2's receiver; pynetdicom's
qrscp serves C-GET. A TCP proxy between mi2b2 and the PACS lets a test cut
the PACS off, slow it down, and count associations from the PACS's side.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, CachedInstance, CachedStudy, Notification, Request
from mi2b2.config import PacsConfig, SiteConfig
from mi2b2.domain.receipt import move_message_id
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.services import cache as cache_service
from mi2b2.services.context import FindSessionPort
from mi2b2.services.requests import StudyPick, add_requests, cancel_requests
from mi2b2.services.retrieval import run_retrieval
from mi2b2.synthetic import SyntheticStudy, write_study
from support import studies
from support.pacs import RunningPacs, free_port, start_dcmqrscp, start_orthanc, start_qrscp
from support.pipeline import ALICE, Pipeline, by_sop, cache_files, retrieval_site, same_instance
from support.proxy import Proxy
from support.site import pacs_block

pytestmark = pytest.mark.pacs

FAST_RETRIES = """
    [institutions.departments.pacs.retries]
    max_attempts = 8
    first_delay = 0.5
    max_delay = 1.0
"""
BIG = SyntheticStudy(patient_id="77", patient_name="TEST^BIG", birth_date="19700101", sex="M", accession="ACC-BIG",
                     study_date="20240101", modality="CT", description="big CT", series_count=2,
                     instances_per_series=40, rows=256, cols=256)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("originals")
    return {
        "brain": write_study(studies.BRAIN, folder),
        "trauma": write_study(studies.TRAUMA, folder),
        "off_list": write_study(studies.OFF_LIST, folder),
        "big": write_study(BIG, folder),
    }


class Setup:
    def __init__(self, pacs: RunningPacs, receiver_port: int, slow_port: int, method: str) -> None:
        self.pacs = pacs
        self.receiver_port = receiver_port
        self.slow_port = slow_port  # the PACS also knows "MI2B2SLOW" here: a throttling proxy to the receiver
        self.method = method


@pytest.fixture(scope="module", params=["orthanc", "dcmqrscp", "qrscp"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          originals: dict[str, list[Path]]) -> Iterator[Setup]:
    receiver_port, slow_port = free_port(), free_port()
    destinations = {"MI2B2": ("127.0.0.1", receiver_port), "MI2B2SLOW": ("127.0.0.1", slow_port)}
    starter = {"orthanc": start_orthanc, "dcmqrscp": start_dcmqrscp, "qrscp": start_qrscp}[request.param]
    pacs = starter(tmp_path_factory.mktemp(request.param), move_destinations=destinations)
    try:
        pacs.load([f for files in originals.values() for f in files])
        yield Setup(pacs, receiver_port, slow_port, "c-get" if request.param == "qrscp" else "c-move")
    finally:
        pacs.stop()


def _site(folder: Path, setup: Setup, port: int | None = None, extra: str = FAST_RETRIES) -> Path:
    block = pacs_block("main", setup.pacs.ae_title, port or setup.pacs.port,
                       f'retrieve = "{setup.method}"\n' + extra)
    return retrieval_site(folder, setup.receiver_port, block)


def _add(pipe: Pipeline, *picks: StudyPick, priority: int = 0) -> list[int]:
    report = add_requests(pipe.ctx, ALICE, "alpha", "main", list(picks), priority)
    assert report.not_found == [] and report.not_permitted == []
    return report.created


def test_whole_study_and_series_subset_arrive_identical(tmp_path: Path, setup: Setup,
                                                        originals: dict[str, list[Path]],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mi2b2")
    with Pipeline(_site(tmp_path, setup)) as pipe:
        series = sorted({str(_header(f).SeriesInstanceUID) for f in originals["brain"]})
        ids = _add(pipe, StudyPick(studies.uid(studies.TRAUMA)),
                   StudyPick(studies.uid(studies.BRAIN), (series[0], series[2])))
        rows = pipe.wait(ids)
        assert [(r.state, r.received, r.expected_instances) for r in rows] == [("completed", 2, 2), ("completed", 4, 4)]

        received = by_sop(cache_files(pipe.ctx.config.cache_dir()))
        wanted = originals["trauma"] + [f for f in originals["brain"] if str(_header(f).SeriesInstanceUID) in series[::2]]
        assert sorted(received) == sorted(str(_header(f).SOPInstanceUID) for f in wanted)
        for original in wanted:
            assert same_instance(original, received[str(_header(original).SOPInstanceUID)])
        layout = received[str(_header(originals["trauma"][0]).SOPInstanceUID)].relative_to(pipe.ctx.config.cache_dir())
        assert layout.parts[:2] == ("alpha", studies.uid(studies.TRAUMA))

        usage = cache_service.project_usage(pipe.ctx, ALICE, "alpha")
        assert usage.used_bytes == sum(p.stat().st_size for p in received.values())
        assert usage.in_flight_bytes == 0

        # Already complete in the cache: not fetched again.
        again = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(studies.TRAUMA))])
        assert again.created == [] and again.already_cached == [studies.uid(studies.TRAUMA)]

        with pipe.ctx.sessions() as session:
            notices = session.execute(select(Notification).where(Notification.user_login == "alice")).scalars().all()
            events = session.execute(select(AuditEvent.detail).where(AuditEvent.action == "retrieve")).scalars().all()
        assert [n.kind for n in notices] == ["batch_done"] or len(notices) == 1
        assert sum('"event":"completed"' in e for e in events) == 2
    # Patient identifiers go to the audit trail, never to the ordinary log.
    assert "retrieving from main" in caplog.text
    for phi in (studies.BRAIN.patient_id, studies.BRAIN.patient_name, studies.TRAUMA.patient_name, "ACC-1001"):
        assert phi not in caplog.text


def test_one_query_asks_the_pacs_about_several_studies(tmp_path: Path, setup: Setup) -> None:
    """List of UID matching: `request add` of a cohort costs one STUDY-level C-FIND per hundred studies;
    a PACS that refuses lists is asked study by study, and finds the same."""
    with Pipeline(_site(tmp_path, setup), worker=False) as pipe:
        levels: list[str] = []
        governed = pipe.ctx.open_find

        @contextmanager
        def counted(config: SiteConfig, pacs: PacsConfig) -> Iterator[FindSessionPort]:
            with governed(config, pacs) as session:
                yield _Counted(session, levels)

        pipe.ctx.open_find = counted
        uids = [studies.uid(s) for s in (studies.BRAIN, studies.TRAUMA, studies.OFF_LIST)] + ["1.2.826.0.1.999"]
        report = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(uid) for uid in uids])
        assert len(report.created) == 2, report
        assert report.not_permitted == [studies.uid(studies.OFF_LIST)] and report.not_found == ["1.2.826.0.1.999"]
        # pynetdicom's qrscp refuses a list (0xC320): the studies are then asked one by one.
        assert levels.count("STUDY") == (1 + len(uids) if setup.pacs.kind == "qrscp" else 1), levels
        rows = pipe.requests(report.created)
        assert [(r.study_uid, r.patient_id, r.expected_instances) for r in rows] == [
            (studies.uid(studies.BRAIN), studies.BRAIN.patient_id, 6),
            (studies.uid(studies.TRAUMA), studies.TRAUMA.patient_id, 2)]


@dataclass
class _Counted:
    """A real PACS's find session that notes the level of each C-FIND sent through it."""

    session: FindSessionPort
    levels: list[str]

    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        self.levels.append(level)
        return self.session.find(model, level, keys)


def test_missing_instances_make_the_request_incomplete(tmp_path: Path, setup: Setup) -> None:
    if setup.pacs.kind != "dcmqrscp":
        pytest.skip("only dcmqrscp lets a test delete a stored file behind its index")
    with Pipeline(_site(tmp_path, setup)) as pipe:
        stored = sorted((setup.pacs.workdir / "storage").rglob("*"))
        victim = next(p for p in stored if p.is_file() and _is_instance_of(p, studies.uid(studies.BRAIN)))
        victim.unlink()
        ids = _add(pipe, StudyPick(studies.uid(studies.BRAIN)))
        (row,) = pipe.wait(ids)
        assert row.state == "incomplete"
        assert row.received == 5 and row.expected_instances == 6
        assert "1 of 6 instances never arrived" in (row.last_error or "")


def test_pacs_down_then_up_is_retried_and_completes(tmp_path: Path, setup: Setup) -> None:
    proxy = Proxy(setup.pacs.port).start()
    pipe = Pipeline(_site(tmp_path, setup, port=proxy.port))
    ids = _add(pipe, StudyPick(studies.uid(studies.TRAUMA)))  # the C-FIND still reaches the PACS
    proxy.down()
    with pipe:
        _wait_for(lambda: pipe.requests(ids)[0].attempts >= 2, 20)
        waiting = pipe.requests(ids)[0]
        assert waiting.state in ("scheduled", "processing")
        assert "cannot connect" in (waiting.last_error or "")
        proxy.up()
        (row,) = pipe.wait(ids, timeout=30)
        assert row.state == "completed" and row.received == 2 and row.attempts >= 2
    proxy.down()


def test_instances_acknowledged_but_never_counted_are_asked_for_again(tmp_path: Path, setup: Setup,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver answers before it indexes (in groups): one killed in between leaves the PACS saying
    it delivered what no receiver counted. That is mi2b2's loss, not the PACS's: asked for again."""
    if setup.pacs.kind != "orthanc":
        pytest.skip("the count after the C-MOVE does not depend on the PACS; one run is enough")
    with Pipeline(_site(tmp_path, setup)) as pipe:
        indexer = pipe.sink.indexer
        commit = indexer._commit
        lost: list[object] = []

        def killed_before_indexing_once(batch: list[Any]) -> None:
            if lost:
                commit(batch)
                return
            lost.extend(batch)  # answered, never indexed nor reported: as a receiver SIGKILLed here
            with indexer._done:
                indexer._committed += len(batch)
                indexer._done.notify_all()

        monkeypatch.setattr(indexer, "_commit", killed_before_indexing_once)
        ids = _add(pipe, StudyPick(studies.uid(studies.TRAUMA)))
        (row,) = pipe.wait(ids, timeout=60)
        assert lost, "the first group of instances was not lost: the test proved nothing"
        assert (row.state, row.received, row.attempts) == ("completed", 2, 2), (row.state, row.last_error)
        audited = [json.loads(d) for d in _audit_details(pipe, "retrieve")]
        assert any("counted 0" in e.get("error", "") for e in audited if e.get("event") == "transient failure")
        with pipe.ctx.sessions() as session:
            assert session.scalar(select(func.count()).select_from(CachedInstance)) == 2


def _audit_details(pipe: Pipeline, action: str) -> list[str]:
    with pipe.ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent.detail).where(AuditEvent.action == action)))


def test_pacs_refusing_fails_with_its_reason(tmp_path: Path, setup: Setup) -> None:
    if setup.method != "c-move":
        pytest.skip("C-GET has no move destination to refuse")
    site = _site(tmp_path, setup)
    site.write_text(site.read_text().replace('ae_title = "MI2B2"', 'ae_title = "STRANGER"'))
    with Pipeline(site) as pipe:
        ids = _add(pipe, StudyPick(studies.uid(studies.TRAUMA)))
        (row,) = pipe.wait(ids, timeout=30)
        assert row.state == "failed"
        assert "STRANGER" in (row.last_error or "") or "destination" in (row.last_error or "").lower()
        assert row.last_status is not None and row.last_status & 0xF000 in (0xA000, 0xC000)


def test_cancel_mid_transfer_stops_the_pacs_and_frees_the_slot(tmp_path: Path, setup: Setup) -> None:
    # Slow the images down so the cancel lands mid-study: C-GET images come over
    # the PACS link; C-MOVE images go to "MI2B2SLOW", a throttling proxy.
    slow = 2_000_000
    proxy = Proxy(setup.pacs.port, bytes_per_second=slow if setup.method == "c-get" else None).start()
    throttle = Proxy(setup.receiver_port, bytes_per_second=slow, listen_port=setup.slow_port).start()
    site = _site(tmp_path, setup, port=proxy.port)
    site.write_text(site.read_text().replace('ae_title = "MI2B2"', 'ae_title = "MI2B2SLOW"'))
    try:
        with Pipeline(site) as pipe:
            ids = _add(pipe, StudyPick(studies.uid(BIG)))
            _wait_for(lambda: pipe.requests(ids)[0].received >= 3, 30)
            cancel_requests(pipe.ctx, ALICE, ids)
            (row,) = pipe.wait(ids, timeout=30)
            assert row.state == "canceled"
            assert 3 <= row.received < 80
            assert pipe.worker is not None
            _wait_for(lambda: pipe.worker.busy() == 0, 10)
    finally:
        proxy.down()
        throttle.down()


def test_receipt_door_refuses_strangers_unrequested_studies_and_off_list_patients(
    tmp_path: Path, setup: Setup, originals: dict[str, list[Path]]
) -> None:
    if setup.pacs.kind != "orthanc":
        pytest.skip("the receipt door does not depend on the PACS; one run is enough")
    with Pipeline(_site(tmp_path, setup), worker=False) as pipe:
        # An in-flight retrieval exists for TRAUMA from this PACS, so only the checks can refuse.
        ids = _add(pipe, StudyPick(studies.uid(studies.TRAUMA)))
        _force_processing(pipe, ids)
        trauma = originals["trauma"][0]
        assert _send(pipe, "INTRUDER", trauma) == 0x0124  # unknown calling AE
        assert _send(pipe, setup.pacs.ae_title, originals["brain"][0]) == 0x0124  # nobody requested it
        assert _send(pipe, setup.pacs.ae_title, _with_patient(trauma, "OFFLIST-9", tmp_path)) == 0x0124
        assert cache_files(pipe.ctx.config.cache_dir()) == []
        assert list((pipe.ctx.config.cache_dir() / ".incoming").rglob("*.dcm")) == []
        with pipe.ctx.sessions() as session:
            denied = session.execute(
                select(AuditEvent.detail).where(AuditEvent.action == "receive", AuditEvent.outcome == "denied")
            ).scalars().all()
            instances = session.execute(select(func.count()).select_from(CachedInstance)).scalar_one()
        assert len(denied) == 3 and instances == 0
        assert any("no retrieval in progress" in d for d in denied)
        assert any("PatientID differs" in d for d in denied)
        # The same file from the right PACS is accepted.
        assert _send(pipe, setup.pacs.ae_title, trauma) == 0x0000
        assert len(cache_files(pipe.ctx.config.cache_dir())) == 1
        assert pipe.sink.indexer.flush(10)
        with pipe.ctx.sessions() as session:
            assert session.execute(select(func.count()).select_from(CachedStudy)).scalar_one() == 1


GAMMA = """
    [[projects]]
    id = "gamma"
    title = "Second cohort, same patients"
    irb = "2026P000456"
    expires = 2099-12-31
    mrn_file = "alpha.mrns"
    quota = "10 GiB"
    institutions = ["general"]
    members = [{ login = "alice" }]
"""


def test_two_projects_retrieving_one_study_at_once_each_get_their_own_instances(tmp_path: Path, setup: Setup) -> None:
    """The receiver tells the two retrievals apart by the Move Originator Message ID the PACS
    echoes from each C-MOVE (by the association itself, for C-GET). Matched by study alone,
    the later request's instances would all go to the older one, in the other project."""
    block = pacs_block("main", setup.pacs.ae_title, setup.pacs.port, f'retrieve = "{setup.method}"\n' + FAST_RETRIES)
    site = retrieval_site(tmp_path, setup.receiver_port, block, projects=GAMMA)
    with Pipeline(site, worker=False) as pipe:
        older, newer = (_processing(pipe, project, studies.TRAUMA, expected=2) for project in ("alpha", "gamma"))
        # The newer one runs while the older one is in flight too (started, its C-MOVE not yet sent).
        assert run_retrieval(pipe.ctx, newer, pipe.sink) == "completed"
        assert run_retrieval(pipe.ctx, older, pipe.sink) == "completed"
        rows = pipe.requests([older, newer])
        assert [(r.project_id, r.received, r.write_failure) for r in rows] == [("alpha", 2, None), ("gamma", 2, None)]
        if setup.method == "c-move":
            assert [(r.move_message_id, r.move_destination_ae) for r in rows] == [
                (move_message_id(older), "MI2B2"), (move_message_id(newer), "MI2B2")]
        with pipe.ctx.sessions() as session:
            filed = session.execute(select(CachedStudy.project_id, func.count()).join(CachedInstance)
                                    .group_by(CachedStudy.project_id).order_by(CachedStudy.project_id)).all()
        assert [tuple(f) for f in filed] == [("alpha", 2), ("gamma", 2)]


def _processing(pipe: Pipeline, project_id: str, study: SyntheticStudy, expected: int) -> int:
    """A retrieval as the scheduler leaves it when it starts one (the scheduler itself
    holds back a second retrieval of a study in flight from the same PACS)."""
    with transaction(pipe.ctx.sessions) as session:
        row = Request(kind=RequestKind.RETRIEVE, batch_id="test", project_id=project_id, user_login="alice",
                      pacs_id="main", patient_id=study.patient_id, study_uid=studies.uid(study),
                      accession=study.accession, series_uids=[], priority=0, state=RequestState.PROCESSING,
                      expected_instances=expected, expected_bytes=0, attempts=1, created_at=pipe.ctx.clock.now(),
                      started_at=pipe.ctx.clock.now(), worker="test")
        session.add(row)
        session.flush()
        return row.id


# --- helpers ---------------------------------------------------------------------------


def _header(path: Path):  # type: ignore[no-untyped-def]
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _is_instance_of(path: Path, study_uid: str) -> bool:
    try:
        return str(_header(path).StudyInstanceUID) == study_uid
    except Exception:
        return False


def _wait_for(condition, timeout: float) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _force_processing(pipe: Pipeline, ids: list[int]) -> None:
    from mi2b2.adapters.db.engine import transaction
    from mi2b2.adapters.db.tables import Request

    with transaction(pipe.ctx.sessions) as session:
        for request_id in ids:
            row = session.get_one(Request, request_id)
            row.state = "processing"
            row.worker = "test"


def _send(pipe: Pipeline, calling_ae: str, path: Path) -> int:
    import pydicom

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", pipe.ctx.config.dicom.port, ae_title="MI2B2")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def _with_patient(path: Path, patient_id: str, folder: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PatientID = patient_id
    out = folder / "forged.dcm"
    ds.save_as(out)
    return out


@pytest.mark.parametrize("fails_at", ["rename", "sync"])
def test_a_full_disk_fails_the_request_and_leaves_nothing_half_written(tmp_path: Path, setup: Setup, fails_at: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if setup.pacs.kind != "orthanc":
        pytest.skip("the write path does not depend on the PACS; one run is enough")
    from mi2b2.adapters.storage.cache_files import CacheFull

    with Pipeline(_site(tmp_path, setup)) as pipe:
        store = pipe.sink.store
        if fails_at == "rename":
            def full(temp: Path, relative: str) -> int:
                temp.unlink()  # as the real move_in does when the rename fails
                raise CacheFull(f"cannot place {relative}: No space left on device", 28)

            monkeypatch.setattr(store, "move_in", full)
        else:
            def no_sync(relatives: list[str]) -> list[str]:
                raise CacheFull("cannot sync: No space left on device", 28)

            monkeypatch.setattr(store, "make_durable", no_sync)
        ids = _add(pipe, StudyPick(studies.uid(studies.TRAUMA)))
        (row,) = pipe.wait(ids, timeout=30)
        assert row.state == "failed"
        assert "cannot write to the cache" in (row.last_error or "") and "No space left" in (row.last_error or "")
        assert cache_files(pipe.ctx.config.cache_dir()) == []
        assert [p for p in (pipe.ctx.config.cache_dir() / ".incoming").rglob("*") if p.is_file()] == []
        with pipe.ctx.sessions() as session:
            assert session.execute(select(func.count()).select_from(CachedInstance)).scalar_one() == 0
