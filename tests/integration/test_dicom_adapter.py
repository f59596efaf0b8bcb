"""The DICOM SCU adapter against three real PACS: Orthanc, DCMTK dcmqrscp, pynetdicom qrscp.

Each PACS starts once for the module (fixture parametrised by kind) and holds
the same generated studies. Known differences between them, asserted here so a
change shows up:
* dcmqrscp and qrscp do not compute ModalitiesInStudy / Number*RelatedInstances
  and do not index SeriesDescription: those keys come back absent or empty.
* qrscp accepts any called AE title, so only Orthanc and dcmqrscp can reject one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mi2b2.adapters.dicom.errors import (
    AssociationAborted,
    AssociationRejected,
    PacsTimeout,
    PacsUnreachable,
    ResultsTruncated,
)
from mi2b2.adapters.dicom.scu import (
    DicomPeer,
    LocalAE,
    QueryLevel,
    QueryModel,
    echo,
    find_once,
    open_find_session,
)
from mi2b2.errors import InvalidInput, PermanentError, RetriableError
from mi2b2.synthetic import SyntheticStudy, series_instance_uid, study_instance_uid, write_study
from support.pacs import RunningPacs, free_port, start_dcmqrscp, start_orthanc, start_qrscp

pytestmark = [pytest.mark.pacs, pytest.mark.timeout(60)]

LOCAL = LocalAE("MI2B2")

JANE_MR = SyntheticStudy("MRN1001", "DOE^JANE", "19700101", "F", "ACC1001", "20230115", "MR", "MRI BRAIN", 2, 2)
JANE_CT = SyntheticStudy("MRN1001", "DOE^JANE", "19700101", "F", "ACC1002", "20240220", "CT", "CT CHEST", 1, 3)
RICHARD_US = SyntheticStudy("MRN2002", "ROE^RICHARD", "19650505", "M", "ACC2001", "20240301", "US", "US ABDOMEN", 1, 2)
STUDIES = [JANE_MR, JANE_CT, RICHARD_US]

STUDY_KEYS: dict[str, str | None] = {
    "PatientID": "",
    "PatientName": "",
    "StudyInstanceUID": "",
    "AccessionNumber": "",
    "StudyDate": "",
    "StudyDescription": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedInstances": "",
}
SERIES_KEYS: dict[str, str | None] = {
    "SeriesInstanceUID": "",
    "Modality": "",
    "SeriesNumber": "",
    "SeriesDescription": "",
    "NumberOfSeriesRelatedInstances": "",
}

STARTERS: dict[str, Callable[[Path], RunningPacs]] = {
    # Orthanc checks the called AE title so the rejection test has something to hit.
    "orthanc": lambda workdir: start_orthanc(workdir, extra={"DicomCheckCalledAet": True}),
    "dcmqrscp": start_dcmqrscp,
    "qrscp": start_qrscp,
}


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("studies")
    return [path for study in STUDIES for path in write_study(study, out)]


@pytest.fixture(scope="module", params=sorted(STARTERS))
def pacs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, study_files: list[Path]
) -> Iterator[RunningPacs]:
    kind: str = request.param
    server = STARTERS[kind](tmp_path_factory.mktemp(kind))
    try:
        server.load(study_files)
        yield server
    finally:
        server.stop()


def peer_of(server: RunningPacs, ae_title: str | None = None) -> DicomPeer:
    return DicomPeer(ae_title or server.ae_title, server.host, server.port, connect_timeout=2, acse_timeout=5, dimse_timeout=10)


def present(answer: dict[str, str], key: str) -> bool:
    return bool(answer.get(key))


# --- C-ECHO -----------------------------------------------------------------------------


def test_echo_answers_quickly(pacs: RunningPacs) -> None:
    seconds = echo(LOCAL, peer_of(pacs))
    assert 0 < seconds < 2


def test_echo_to_a_closed_port_is_unreachable_and_says_what_to_check() -> None:
    peer = DicomPeer("NOBODY", "127.0.0.1", free_port(), connect_timeout=2)
    with pytest.raises(PacsUnreachable) as caught:
        echo(LOCAL, peer)
    message = str(caught.value)
    assert f"NOBODY@127.0.0.1:{peer.port}" in message
    assert "check that the PACS is running" in message
    assert isinstance(caught.value, RetriableError)


# --- C-FIND -----------------------------------------------------------------------------


def test_patient_level_with_patient_root(pacs: RunningPacs) -> None:
    answers = find_once(
        LOCAL,
        peer_of(pacs),
        QueryModel.PATIENT_ROOT,
        QueryLevel.PATIENT,
        {"PatientID": "MRN1001", "PatientName": "", "PatientBirthDate": "", "PatientSex": ""},
    )
    assert len(answers) == 1
    assert answers[0]["PatientID"] == "MRN1001"
    assert answers[0]["PatientName"] == "DOE^JANE"
    assert answers[0].get("PatientBirthDate") in ("19700101", None)  # qrscp does not return it


def test_study_level_with_study_root(pacs: RunningPacs) -> None:
    answers = find_once(LOCAL, peer_of(pacs), QueryModel.STUDY_ROOT, QueryLevel.STUDY, {**STUDY_KEYS, "PatientID": "MRN1001"})
    by_uid = {a["StudyInstanceUID"]: a for a in answers}
    assert set(by_uid) == {study_instance_uid(JANE_MR), study_instance_uid(JANE_CT)}
    for study in (JANE_MR, JANE_CT):
        answer = by_uid[study_instance_uid(study)]
        assert answer["PatientID"] == "MRN1001"
        assert answer["PatientName"] == "DOE^JANE"
        assert answer["AccessionNumber"] == study.accession
        assert answer["StudyDate"] == study.study_date
        assert answer.get("StudyDescription", study.description) in (study.description, "")
        expected_count = str(study.series_count * study.instances_per_series)
        if pacs.kind == "orthanc":
            assert answer["ModalitiesInStudy"] == study.modality
            assert answer["NumberOfStudyRelatedInstances"] == expected_count
        else:  # computed keys are not supported: absent or empty, never wrong
            assert answer.get("ModalitiesInStudy") in (None, "", study.modality)
            assert answer.get("NumberOfStudyRelatedInstances") in (None, "", expected_count)


def test_study_level_with_date_range_and_patient_root(pacs: RunningPacs) -> None:
    answers = find_once(
        LOCAL,
        peer_of(pacs),
        QueryModel.PATIENT_ROOT,
        QueryLevel.STUDY,
        {"PatientID": "MRN1001", "StudyDate": "20240101-20241231", "StudyInstanceUID": "", "AccessionNumber": ""},
    )
    assert [a["AccessionNumber"] for a in answers] == ["ACC1002"]


def test_series_level(pacs: RunningPacs) -> None:
    uid = study_instance_uid(JANE_MR)
    answers = find_once(LOCAL, peer_of(pacs), QueryModel.STUDY_ROOT, QueryLevel.SERIES, {**SERIES_KEYS, "StudyInstanceUID": uid})
    by_number = {a["SeriesNumber"]: a for a in answers}
    assert set(by_number) == {"1", "2"}
    for number, answer in by_number.items():
        assert answer["SeriesInstanceUID"] == series_instance_uid(JANE_MR, int(number))
        assert answer["StudyInstanceUID"] == uid
        assert answer["Modality"] == "MR"
        if pacs.kind == "orthanc":
            assert answer["NumberOfSeriesRelatedInstances"] == "2"
            assert present(answer, "SeriesDescription")


def test_unknown_patient_has_no_answers(pacs: RunningPacs) -> None:
    assert find_once(LOCAL, peer_of(pacs), "study", "STUDY", {**STUDY_KEYS, "PatientID": "NOSUCH999"}) == []


def test_many_finds_reuse_one_association_and_stay_fast(pacs: RunningPacs) -> None:
    rounds = 30
    with open_find_session(LOCAL, peer_of(pacs)) as session:
        association = session._assoc
        started = time.perf_counter()
        for i in range(rounds):
            mrn, expected = ("MRN1001", 2) if i % 2 else ("MRN2002", 1)
            answers = session.find(QueryModel.STUDY_ROOT, QueryLevel.STUDY, {"PatientID": mrn, "StudyInstanceUID": ""})
            assert len(answers) == expected
        per_find = (time.perf_counter() - started) / rounds
        assert session._assoc is association
    # With Nagle left on, each C-FIND costs ~45 ms on loopback; with TCP_NODELAY
    # 3-10 ms. The bound is loose for loaded machines but catches the regression.
    assert per_find < 0.035, f"{per_find * 1000:.1f} ms per C-FIND on a kept association"


def test_queried_patient_id_reaches_the_pacs_log(pacs: RunningPacs) -> None:
    marker = "LOGPROBE4711"
    assert find_once(LOCAL, peer_of(pacs), "study", "STUDY", {"PatientID": marker, "StudyInstanceUID": ""}) == []
    deadline = time.monotonic() + 5
    while marker not in pacs.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # dcmqrscp's forked child and Orthanc write asynchronously
    assert marker in pacs.log_text()


def test_our_logs_carry_no_patient_data(pacs: RunningPacs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    find_once(LOCAL, peer_of(pacs), "study", "STUDY", {**STUDY_KEYS, "PatientID": "MRN1001"})
    assert caplog.records, "expected at least our DEBUG summary line"
    assert "MRN1001" not in caplog.text
    assert "DOE^JANE" not in caplog.text


def test_wrong_called_ae_title_is_rejected_with_the_reason(pacs: RunningPacs) -> None:
    if pacs.kind == "qrscp":
        pytest.skip("pynetdicom's qrscp accepts any called AE title")
    with pytest.raises(AssociationRejected) as caught, open_find_session(LOCAL, peer_of(pacs, "NOTTHEPACS")):
        pass
    message = str(caught.value)
    assert "Called AE title not recognised" in message
    assert f"NOTTHEPACS@127.0.0.1:{pacs.port}" in message
    assert "'NOTTHEPACS'" in message
    assert isinstance(caught.value, PermanentError)


# --- behaviour that needs one particular PACS -----------------------------------------------


@pytest.fixture(scope="module")
def capped_orthanc(tmp_path_factory: pytest.TempPathFactory, study_files: list[Path]) -> Iterator[RunningPacs]:
    """Orthanc that answers at most one match per C-FIND and drops idle associations after 1 s."""
    server = start_orthanc(tmp_path_factory.mktemp("capped"), limit_find_results=1, extra={"DicomScpTimeout": 1})
    try:
        server.load(study_files)
        yield server
    finally:
        server.stop()


def test_pacs_answer_limit_raises_instead_of_truncating(capped_orthanc: RunningPacs) -> None:
    with pytest.raises(ResultsTruncated) as caught:
        find_once(LOCAL, peer_of(capped_orthanc), "study", "STUDY", {"PatientID": "MRN1001", "StudyInstanceUID": ""})
    assert caught.value.received == 1
    assert len(caught.value.answers) == 1
    assert "Narrow the search" in str(caught.value)


def test_session_reopens_an_association_the_pacs_closed_while_idle(capped_orthanc: RunningPacs) -> None:
    keys: dict[str, str | None] = {"PatientID": "MRN2002", "StudyInstanceUID": ""}
    with open_find_session(LOCAL, peer_of(capped_orthanc)) as session:
        assert len(session.find("study", "STUDY", keys)) == 1
        first = session._assoc
        time.sleep(2.5)  # Orthanc's DicomScpTimeout (1 s) releases the idle association
        assert len(session.find("study", "STUDY", keys)) == 1
        assert session._assoc is not first


@pytest.fixture
def throwaway_orthanc(tmp_path: Path) -> Iterator[RunningPacs]:
    """An Orthanc a test may freeze (SIGSTOP) or kill."""
    server = start_orthanc(tmp_path / "throwaway")
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGCONT)
        server.stop()


def test_a_frozen_pacs_times_out(throwaway_orthanc: RunningPacs) -> None:
    peer = DicomPeer(throwaway_orthanc.ae_title, "127.0.0.1", throwaway_orthanc.port, dimse_timeout=1)
    with open_find_session(LOCAL, peer) as session:
        assert session.find("study", "STUDY", {"PatientID": "X1", "StudyInstanceUID": ""}) == []
        os.killpg(throwaway_orthanc.process.pid, signal.SIGSTOP)
        with pytest.raises(PacsTimeout, match="did not answer within 1 s"):
            session.find("study", "STUDY", {"PatientID": "X1", "StudyInstanceUID": ""})


def test_a_pacs_dying_during_a_find_raises_rather_than_answering_nothing(throwaway_orthanc: RunningPacs) -> None:
    group = throwaway_orthanc.process.pid
    peer = DicomPeer(throwaway_orthanc.ae_title, "127.0.0.1", throwaway_orthanc.port, dimse_timeout=20)
    outcome: list[object] = []
    with open_find_session(LOCAL, peer) as session:
        session.find("study", "STUDY", {"PatientID": "X1", "StudyInstanceUID": ""})
        os.killpg(group, signal.SIGSTOP)  # the request will sit unanswered...

        def run() -> None:
            try:
                outcome.append(session.find("study", "STUDY", {"PatientID": "X1", "StudyInstanceUID": ""}))
            except Exception as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.3)
        os.killpg(group, signal.SIGKILL)  # ...until the PACS dies and the kernel closes its socket
        worker.join(timeout=10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], AssociationAborted), outcome


def test_invalid_keys_fail_before_any_network_traffic() -> None:
    unreachable = DicomPeer("NOBODY", "127.0.0.1", free_port())
    with pytest.raises(InvalidInput, match="not a DICOM keyword"):
        find_once(LOCAL, unreachable, "study", "STUDY", {"PatientId": "x"})
    with pytest.raises(InvalidInput, match="no PATIENT level"):
        find_once(LOCAL, unreachable, "study", "PATIENT", {"PatientID": "x"})
