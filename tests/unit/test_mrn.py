"""MRN formats and (institution, MRN) allow-lists: the pure rules in domain/mrn.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mi2b2.domain.identifiers import parse_identifier_text
from mi2b2.domain.mrn import (
    AllowedMrn,
    InstitutionRules,
    MrnFormat,
    MrnFormatError,
    issuer_conflicts,
    normalize_identifiers,
    parse_allow_list,
)
from mi2b2.domain.receipt import InFlight, StoreStatus, judge_receipt
from mi2b2.errors import InvalidInput

PADDED = MrnFormat(remove="-", digits=5)
NO_ZEROS = MrnFormat(remove="- ", strip_leading_zeros=True)
AS_WRITTEN = MrnFormat()
SPELLINGS = ["00123", "123", "00-123"]


@pytest.mark.parametrize(("fmt", "expected"), [
    (PADDED, {"00123"}),
    (NO_ZEROS, {"123"}),
    (AS_WRITTEN, {"00123", "123", "00-123"}),  # no format: three different patients
])
def test_one_patient_where_the_format_says_so_and_three_where_it_does_not(fmt: MrnFormat, expected: set[str]) -> None:
    assert {fmt.canonical(s) for s in SPELLINGS} == expected


def test_case_and_separators() -> None:
    fmt = MrnFormat(remove=" -.", case="upper")
    assert fmt.canonical("ns-20.417") == fmt.canonical("NS 20417") == "NS20417"
    assert MrnFormat().canonical("ns-20417") != MrnFormat().canonical("NS-20417")


@pytest.mark.parametrize(("value", "why"), [
    ("12A45", "is not a number"),
    ("123456", "more than the institution's 5 digits"),
    ("--", "is not a number"),
])
def test_a_value_the_format_cannot_hold_is_refused_not_guessed(value: str, why: str) -> None:
    with pytest.raises(MrnFormatError, match=why):
        PADDED.canonical(value)
    assert PADDED.canonical_or_none(value) is None


def test_contradictory_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="either digits"):
        MrnFormat(digits=7, strip_leading_zeros=True)
    with pytest.raises(ValueError, match="case"):
        MrnFormat(case="title")


formats = st.builds(
    MrnFormat,
    remove=st.sampled_from(["", "-", "- .", "/"]),
    digits=st.one_of(st.none(), st.integers(1, 12)),
    case=st.sampled_from(["keep", "upper", "lower"]),
)
mrn_text = st.text(alphabet="0123456789-. /AbZ", min_size=1, max_size=16)


@given(formats, mrn_text)
def test_canonical_is_a_fixed_point(fmt: MrnFormat, value: str) -> None:
    """Applied to the list, to pasted text and to PACS answers, the format must agree with itself."""
    canonical = fmt.canonical_or_none(value)
    if canonical is not None:
        assert fmt.canonical(canonical) == canonical
        if fmt.digits is not None:
            assert len(canonical) == fmt.digits and canonical.isdigit()
            assert int(canonical) == int("".join(c for c in value if c.isdigit()))


@given(st.integers(0, 99999), st.integers(0, 3))
def test_padding_keeps_the_number(number: int, extra_zeros: int) -> None:
    assert PADDED.canonical("0" * extra_zeros + str(number)) == f"{number:05d}"


def test_pasted_spellings_collapse_into_one_search() -> None:
    parsed = normalize_identifiers(parse_identifier_text("00123\n123\n00-123\n77\nABC"), PADDED)
    assert parsed.unique == ["00123", "00077"]
    assert parsed.duplicates == ["123", "00-123"]
    assert [(e.value, e.reason) for e in parsed.invalid] == [
        ("ABC", "is not a number, and this institution's MRNs are 5 digits")]
    as_written = normalize_identifiers(parse_identifier_text("00123\n123\n00-123"), AS_WRITTEN)
    assert as_written.unique == ["00123", "123", "00-123"] and as_written.duplicates == []


# --- allow-list files --------------------------------------------------------------------

NORTH_LAKE = {"northside": InstitutionRules(AS_WRITTEN, "NORTH"), "lakeside": InstitutionRules(PADDED, None)}
KNOWN = ["northside", "lakeside", "hilltop"]


def test_a_csv_names_each_entries_institution_in_its_format() -> None:
    parsed = parse_allow_list("institution,mrn\nnorthside,000123\nlakeside,00-123\nlakeside,123\n", NORTH_LAKE, KNOWN)
    assert parsed.entries == [AllowedMrn("northside", "000123"), AllowedMrn("lakeside", "00123")]
    assert parsed.duplicates == 1  # 00-123 and 123 are one lakeside patient


def test_a_plain_list_is_ambiguous_for_several_institutions() -> None:
    with pytest.raises(InvalidInput, match=r"ambiguous .* 2 institutions .*mrn_files .* institution column"):
        parse_allow_list("000123\n", NORTH_LAKE, KNOWN)
    single = parse_allow_list("000123\n", {"northside": NORTH_LAKE["northside"]}, KNOWN)
    assert single.entries == [AllowedMrn("northside", "000123")]
    per_institution = parse_allow_list("123\n", NORTH_LAKE, KNOWN, institution="lakeside")
    assert per_institution.entries == [AllowedMrn("lakeside", "00123")]


@pytest.mark.parametrize(("text", "message"), [
    ("institution,mrn\nnowhere,1\n", r"line 2: unknown institution 'nowhere'; configured institutions: hilltop, "),
    ("institution,mrn\nhilltop,1\n", r"line 2: institution 'hilltop' is not one this project reaches"),
    ("institution,mrn,issuer\nnorthside,1,LAKE\n", r"line 2: issuer 'LAKE' differs from institution 'northside'"),
    ("institution,mrn,issuer\nlakeside,1,LAKE\n", r"institution 'lakeside' has no issuer configured"),
    ("institution,mrn\nnorthside,\n", r"line 2: no MRN"),
    ("institution,mrn\n,000123\n", r"line 2: no institution"),
    ("institution,mrn\nlakeside,12A\n", r"line 2: '12A' is not a number"),
    ("institution,mrn\nnorthside,12*\n", r"line 2: '12\*' contains a wildcard"),
    ("institution,name\nnorthside,DOE\n", r"no MRN column"),
])
def test_an_entry_that_cannot_be_placed_names_its_line_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_allow_list(text, NORTH_LAKE, KNOWN)


def test_a_per_institution_file_cannot_list_another_institution() -> None:
    with pytest.raises(InvalidInput, match="this is the list of 'lakeside'"):
        parse_allow_list("institution,mrn\nnorthside,1\n", NORTH_LAKE, KNOWN, institution="lakeside")


# --- issuer ----------------------------------------------------------------------------


def test_issuer_conflicts_only_when_both_are_known_and_differ() -> None:
    assert issuer_conflicts("LAKE", "NORTH")
    assert not issuer_conflicts("NORTH", "NORTH") and not issuer_conflicts("NORTH ", "NORTH")
    assert not issuer_conflicts("", "NORTH") and not issuer_conflicts(None, "NORTH")
    assert not issuer_conflicts("LAKE", None)


def test_receipt_refuses_an_instance_of_another_issuer() -> None:
    request = InFlight(1, "alpha", "north", "000123", frozenset(), True, 1000, 0, issuer="NORTH")
    refusal = judge_receipt(request, "000123", "1.2", 10, None, "MI2B2", "NORTHPACS", issuer="LAKE")
    assert refusal is not None and refusal.status == StoreStatus.REFUSED_NOT_AUTHORIZED and refusal.security
    assert "Issuer of Patient ID" in refusal.reason
    assert judge_receipt(request, "000123", "1.2", 10, None, "MI2B2", "NORTHPACS", issuer="NORTH") is None
    assert judge_receipt(request, "000123", "1.2", 10, None, "MI2B2", "NORTHPACS") is None  # none sent
