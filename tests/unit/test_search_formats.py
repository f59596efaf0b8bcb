"""The door's institution decides what an MRN is: its format for pasted lists and answers, its issuer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.services import search
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import write_site

ALICE = Principal("alice", Role.RESEARCHER)
ADMIN = Principal("root", Role.ADMIN)
FORMAT = 'name = "General Hospital"\nissuer = "GEN"\nmrn_format = { digits = 6, remove = "-" }'


def study(pid: str, uid: str, issuer: str = "") -> dict[str, str]:
    answer = {"PatientID": pid, "PatientName": f"Doe^{pid}", "StudyInstanceUID": uid, "StudyDate": "20200101",
              "StudyTime": "101010", "AccessionNumber": f"A{uid}", "ModalitiesInStudy": "MR",
              "NumberOfStudyRelatedSeries": "1", "NumberOfStudyRelatedInstances": "2"}
    if issuer:
        answer["IssuerOfPatientID"] = issuer
    return answer


STUDIES = [study("000123", "1.1", "GEN"), study("123", "1.3"), study("000123", "1.2", "ELSEWHERE"),
           study("77", "1.4"), study("OFFLIST", "1.5")]


class LoosePacs(FakeFindSession):
    """A PACS that matches PatientID loosely (as some do: fuzzy, case-folding), answering for every patient."""

    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        self.queries.append((model, level, dict(keys)))
        uid = keys.get("StudyInstanceUID")
        return [dict(s) for s in self.studies if not uid or s["StudyInstanceUID"] == uid]


def _context(tmp_path: Path, pacs: FakeFindSession, formatted: bool) -> ServiceContext:
    path = write_site(tmp_path, allowed_a=["000123", "77"])
    (tmp_path / "beta.mrns").write_text("1\n")  # beta's list must fit General's format too
    if formatted:
        path.write_text(path.read_text().replace('name = "General Hospital"', FORMAT, 1))
    return build_context(load_config(path), clock=FakeClock(), open_find=lambda _c, _p: pacs)


def test_spellings_of_one_mrn_become_one_c_find_in_the_pacs_form(tmp_path: Path) -> None:
    pacs = LoosePacs(STUDIES)
    ctx = _context(tmp_path, pacs, formatted=True)
    report = search.search_studies(ctx, ALICE, "alpha", "main", "123\n00-0123\n000123")
    assert report.refused == [] and report.duplicates == ["00-0123", "000123"]
    assert pacs.sent_values("PatientID") == {"000123"}  # the canonical form, the one the PACS stores
    assert all(keys.get("IssuerOfPatientID") == "" for _m, _l, keys in pacs.queries if "PatientID" in keys)
    # "123" answered by the PACS is the same patient under this format; 77 and OFFLIST are not asked for.
    assert {s.study_uid for s in report.studies} == {"1.1", "1.3"}


def test_an_answer_naming_another_issuer_is_dropped_and_audited(tmp_path: Path) -> None:
    ctx = _context(tmp_path, LoosePacs(STUDIES), formatted=True)
    report = search.search_studies(ctx, ALICE, "alpha", "main", "000123")
    assert "1.2" not in {s.study_uid for s in report.studies}
    (dropped,) = ctx.audit.list(ADMIN, AuditFilter(action="denied"))
    answers = json.loads(dropped.detail)["answers"]
    assert {"IssuerOfPatientID": "ELSEWHERE", "PatientID": "000123", "StudyInstanceUID": "1.2"} in answers
    patients = search.search_patients(ctx, ALICE, "alpha", "main", "123")
    assert [(p.patient_id, p.issuer) for p in patients.patients] == [("000123", "GEN"), ("123", "")]


def test_without_a_format_the_spellings_are_different_patients(tmp_path: Path) -> None:
    pacs = LoosePacs(STUDIES)
    ctx = _context(tmp_path, pacs, formatted=False)
    report = search.search_studies(ctx, ALICE, "alpha", "main", "123\n00-0123\n000123")
    assert report.refused == ["123", "00-0123"]
    assert pacs.sent_values("PatientID") == {"000123"}
    assert {s.patient_id for s in report.studies} == {"000123"}  # the PACS's "123" is someone else


def test_a_value_the_format_cannot_hold_is_invalid_not_sent(tmp_path: Path) -> None:
    pacs = LoosePacs(STUDIES)
    ctx = _context(tmp_path, pacs, formatted=True)
    report = search.search_studies(ctx, ALICE, "alpha", "main", "77\nMRN-X")
    assert [e["value"] for e in report.invalid] == ["MRN-X"]
    assert pacs.sent_values("PatientID") == {"000077"}


@pytest.mark.parametrize(("uid", "reason"), [
    ("1.2", "another Issuer of Patient ID"),
    ("1.3", "stores the MRN in another form"),
    ("1.5", "not on the IRB allow-list"),
])
def test_request_add_refuses_what_later_doors_could_not_judge(tmp_path: Path, uid: str, reason: str) -> None:
    ctx = _context(tmp_path, LoosePacs(STUDIES), formatted=True)
    report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick(uid)])
    assert report.not_permitted == [uid] and report.created == []
    (denied,) = ctx.audit.list(ADMIN, AuditFilter(action="denied"))
    assert reason in denied.detail
    accepted = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1")])
    assert len(accepted.created) == 1
