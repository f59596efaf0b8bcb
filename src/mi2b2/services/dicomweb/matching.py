"""QIDO-RS matching (PS3.4 C.2.2.2): single values with ``*`` and ``?`` wildcards (person names
ignore case), UID and code lists, and date/time ranges.

Pure functions; the only outside knowledge is pydicom's data dictionary, for an
attribute's value representation.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue


def matches(keyword: str, pattern: str, value: Any) -> bool:
    """PS3.4 C.2.2.2 matching of one key against one attribute's value(s)."""
    pattern = pattern.strip()
    if pattern in ("", "*"):
        return True  # universal matching
    vr = dictionary_VR(keyword)
    values = attribute_values(value)
    if not values:
        return False
    if is_list(keyword, pattern):
        wanted = list_values(pattern)
        return any(wildcard(w, v, False) for w in wanted for v in values)
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        return any(_in_range(pattern, v) for v in values)
    return any(wildcard(pattern, v, ignore_case=vr == "PN") for v in values)


def attribute_values(value: Any) -> list[str]:
    """An attribute's values as text, empty ones left out (multi-valued in pydicom's form or backslash-joined)."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value if str(v) != ""]
    text = str(value)
    return [v for v in text.split("\\") if v] if text else []


def wildcard(pattern: str, value: str, ignore_case: bool) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching (``*`` any run, ``?`` one character) in time linear in the
    value for each piece of the pattern: never a backtracking regular expression, which a pattern such
    as ``*?*?*?...`` drives exponential while holding the interpreter."""
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    if "*" not in pattern and "?" not in pattern:
        return value == pattern
    if "*" not in pattern:  # ? only: the same length, character by character
        return len(value) == len(pattern) and _piece_at(pattern, value, 0)
    first, *middle, last = pattern.split("*")
    end = len(value) - len(last)
    if len(first) > end or not _piece_at(first, value, 0) or not _piece_at(last, value, end):
        return False
    position = len(first)
    for piece in middle:  # each fixed-length piece at its leftmost place is the best any match can do
        if piece:
            found = _piece(piece).search(value, position, end)
            if found is None:
                return False
            position = found.end()
    return True


def is_list(keyword: str, pattern: str) -> bool:
    """Whether a pattern is a list of values to match any of (UIDs always; codes when separated)."""
    vr = dictionary_VR(keyword)
    return vr == "UI" or (vr == "CS" and ("," in pattern or "\\" in pattern))


def list_values(pattern: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\\]", pattern) if p.strip()]


def _piece_at(piece: str, value: str, start: int) -> bool:
    return all(p == "?" or p == v for p, v in zip(piece, value[start:start + len(piece)], strict=True))


@lru_cache(maxsize=1024)
def _piece(piece: str) -> re.Pattern[str]:
    """A fixed-length pattern (literals and ``.``): no quantifier, so no backtracking."""
    return re.compile("".join("." if c == "?" else re.escape(c) for c in piece), re.DOTALL)


def _in_range(pattern: str, value: str) -> bool:
    low, _, high = pattern.partition("-")
    plain = value.replace(":", "").replace("-", "")
    low, high = low.replace(":", ""), high.replace(":", "")
    if low and plain[: len(low)] < low:
        return False
    return not (high and plain[: len(high)] > high)
