"""IRB rules and identifier lists, with no network, no database and any date."""

from __future__ import annotations

from datetime import date

from hypothesis import given
from hypothesis import strategies as st

from mi2b2.domain.governance import Denial, ProjectPolicy, cap_per_patient, filter_answers, project_access, split_allowed
from mi2b2.domain.identifiers import parse_identifier_text

POLICY = ProjectPolicy("alpha", "2026P1", date(2026, 6, 30), True, frozenset({"general"}), {"alice": "lead"}, 2)


def test_member_with_active_irb_may_act() -> None:
    assert project_access(POLICY, "alice", date(2026, 6, 30), "general") is None


def test_irb_expires_after_its_last_day() -> None:
    assert project_access(POLICY, "alice", date(2026, 7, 1)) is Denial.IRB_EXPIRED


def test_non_member_institution_and_inactive_project() -> None:
    assert project_access(POLICY, "mallory", date(2026, 1, 1)) is Denial.NOT_MEMBER
    assert project_access(POLICY, "alice", date(2026, 1, 1), "elsewhere") is Denial.INSTITUTION_NOT_ALLOWED
    retired = ProjectPolicy("a", "i", date(2099, 1, 1), False, frozenset(), {"alice": "lead"})
    assert project_access(retired, "alice", date(2026, 1, 1)) is Denial.PROJECT_INACTIVE


@given(st.lists(st.text(min_size=1, max_size=8)), st.sets(st.text(min_size=1, max_size=8)))
def test_split_never_lets_an_unlisted_value_through(values: list[str], allowed: set[str]) -> None:
    kept, refused = split_allowed(values, allowed.__contains__)
    assert all(v in allowed for v in kept)
    assert all(v not in allowed for v in refused)
    assert sorted(kept + refused) == sorted(values)


def test_answers_are_filtered_exactly() -> None:
    answers = [{"PatientID": "00123"}, {"PatientID": "123"}, {"PatientID": "00123 "}]
    kept, dropped = filter_answers(answers, lambda a: a["PatientID"], {"00123"}.__contains__)
    assert kept == [{"PatientID": "00123"}]
    assert len(dropped) == 2


def test_cap_keeps_the_newest_studies_per_patient() -> None:
    studies = [("p1", "20200101"), ("p1", "20220101"), ("p1", "20210101"), ("p2", "20190101")]
    kept, left_out = cap_per_patient(studies, lambda s: s[0], lambda s: s[1], 2)
    assert kept == [("p1", "20220101"), ("p1", "20210101"), ("p2", "20190101")]
    assert left_out == {"p1": 1}


def test_identifier_lists_keep_leading_zeros_and_report_duplicates() -> None:
    parsed = parse_identifier_text(" 000123 \n123\n000123\n\n# comment\nMRN-7, MRN-8;MRN-9\n")
    assert parsed.unique == ["000123", "123", "MRN-7", "MRN-8", "MRN-9"]
    assert parsed.duplicates == ["000123"]


def test_csv_with_a_header_uses_the_mrn_column() -> None:
    parsed = parse_identifier_text("name,MRN,dob\nDoe,00042,1970\nRoe,00043,1971\n")
    assert parsed.unique == ["00042", "00043"]


def test_wildcards_and_overlong_values_are_invalid_not_cleaned() -> None:
    parsed = parse_identifier_text("00042\nA*\n" + "9" * 65)
    assert parsed.unique == ["00042"]
    assert [e.line for e in parsed.invalid] == [2, 3]


def test_receipt_door_checks_originator_patient_list_series_and_quota() -> None:
    from mi2b2.domain.receipt import InFlight, StoreStatus, judge_receipt

    request = InFlight(1, "alpha", "main", "77", frozenset({"1.2.3"}), True, quota_bytes=1000, used_bytes=900)
    assert judge_receipt(request, "77", "1.2.3", 50, None, "MI2B2") is None
    assert judge_receipt(request, "77", "1.2.3", 50, "MI2B2", "MI2B2") is None
    assert judge_receipt(request, "77", "1.2.3", 50, "PACS", "MI2B2", peer_ae="PACS") is None  # qrscp names itself
    assert judge_receipt(request, "77", "1.2.3", 50, "OTHER", "MI2B2", peer_ae="PACS").reason.startswith(
        "sent for a C-MOVE issued by 'OTHER'")
    assert judge_receipt(None, "77", "1.2.3", 50, None, "MI2B2").status == StoreStatus.REFUSED_NOT_AUTHORIZED
    assert "PatientID differs" in judge_receipt(request, "78", "1.2.3", 50, None, "MI2B2").reason
    assert "series not among" in judge_receipt(request, "77", "9.9", 50, None, "MI2B2").reason
    full = judge_receipt(request, "77", "1.2.3", 200, None, "MI2B2")
    assert full.status == StoreStatus.OUT_OF_RESOURCES and not full.security
    delisted = InFlight(1, "alpha", "main", "77", frozenset(), False, 1000, 0)
    assert judge_receipt(delisted, "77", "4.5", 10, None, "MI2B2").reason == "patient not on the project's IRB allow-list"
