"""What a DICOMweb request asks for: QIDO-RS query parameters and WADO-RS frame lists, and the
limits on both, so that no request can keep the server busy for long (each answer names its limit).

``includefield``, ``limit`` and ``offset`` are supported; ``fuzzymatching`` is
not (the answer carries a Warning header saying so).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from mi2b2.errors import InvalidInput, LimitExceeded
from mi2b2.services.dicomweb.matching import is_list, list_values

MAX_LIMIT = 10_000
MAX_OFFSET = 1_000_000
MAX_PARAMETERS = 64  # query parameters in one request
MAX_VALUE_CHARS = 8192  # one parameter's value (a list of UIDs fits ~120)
MAX_LIST_VALUES = 500  # values in one UID or code list
MAX_PATTERN_CHARS = 256  # one value with * or ? (DICOM values are at most 64 characters a component)
MAX_WILDCARD_VALUES = 32  # values with * or ? in one query: each is matched against every candidate
MAX_INCLUDE_FIELDS = 200
MAX_FRAMES = 1000  # distinct frames in one WADO-RS frame request

Item = TypeVar("Item")


@dataclass(frozen=True)
class Query:
    filters: dict[str, str]
    include: frozenset[str]
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    warnings: tuple[str, ...] = ()

    def page(self, items: list[Item]) -> list[Item]:
        end = None if self.limit is None else self.offset + self.limit
        return items[self.offset:end]


def parse_query(items: Sequence[tuple[str, str]]) -> Query:
    """QIDO-RS query parameters (repeated keys allowed) into a Query; LimitExceeded over a limit."""
    if len(items) > MAX_PARAMETERS:
        raise LimitExceeded(f"{len(items)} query parameters; at most {MAX_PARAMETERS} are accepted in one search")
    filters: dict[str, str] = {}
    include: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    warnings: list[str] = []
    wildcards = 0
    for name, value in items:
        lowered = name.lower()
        if len(value) > MAX_VALUE_CHARS or len(name) > 64:
            raise LimitExceeded(f"query parameter {name[:64]!r} is {len(value)} characters long; values of at most "
                                f"{MAX_VALUE_CHARS} characters are accepted")
        if lowered == "includefield":
            for part in value.split(","):
                if part.strip().lower() == "all":
                    include_all = True
                elif part.strip():
                    include.add(_keyword(part))
            if len(include) > MAX_INCLUDE_FIELDS:
                raise LimitExceeded(f"more than {MAX_INCLUDE_FIELDS} includefield attributes; ask for fewer, "
                                    "or includefield=all")
        elif lowered in ("limit", "offset"):
            try:
                number = int(value)
            except ValueError:
                raise InvalidInput(f"{lowered} must be a whole number, not {value[:32]!r}") from None
            if number < 0:
                raise InvalidInput(f"{lowered} must not be negative")
            highest = MAX_LIMIT if lowered == "limit" else MAX_OFFSET
            if number > highest:
                raise LimitExceeded(f"{lowered}={number} is over the most mi2b2 accepts, {highest}; "
                                    "page through the results with limit and offset")
            if lowered == "limit":
                limit = number
            else:
                offset = number
        elif lowered in ("fuzzymatching", "fuzzy"):
            if value.strip().lower() == "true":
                warnings.append('299 mi2b2 "fuzzymatching is not supported; only literal matching was performed"')
        else:
            keyword = _keyword(name)
            wildcards += _check_pattern(keyword, value)
            if wildcards > MAX_WILDCARD_VALUES:
                raise LimitExceeded(f"more than {MAX_WILDCARD_VALUES} values with * or ? in one search; "
                                    "narrow the search, or run several")
            filters[keyword] = value
    return Query(filters, frozenset(include), include_all, limit, offset, tuple(warnings))


def exact_uids(pattern: str | None) -> list[str] | None:
    """The UIDs a UID key names exactly; None if it names none, or matches by wildcard."""
    if not pattern or any(c in pattern for c in "*?"):
        return None
    return [u.strip() for u in re.split(r"[,\\]", pattern) if u.strip()]


def frame_numbers(text: str) -> list[int]:
    """The frame list of a URL, each frame once, in the order first asked; LimitExceeded over MAX_FRAMES."""
    parts = [part for part in text.split(",") if part.strip()]
    if len(parts) > 4 * MAX_FRAMES:  # a repeated list is deduplicated below, but not at any length
        raise LimitExceeded(f"the frame list names {len(parts)} frames; at most {MAX_FRAMES} distinct frames "
                            "are sent in one request: ask for the rest in further requests")
    try:
        numbers = list(dict.fromkeys(int(part) for part in parts))
    except ValueError:
        raise InvalidInput(f"frame list {text[:64]!r} must be numbers separated by commas, from 1") from None
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidInput("frames are numbered from 1")
    if len(numbers) > MAX_FRAMES:
        raise LimitExceeded(f"{len(numbers)} distinct frames asked for; at most {MAX_FRAMES} are sent in one "
                            "request: ask for the rest in further requests")
    return numbers


def _keyword(name: str) -> str:
    """A query key (keyword or 8 hex digits) as a keyword; InvalidInput if DICOM has no such attribute."""
    key = name.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        found = keyword_for_tag(int(key, 16))
        if found:
            return str(found)
    elif tag_for_keyword(key) is not None:
        return key
    if "." in key:
        raise InvalidInput(f"matching inside sequences ({key!r}) is not supported; match on top-level attributes")
    raise InvalidInput(f"{key!r} is not a DICOM attribute; use keywords (PatientID) or tags (00100020)")


def _check_pattern(keyword: str, value: str) -> int:
    """How many of the value's patterns have wildcards; LimitExceeded over a list or pattern limit."""
    listed = list_values(value) if is_list(keyword, value) else [value.strip()]
    if len(listed) > MAX_LIST_VALUES:
        raise LimitExceeded(f"{keyword} lists {len(listed)} values; at most {MAX_LIST_VALUES} are accepted in one "
                            "search: split the list over several searches")
    for pattern in listed:
        if ("*" in pattern or "?" in pattern) and len(pattern) > MAX_PATTERN_CHARS:
            raise LimitExceeded(f"a {keyword} value with wildcards is {len(pattern)} characters long; at most "
                                f"{MAX_PATTERN_CHARS} are accepted")
    return sum(1 for pattern in listed if "*" in pattern or "?" in pattern)
