"""Pure checks against hostile input: QIDO wildcards and query limits, WADO frame lists, names that
become paths. The live-server versions are in tests/integration/test_hostile_requests.py and
test_forged_downloads.py."""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary

from mi2b2.domain.safe_paths import check_all, inside, relative_name
from mi2b2.errors import InvalidInput, LimitExceeded
from mi2b2.services.dicomweb.matching import matches, wildcard
from mi2b2.services.dicomweb.query import (
    MAX_FRAMES,
    MAX_INCLUDE_FIELDS,
    MAX_LIMIT,
    MAX_LIST_VALUES,
    MAX_OFFSET,
    MAX_PARAMETERS,
    MAX_PATTERN_CHARS,
    MAX_VALUE_CHARS,
    MAX_WILDCARD_VALUES,
    frame_numbers,
    parse_query,
)

KEYWORDS = [entry[4] for entry in DicomDictionary.values() if entry[4]]


@settings(max_examples=3000, deadline=None)
@given(st.text("ab.1*?", max_size=10), st.text("ab.1", max_size=12))
def test_wildcards_match_exactly_as_shell_patterns_do(pattern: str, value: str) -> None:
    assert wildcard(pattern, value, False) == fnmatch.fnmatchcase(value, pattern)


def test_person_names_ignore_case_and_uids_do_not() -> None:
    assert matches("PatientName", "doe^*", "DOE^JOHN")
    assert not matches("StudyInstanceUID", "1.2.X*", "1.2.x5")
    assert matches("StudyInstanceUID", "9.9,1.2.*", "1.2.3")


@pytest.mark.parametrize("repeats", [8, 30, MAX_PATTERN_CHARS // 2])
def test_a_pattern_that_makes_regular_expressions_backtrack_is_matched_at_once(repeats: int) -> None:
    value = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012"
    started = time.perf_counter()
    for _ in range(100):
        assert not wildcard("*?" * repeats + "x", value, False)
        assert wildcard("*?" * min(repeats, len(value) // 2), value, False)
    assert time.perf_counter() - started < 1.0  # a regular expression took 52 s once, for 8 repeats


@pytest.mark.parametrize(("items", "named"), [
    ([("PatientID", "1")] * (MAX_PARAMETERS + 1), str(MAX_PARAMETERS)),
    ([("PatientName", "A" * (MAX_VALUE_CHARS + 1))], str(MAX_VALUE_CHARS)),
    ([("PatientName", "*?" * MAX_PATTERN_CHARS)], str(MAX_PATTERN_CHARS)),
    ([("StudyInstanceUID", ",".join(["1.2"] * (MAX_LIST_VALUES + 1)))], str(MAX_LIST_VALUES)),
    ([("StudyInstanceUID", ",".join(["1.2.*"] * (MAX_WILDCARD_VALUES + 1)))], str(MAX_WILDCARD_VALUES)),
    ([("limit", str(MAX_LIMIT + 1))], str(MAX_LIMIT)),
    ([("offset", str(MAX_OFFSET + 1))], str(MAX_OFFSET)),
    ([("includefield", ",".join(KEYWORDS[:MAX_INCLUDE_FIELDS + 1]))], str(MAX_INCLUDE_FIELDS)),
])
def test_every_query_parameter_has_a_limit_that_the_error_names(items: list[tuple[str, str]], named: str) -> None:
    with pytest.raises(LimitExceeded, match=named):
        parse_query(items)


def test_limits_themselves_are_accepted() -> None:
    query = parse_query([("limit", str(MAX_LIMIT)), ("offset", str(MAX_OFFSET)),
                         ("StudyInstanceUID", ",".join(["1.2"] * MAX_LIST_VALUES))])
    assert (query.limit, query.offset) == (MAX_LIMIT, MAX_OFFSET)
    with pytest.raises(InvalidInput, match="whole number"):
        parse_query([("limit", "9" * 5000)])  # past Python's digit limit: still a clear answer


def test_frame_lists_are_deduplicated_in_order_and_capped() -> None:
    assert frame_numbers(",".join(["3", "1", "3"] * 1000)) == [3, 1]
    assert frame_numbers(",".join(str(n) for n in range(1, MAX_FRAMES + 1))) == list(range(1, MAX_FRAMES + 1))
    with pytest.raises(LimitExceeded, match=str(MAX_FRAMES)):
        frame_numbers(",".join(str(n) for n in range(1, MAX_FRAMES + 2)))
    with pytest.raises(LimitExceeded, match=str(MAX_FRAMES)):
        frame_numbers(",".join(["1"] * 8000))
    with pytest.raises(InvalidInput, match="from 1"):
        frame_numbers("0,1")


@pytest.mark.parametrize("name", [
    "../x.dcm", "a/../../x.dcm", "/etc/passwd", "C:/x.dcm", "c:x.dcm", "a\\..\\x.dcm", "a/\x00.dcm", "a\n.dcm",
    "", "a//b.dcm", "./a.dcm", "a/./b.dcm", "a/..", "x" * 2000, "/".join(["a"] * 40),
])
def test_names_that_could_leave_the_target_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="nothing was written"):
        relative_name(name)
    with pytest.raises(InvalidInput):
        check_all(["fine/0001.dcm", name])


@pytest.mark.parametrize("name", [None, 7, b"a.dcm", ["a.dcm"]])
def test_a_name_that_is_not_text_is_refused(name: object) -> None:
    with pytest.raises(InvalidInput):
        relative_name(name)


def test_plain_relative_names_pass_and_stay_inside(tmp_path: Path) -> None:
    for name in ("P1/20240101_ACC/001_MR/0001.dcm", "..a/b..c/...dcm", "manifest.age"):
        assert inside(tmp_path, name) == tmp_path / name


def test_a_symbolic_link_out_of_the_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidInput, match="symbolic link"):
        inside(tmp_path / "out", "link/x.dcm")
    (tmp_path / "out" / "inner").symlink_to(tmp_path / "out")  # a link that stays inside is no escape
    assert inside(tmp_path / "out", "inner/x.dcm") == tmp_path / "out" / "inner" / "x.dcm"
