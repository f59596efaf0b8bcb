"""Search end to end through the API, against three real PACS implementations.

Each PACS is started on a free 127.0.0.1 port with generated studies. Its own
log proves what reached it: a refused MRN must never appear there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import build_context
from support import studies
from support.pacs import RunningPacs, free_port, start_dcmqrscp, start_orthanc, start_qrscp
from support.site import pacs_block, write_site

pytestmark = pytest.mark.pacs
STARTERS = {"orthanc": start_orthanc, "dcmqrscp": start_dcmqrscp, "qrscp": start_qrscp}
ADMIN = Principal("root", Role.ADMIN)


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return studies.write_all(tmp_path_factory.mktemp("studies"))


@pytest.fixture(scope="module", params=list(STARTERS))
def pacs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         dicom_files: list[Path]) -> Iterator[RunningPacs]:
    running = STARTERS[request.param](tmp_path_factory.mktemp(request.param))
    try:
        running.load(dicom_files)
        yield running
    finally:
        running.stop()


def _client(folder: Path, pacs_blocks: str, allowed: list[str] | None = None) -> tuple[TestClient, dict[str, str]]:
    """An API client and tokens for alice (alpha lead), carol (beta, expired) and dave (no project)."""
    config = load_config(write_site(folder, pacs_blocks=pacs_blocks,
                                    allowed_a=allowed or ["000123", "MRN-0002", "77", "PAT004", "123456"]))
    ctx = build_context(config)
    tokens = {}
    for login in ("alice", "carol", "dave"):
        ctx.accounts.add_user(ADMIN, login, "researcher", None)
        tokens[login] = ctx.accounts.create_token(ADMIN, login, "test").secret
    return TestClient(create_app(ctx)), tokens


@pytest.fixture
def api(tmp_path: Path, pacs: RunningPacs) -> tuple[TestClient, dict[str, str]]:
    return _client(tmp_path, pacs_block("main", pacs.ae_title, pacs.port))


def _post(api: tuple[TestClient, dict[str, str]], path: str, body: dict[str, object], who: str = "alice"):  # type: ignore[no-untyped-def]
    client, tokens = api
    return client.post(f"/api/v1/search/{path}", json=body, headers={"Authorization": f"Bearer {tokens[who]}"})


def test_off_list_mrn_never_reaches_the_pacs(api: tuple[TestClient, dict[str, str]], pacs: RunningPacs) -> None:
    response = _post(api, "studies", {"project": "alpha", "pacs": "main", "mrns": "000123\nOFFLIST-9\n77"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["refused"] == ["OFFLIST-9"]
    assert {s["study_uid"] for s in report["studies"]} == {
        studies.uid(studies.BRAIN), studies.uid(studies.BRAIN_FOLLOW_UP), studies.uid(studies.TRAUMA)}
    log = pacs.log_text()
    assert "000123" in log  # the log does show the identifiers we sent ...
    assert "OFFLIST-9" not in log  # ... and the refused one was never among them
    audit = api[0].post("/api/v1/audit/search", json={"patient": "OFFLIST-9"},
                        headers={"Authorization": f"Bearer {api[1]['alice']}"})
    assert audit.status_code == 403  # researchers may not read the trail


def test_searches_are_kept_and_no_phi_reaches_the_ordinary_log(
    api: tuple[TestClient, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        report = _post(api, "studies", {"project": "alpha", "pacs": "main", "mrns": "000123\nOFFLIST-9"}).json()
    assert report["studies"]
    assert "000123" not in caplog.text and "OFFLIST-9" not in caplog.text and "TEST^" not in caplog.text
    client, tokens = api
    queries = client.get("/api/v1/projects/alpha/queries", headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert queries.json()[0]["keys"] == {"mrns": ["000123"]} and queries.json()[0]["refused_count"] == 1
    stranger = client.get("/api/v1/projects/alpha/queries", headers={"Authorization": f"Bearer {tokens['dave']}"})
    assert stranger.status_code == 403


def test_pacs_list_with_echo_status(api: tuple[TestClient, dict[str, str]]) -> None:
    client, tokens = api
    nodes = client.get("/api/v1/pacs", params={"echo": True}, headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert [(n["id"], n["echo"]["reachable"]) for n in nodes.json()] == [("main", True)]


def test_patients_duplicates_and_not_found(api: tuple[TestClient, dict[str, str]]) -> None:
    response = _post(api, "patients", {"project": "alpha", "pacs": "main", "mrns": "000123\n000123\nMRN-0002\n77"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert {p["patient_id"]: p["study_count"] for p in report["patients"]} == {"000123": 2, "77": 1}
    assert report["duplicates"] == ["000123"]
    assert report["not_found"] == ["MRN-0002"]


def test_patient_root_query_model(tmp_path: Path, pacs: RunningPacs) -> None:
    api = _client(tmp_path, pacs_block("main", pacs.ae_title, pacs.port, 'query_model = "patient"\n'))
    report = _post(api, "patients", {"project": "alpha", "pacs": "main", "mrns": "000123\n123456"}).json()
    assert [p["patient_id"] for p in report["patients"]] == ["000123"]
    assert report["patients"][0]["patient_name"] == "TEST^000123"
    assert report["not_found"] == ["123456"]


def test_accessions_of_off_list_patients_are_not_permitted(api: tuple[TestClient, dict[str, str]]) -> None:
    response = _post(api, "accessions", {"project": "alpha", "pacs": "main",
                                         "accessions": "ACC-1002\nACC-9001\nACC-3001\nACC-NONE"})
    report = response.json()
    assert [s["accession"] for s in report["studies"]] == ["ACC-1002"]
    # Every PACS gives the modality and series count, whether it supports ModalitiesInStudy or not.
    assert [(s["modalities"], s["series_count"]) for s in report["studies"]] == [("MR", 1)]
    assert sorted(report["not_permitted"]) == ["ACC-3001", "ACC-9001"]  # 123 is not 000123
    assert report["not_found"] == ["ACC-NONE"]


def test_series_level_query(api: tuple[TestClient, dict[str, str]], pacs: RunningPacs) -> None:
    brain = studies.uid(studies.BRAIN)
    response = _post(api, "series", {"project": "alpha", "pacs": "main", "studies": [brain, studies.uid(studies.OFF_LIST)]})
    report = response.json()
    assert [s["series_number"] for s in report["series"]] == ["1", "2", "3"]
    assert all(s["modality"] == "MR" and s["instance_count"] == 2 for s in report["series"])
    if pacs.kind == "orthanc":  # dcmqrscp and qrscp do not keep SeriesDescription in their index
        assert [s["description"] for s in report["series"]] == ["AX T1", "AX T2", "AX FLAIR"]
    assert report["not_permitted"] == [studies.uid(studies.OFF_LIST)]


def test_expired_irb_and_non_member_are_refused(api: tuple[TestClient, dict[str, str]], pacs: RunningPacs) -> None:
    expired = _post(api, "studies", {"project": "beta", "pacs": "main", "mrns": "B-1"}, who="carol")
    assert expired.status_code == 403 and "expired" in expired.json()["error"]
    stranger = _post(api, "studies", {"project": "alpha", "pacs": "main", "mrns": "77"}, who="dave")
    assert stranger.status_code == 403 and "not a member" in stranger.json()["error"]
    assert "B-1" not in pacs.log_text()


def test_bad_input_gets_clear_errors(api: tuple[TestClient, dict[str, str]]) -> None:
    unknown = _post(api, "studies", {"project": "alpha", "pacs": "nowhere", "mrns": "77"})
    assert unknown.status_code == 422 and "unknown PACS 'nowhere'" in unknown.json()["error"]
    empty = _post(api, "studies", {"project": "alpha", "pacs": "main", "mrns": "\n \n"})
    assert empty.status_code == 422 and "no MRNs found" in empty.json()["error"]
    missing = _post(api, "studies", {"project": "alpha", "pacs": "main"})
    assert missing.status_code == 422 and "mrns" in missing.json()["error"]


def test_unreachable_pacs_is_a_clear_error(tmp_path: Path) -> None:
    api = _client(tmp_path, pacs_block("main", "NOBODY", free_port()))
    response = _post(api, "studies", {"project": "alpha", "pacs": "main", "mrns": "77"})
    assert response.status_code == 503
    assert "NOBODY" in response.json()["error"]


@pytest.fixture(scope="module")
def capped_orthanc(tmp_path_factory: pytest.TempPathFactory, dicom_files: list[Path]) -> Iterator[RunningPacs]:
    running = start_orthanc(tmp_path_factory.mktemp("capped"), ae_title="CAPPED", limit_find_results=3)
    try:
        running.load(dicom_files)
        yield running
    finally:
        running.stop()


def test_result_cap_is_split_so_no_study_is_missed(tmp_path: Path, capped_orthanc: RunningPacs) -> None:
    api = _client(tmp_path, pacs_block("main", "CAPPED", capped_orthanc.port))
    response = _post(api, "studies", {"project": "alpha", "pacs": "main", "mrns": "PAT004"})
    assert response.status_code == 200, response.text
    report = response.json()
    assert sorted(s["accession"] for s in report["studies"]) == sorted(s.accession for s in studies.MANY)
    assert report["warnings"] == []
    date_ranges = capped_orthanc.log_text().count("(0008,0020) DA [")
    assert date_ranges >= 2  # the query really was split by StudyDate ranges
