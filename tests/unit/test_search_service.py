from __future__ import annotations

from pathlib import Path

import pytest

from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, InvalidInput
from mi2b2.services import search
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import load_site, pacs_block

ALICE = Principal("alice", Role.RESEARCHER)
CAROL = Principal("carol", Role.RESEARCHER)
ADMIN = Principal("root", Role.ADMIN)


def study(pid: str, uid: str, date: str, accession: str = "", modality: str = "MR") -> dict[str, str]:
    return {"PatientID": pid, "PatientName": f"Doe^{pid}", "StudyInstanceUID": uid, "StudyDate": date,
            "AccessionNumber": accession or f"A{uid}", "ModalitiesInStudy": modality, "StudyTime": "101010"}


STUDIES = [
    study("000123", "1.1", "20200101"),
    study("000123", "1.2", "20210101"),
    study("123", "1.3", "20210101"),  # same digits without the leading zeros: a different patient
    study("77", "1.4", "20220101", accession="ACC77"),
    study("OFFLIST", "1.5", "20220101", accession="ACCOFF"),
]


@pytest.fixture
def pacs() -> FakeFindSession:
    return FakeFindSession(STUDIES, series=[
        {"StudyInstanceUID": "1.1", "SeriesInstanceUID": "1.1.1", "SeriesNumber": "1", "Modality": "MR",
         "SeriesDescription": "T1", "NumberOfSeriesRelatedInstances": "10"},
        {"StudyInstanceUID": "1.5", "SeriesInstanceUID": "1.5.1", "SeriesNumber": "1", "Modality": "MR"},
    ])


@pytest.fixture
def ctx(tmp_path: Path, pacs: FakeFindSession) -> ServiceContext:
    config = load_site(tmp_path)
    return build_context(config, clock=FakeClock(), open_find=lambda _c, _p: pacs)


def test_off_list_mrn_is_refused_audited_and_never_sent(ctx: ServiceContext, pacs: FakeFindSession) -> None:
    report = search.search_studies(ctx, ALICE, "alpha", "main", "000123\nOFFLIST\n77\n000123\nMRN-0002")
    assert report.refused == ["OFFLIST"]
    assert "OFFLIST" not in pacs.sent_values("PatientID")
    assert pacs.sent_values("PatientID") == {"000123", "77", "MRN-0002"}
    assert {s.study_uid for s in report.studies} == {"1.1", "1.2", "1.4"}
    assert report.duplicates == ["000123"]
    assert report.not_found == ["MRN-0002"]
    denied = ctx.audit.list(ADMIN, AuditFilter(action="denied", patient_id="OFFLIST"))
    assert [e.patient_id for e in denied] == ["OFFLIST"]


def test_leading_zeros_are_kept(ctx: ServiceContext, pacs: FakeFindSession) -> None:
    report = search.search_patients(ctx, ALICE, "alpha", "main", " 000123 ")
    assert [p.patient_id for p in report.patients] == ["000123"]
    assert report.patients[0].study_count == 2


def test_answers_for_other_patients_are_dropped(ctx: ServiceContext) -> None:
    loose = FakeFindSession(STUDIES)
    loose.find = lambda model, level, keys: [dict(s) for s in STUDIES]  # type: ignore[method-assign]
    ctx.open_find = lambda _c, _p: loose
    report = search.search_studies(ctx, ALICE, "alpha", "main", "77")
    assert {s.patient_id for s in report.studies} == {"77"}


def test_expired_irb_is_denied_and_audited(ctx: ServiceContext, pacs: FakeFindSession) -> None:
    with pytest.raises(AccessDenied, match="expired"):
        search.search_studies(ctx, CAROL, "beta", "main", "B-1")
    assert pacs.queries == []
    assert ctx.audit.list(ADMIN, AuditFilter(actor="carol", action="denied"))


def test_non_member_is_denied(ctx: ServiceContext, pacs: FakeFindSession) -> None:
    with pytest.raises(AccessDenied, match="not a member"):
        search.search_studies(ctx, CAROL, "alpha", "main", "77")
    assert pacs.queries == []


def test_accessions_of_off_list_patients_are_not_permitted(ctx: ServiceContext) -> None:
    report = search.search_accessions(ctx, ALICE, "alpha", "main", "ACC77\nACCOFF\nNOPE")
    assert [s.accession for s in report.studies] == ["ACC77"]
    assert report.not_permitted == ["ACCOFF"]
    assert report.not_found == ["NOPE"]
    events = ctx.audit.list(ADMIN, AuditFilter(action="denied", patient_id="OFFLIST"))
    assert len(events) == 1


def test_series_of_an_off_list_study_are_not_listed(ctx: ServiceContext) -> None:
    report = search.search_series(ctx, ALICE, "alpha", "main", ["1.1", "1.5"])
    assert [s.series_uid for s in report.series] == ["1.1.1"]
    assert report.not_permitted == ["1.5"]


def test_result_cap_is_split_by_date(tmp_path: Path) -> None:
    many = [study("000123", f"2.{i}", f"2020{1 + i % 12:02d}{1 + i % 28:02d}") for i in range(23)]
    capped = FakeFindSession(many, result_limit=5)
    config = load_site(tmp_path, pacs_blocks=pacs_block("main", "PACS", 11113, "find_result_limit = 5\n"))
    ctx = build_context(config, clock=FakeClock(), open_find=lambda _c, _p: capped)
    report = search.search_studies(ctx, ALICE, "alpha", "main", "000123")
    assert len(report.studies) == 20  # the project's per-patient cap
    assert report.capped == {"000123": 3}
    assert len({s.study_uid for s in report.studies}) == 20


def test_garbage_mrn_list_is_a_clear_error(ctx: ServiceContext, pacs: FakeFindSession) -> None:
    with pytest.raises(InvalidInput, match="no MRNs found"):
        search.search_studies(ctx, ALICE, "alpha", "main", " \n\n ")
    with pytest.raises(InvalidInput, match="wildcard"):
        search.search_studies(ctx, ALICE, "alpha", "main", "*")
    assert pacs.queries == []


def test_unknown_pacs_is_a_clear_error(ctx: ServiceContext) -> None:
    with pytest.raises(InvalidInput, match="unknown PACS 'nope'"):
        search.search_studies(ctx, ALICE, "alpha", "nope", "77")


def test_each_search_is_stored_and_audited(ctx: ServiceContext) -> None:
    report = search.search_studies(ctx, ALICE, "alpha", "main", "77")
    queries = ctx.audit.list(ADMIN, AuditFilter(action="query", patient_id="77"))
    assert len(queries) == 1 and f'"query":{report.query_id}' in queries[0].detail


def test_modalities_and_series_count_a_pacs_leaves_out_come_from_its_series(tmp_path: Path) -> None:
    bare = [{k: v for k, v in s.items() if k != "ModalitiesInStudy"} for s in STUDIES]
    pacs = FakeFindSession(bare, series=[
        {"StudyInstanceUID": "1.4", "SeriesInstanceUID": "1.4.1", "Modality": "CT"},
        {"StudyInstanceUID": "1.4", "SeriesInstanceUID": "1.4.2", "Modality": "SR"},
        {"StudyInstanceUID": "1.4", "SeriesInstanceUID": "1.4.3", "Modality": "CT"},
        {"StudyInstanceUID": "1.5", "SeriesInstanceUID": "1.5.1", "Modality": "MR"},
    ])
    ctx = build_context(load_site(tmp_path), clock=FakeClock(), open_find=lambda _c, _p: pacs)
    (hit,) = search.search_accessions(ctx, ALICE, "alpha", "main", "ACC77\nACCOFF").studies
    assert (hit.accession, hit.modalities, hit.series_count) == ("ACC77", "CT\\SR", 3)
    # The off-list patient's study was refused before anything more was asked about it.
    series_queries = [keys for _m, level, keys in pacs.queries if level == "SERIES"]
    assert [q["StudyInstanceUID"] for q in series_queries] == ["1.4"]
    (by_mrn,) = search.search_studies(ctx, ALICE, "alpha", "main", "77").studies
    assert (by_mrn.modalities, by_mrn.series_count) == ("CT\\SR", 3)


def test_a_pacs_that_gives_modalities_is_not_asked_again(ctx: ServiceContext, pacs: FakeFindSession) -> None:
    pacs.studies = [dict(s, NumberOfStudyRelatedSeries="1") for s in STUDIES]
    report = search.search_studies(ctx, ALICE, "alpha", "main", "000123")
    assert [s.modalities for s in report.studies] == ["MR", "MR"]
    assert {level for _m, level, _k in pacs.queries} == {"STUDY"}
